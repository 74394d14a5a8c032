"""Sliding windows, logit soft-capping and ALiBi over a paged KV pool.

CPU: the paged reference against the contiguous attention_reference over the same tokens
(decode and prefill chunks, static and traced windows); the sharded dispatch (ALiBi slopes
split with the query heads over `tensor`); the paged decode kernel and the prefill-chunk
path in the Mosaic GPU interpreter, with NaN in every page wholly before a row's window
(a kernel that loaded one would return NaN) and in the padding page. GPU (`-m gpu`,
Hopper): the compiled paged decode kernel with the modifiers at serving shapes against the
contiguous decode kernel and the float32 reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_paged_attention import _hopper, _mesh, _rel, big_paged_problem, paged_problem, rand

from jaxformer.kernels import attention as attn
from jaxformer.kernels import decode_attention as da
from jaxformer.kernels import paged_attention as pa
from jaxformer.kernels.reference import attention_reference

_STATIC = ("causal", "scale", "return_lse", "softcap", "window")
contiguous = jax.jit(attention_reference, static_argnames=_STATIC)


def slopes_for(N):
    """BLOOM's slopes for N heads (a power of two), [N] float32."""
    return jnp.asarray(2.0 ** (-8.0 * np.arange(1, N + 1) / N), jnp.float32)


def mods_kw(window, cap, alibi, N):
    return {"window": window, "softcap": cap,
            "alibi_slopes": slopes_for(N) if alibi else None}


REF_CASES = [  # (the contiguous reference is tested against their definition: test_kernels_window)
    # window, softcap, alibi, traced window
    (5, None, False, False),
    (None, 2.0, True, False),
    (7, 1.5, True, True),
]


@pytest.mark.parametrize("window,cap,alibi,traced", REF_CASES)
def test_reference_equals_contiguous_with_modifiers(window, cap, alibi, traced):
    """Decode rows (ragged lengths, a row of one token) and a prefill chunk at positions
    20..27 over its pages: the paged reference == attention_reference on the same tokens."""
    lengths, N, K, H, ps, M = [1, 37, 64, 50], 4, 2, 16, 16, 4
    q, k, v, pos, kvl, kp, vp, pages = paged_problem(lengths, N, K, H, ps, M, layers=2,
                                                     layer=1)
    kw = mods_kw(window, cap, alibi, N)
    w = kw.pop("window")

    def paged(q, pos, win):
        return pa.paged_attention_reference(q, kp, vp, pages, pos, kvl, scale=0.3,
                                            layer=jnp.int32(1), window=win, **kw)
    if traced:  # a per-layer window: an int32 operand
        run = lambda q, pos: jax.jit(paged)(q, pos, jnp.int32(w))  # noqa: E731
    else:
        run = jax.jit(lambda q, pos: paged(q, pos, w))
    got = run(q, pos)
    want = contiguous(q, k, v, pos, kvl, causal=True, scale=0.3, window=w, softcap=cap,
                      alibi_slopes=kw["alibi_slopes"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # a prefill chunk: 8 queries at positions 20..27 of rows holding at least 28 tokens
    qc = rand((4, 8, N, H))
    pc = jnp.broadcast_to(jnp.arange(20, 28, dtype=jnp.int32), (4, 8))
    keep = jnp.asarray([1, 0, 0, 0], bool)[:, None]  # row 0 (one token) sees only key 0
    pc = jnp.where(keep, 0, pc)
    got = run(qc, pc)
    want = contiguous(qc, k, v, pc, kvl, causal=True, scale=0.3, window=w, softcap=cap,
                      alibi_slopes=kw["alibi_slopes"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_modifiers_name_the_field():
    q, _, _, pos, kvl, kp, vp, pages = paged_problem([3, 5], 4, 2, 8, 8, 2)
    for kw, msg in (({"window": 0}, "window must be"), ({"softcap": -1.0}, "softcap must"),
                    ({"alibi_slopes": jnp.ones((3,))}, "alibi_slopes must have shape")):
        with pytest.raises(ValueError, match=msg):
            attn.paged_attention(q, kp[0], vp[0], pages, pos, kvl, scale=1.0, **kw)
        with pytest.raises(ValueError, match=msg):
            pa.paged_attention_reference(q, kp[0], vp[0], pages, pos, kvl, scale=1.0, **kw)


@pytest.mark.parametrize("mesh_sizes,static", [((2, 1, 2), False), ((1, 1, 4), True)])
def test_dispatch_sharded_with_modifiers(mesh_sizes, static):
    """ALiBi slopes split with the query heads over `tensor` (tensor 4 > K 2: each shard
    picks its kv head), a traced window replicated or a static one (every layer sliding):
    equals the unsharded contiguous reference."""
    from jaxformer import sharding
    N, K, H, ps, M = 8, 2, 8, 8, 3
    q, k, v, pos, kvl, kp, vp, pages = paged_problem([5, 17], N, K, H, ps, M, spare=1)
    slopes = slopes_for(N)
    run = jax.jit(lambda q, kp, vp, pages, pos, kvl, w: attn.paged_attention(
        q, kp, vp, pages, pos, kvl, scale=0.3, layer=jnp.int32(0), window=6 if static else w,
        softcap=1.5, alibi_slopes=slopes))
    want = contiguous(q, k, v, pos, kvl, causal=True, scale=0.3, window=6, softcap=1.5,
                      alibi_slopes=slopes)
    if mesh_sizes[0] > 1:  # each data shard owns half the pool: both halves are the pool,
        kp, vp = (jnp.concatenate([a, a], axis=1) for a in (kp, vp))  # ids local to each
    with sharding.use(_mesh(*mesh_sizes), {}):
        out = run(q, kp, vp, pages, pos, kvl, jnp.int32(6))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


# ---- the kernels in the Mosaic GPU interpreter (CPU) --------------------------------------
def nan_before_window(kp, vp, pages, lengths, window, ps, bk, layer):
    """NaN in every page of a row that lies wholly before the first kv block the kernel
    must read (the block holding the window's first key)."""
    kp, vp = np.array(kp.astype(jnp.float32)), np.array(vp.astype(jnp.float32))
    pages = np.asarray(pages)
    for b, n in enumerate(lengths):
        lo = max(n - 1 - (window - 1), 0)
        for j in range((lo // bk) * bk // ps):
            kp[layer, pages[b, j]] = np.nan
            vp[layer, pages[b, j]] = np.nan
    return kp, vp


INTERP = [
    # lengths, N, K, H, ps, block_kv, splits, window, softcap, alibi, traced window
    ([70, 1, 100], 4, 2, 64, 16, 32, 2, 40, 3.0, False, False),  # 2 pages a step, 2 splits
    ([33, 150], 4, 1, 64, 32, 64, 1, 50, None, True, True),      # ALiBi, G = 4, traced W
]


@pytest.mark.parametrize("case", INTERP)
def test_paged_decode_kernel_interpreted_with_modifiers(case, interpreted):
    lengths, N, K, H, ps, bk, splits, window, cap, alibi, traced = case
    M = -(-max(lengths) // ps) + 1
    q, k, v, pos, kvl, kp, vp, pages = paged_problem(lengths, N, K, H, ps, M, jnp.bfloat16,
                                                     layers=2, layer=1, nan_pad=True)
    kp, vp = (jnp.asarray(a, jnp.bfloat16) for a in
              nan_before_window(kp, vp, pages, lengths, window, ps, bk, 1))
    kw = mods_kw(window, cap, alibi, N)
    w = kw.pop("window")
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = attention_reference(f32(q), f32(k), f32(v), pos, kvl, causal=True, scale=H ** -0.5,
                              window=w, **kw)
    call = functools.partial(pa.paged_decode_attention, scale=H ** -0.5, splits=splits,
                             interpret=True, config=pa.PagedDecodeConfig(block_kv=bk, stages=2),
                             **kw)
    if traced:
        out = jax.jit(lambda *a: call(*a[:-1], layer=jnp.int32(1), window=a[-1]))(
            q, kp, vp, pages, pos, kvl, jnp.int32(w))
    else:
        out = jax.jit(functools.partial(call, window=w))(q, kp, vp, pages, pos, kvl,
                                                         layer=jnp.int32(1))
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)), "a page before the window (or past the row) was read"
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
    assert not interpreted(), "the interpreter's race detector found a race"


def test_paged_prefill_chunk_interpreted_with_modifiers(interpreted):
    """A 40-token chunk at positions 50..89 over its row's shuffled pages, window 30,
    soft cap and ALiBi: gathered and run through the flash prefill kernel (interpreted)."""
    N, K, H, ps, M, T = 2, 1, 64, 16, 6, 40
    _, k, v, _, kvl, kp, vp, pages = paged_problem([90], N, K, H, ps, M, jnp.bfloat16)
    q = rand((1, T, N, H), jnp.bfloat16)
    pos = jnp.arange(50, 50 + T, dtype=jnp.int32)[None]
    kw = mods_kw(30, 4.0, True, N)
    out = jax.jit(functools.partial(
        pa.paged_prefill_attention, scale=H ** -0.5, interpret=True,
        config=pa.fa.PrefillConfig(block_q=64, block_kv=64, stages=2), **kw))(
            q, kp[0], vp[0], pages, pos, kvl)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = attention_reference(f32(q), f32(k), f32(v), pos, kvl, causal=True, scale=H ** -0.5,
                              **kw)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
    assert not interpreted(), "the interpreter's race detector found a race"


# ---- the compiled kernel (Hopper GPU) ------------------------------------------------------
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")

GPU_CASES = [
    # B, S, N, K, H, ps, window, softcap, alibi
    (64, 4096, 32, 8, 128, 64, 1024, None, False),   # Mistral-like window
    (64, 4096, 16, 8, 128, 16, 4096, 50.0, False),   # Gemma-2-like: W == S, soft cap
    (8, 2048, 16, 16, 128, 32, None, None, True),    # BLOOM-like ALiBi (MHA)
    (2, 4096, 32, 8, 128, 64, 333, 30.0, True),      # few rows (splits), odd W, all three
]


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_CASES)
def test_paged_decode_kernel_gpu_with_modifiers(case):
    B, S, N, K, H, ps, window, cap, alibi = case
    lens = np.random.default_rng(3).integers(1, S + 1, size=B)
    lens[0], lens[-1] = S, 1
    q, k, v, pos, kvl, kp, vp, pages = big_paged_problem(B, S, N, K, H, ps, jnp.bfloat16,
                                                         lens)
    kw = mods_kw(window, cap, alibi, N)
    out = jax.jit(functools.partial(pa.paged_decode_attention, scale=H ** -0.5, **kw))(
        q, kp, vp, pages, pos, kvl, layer=jnp.int32(1))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = jax.jit(functools.partial(attention_reference, causal=True, scale=H ** -0.5,
                                    window=window, softcap=cap))(
        f32(q), f32(k), f32(v), pos, kvl, alibi_slopes=kw["alibi_slopes"])
    assert _rel(out, ref) < 1.5e-2
    contig = jax.jit(functools.partial(da.decode_attention, causal=True, scale=H ** -0.5,
                                       **kw))(q, k, v, pos, kvl)
    assert _rel(out, contig) < 1e-2
