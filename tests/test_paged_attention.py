"""Paged attention: the reference, the Mosaic GPU decode kernel and the dispatch.

CPU: the paged reference against a contiguous attention_reference over the same tokens
scattered into shuffled pages of a pool whose other slots hold large garbage (float and
int8 pools, GQA, ragged rows: a row of length 1, rows whose last page is partial); the
kernel in the Mosaic GPU interpreter on tiny shapes; the sharded dispatch on 8 emulated
devices (each data shard owns its pages). GPU (`-m gpu`, Hopper only): the compiled kernel
at serving shapes (B=64, K=8, G=4, H=128, ps 16..128, lengths up to 4096, bf16 / int8 / fp8).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import cache as kvc
from jaxformer.kernels import attention as attn
from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels import paged_attention as pa
from jaxformer.kernels.reference import attention_reference as _contiguous

# jitted: one compile per shape instead of one per jnp op (CPU time is scarce)
_STATIC = ("causal", "scale", "return_lse", "softcap", "window")
attention_reference = jax.jit(_contiguous, static_argnames=_STATIC)
paged_reference = jax.jit(pa.paged_attention_reference, static_argnames=_STATIC[1:])
quantize = jax.jit(kvc.quantize, static_argnames="mode")

_seed = iter(range(50_000, 1_000_000))


def rand(shape, dtype=jnp.float32, std=1.0):
    x = np.random.default_rng(next(_seed)).standard_normal(shape, dtype=np.float32) * std
    return jnp.asarray(x.astype(jnp.dtype(dtype)))


def paged_problem(lengths, N, K, H, ps, M, dtype=jnp.float32, layers=1, layer=0, spare=3,
                  nan_pad=False):
    """Contiguous q, k, v [B, S=M*ps, K, H] and the same tokens in a pool [L, P, ps, K, H]
    (pages shuffled over rows, every slot the rows don't own, tokens past each row's
    length and the other layers filled with garbage 30x the data's scale).
    nan_pad: page 0 is owned by no row and all NaN, and the page tables' padding points
    at it, so a kernel that loads a page past a row's last one outputs NaN (the paged
    reference then does too: compare with the contiguous one).
    Returns q, k, v, pos (decode: length - 1), kvl, k_pool, v_pool, pages."""
    B = len(lengths)
    S = M * ps
    q, k, v = rand((B, 1, N, H), dtype), rand((B, S, K, H), dtype), rand((B, S, K, H), dtype)
    kvl = jnp.asarray(lengths, jnp.int32)
    used = [-(-n // ps) for n in lengths]
    P = sum(used) + spare + int(nan_pad)
    perm = np.random.default_rng(next(_seed)).permutation(P - int(nan_pad)) + int(nan_pad)
    pages = np.zeros((B, M), np.int32)  # padding: page 0 (a real page of someone)
    pools = [np.array(rand((layers, P, ps, K, H), jnp.float32, std=30.0)) for _ in "kv"]
    if nan_pad:
        for pool in pools:
            pool[:, 0] = np.nan
    at = 0
    for b, n in enumerate(used):
        pages[b, :n] = perm[at:at + n]
        at += n
        for j in range(n):  # the whole page, garbage past the length included
            tokens = slice(j * ps, (j + 1) * ps)
            valid = np.arange(j * ps, (j + 1) * ps) < lengths[b]
            for pool, src in zip(pools, (k, v)):
                page = pool[layer, pages[b, j]]
                page[valid] = np.asarray(src[b, tokens], np.float32)[valid]
    k_pool, v_pool = (jnp.asarray(p).astype(dtype) for p in pools)
    pos = (kvl - 1)[:, None]
    return q, k, v, pos, kvl, k_pool, v_pool, jnp.asarray(pages)


CASES = [
    # lengths, N, K, H, ps, M
    ([1, 37, 64, 50], 4, 2, 16, 16, 4),  # GQA 2; length 1; partial last pages; a full row
    ([9, 33], 3, 3, 8, 8, 5),            # MHA, padded page-table columns
]


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_contiguous_attention_over_the_same_tokens(case):
    lengths, N, K, H, ps, M = case
    q, k, v, pos, kvl, kp, vp, pages = paged_problem(lengths, N, K, H, ps, M, layers=2,
                                                     layer=1)
    out = paged_reference(q, kp, vp, pages, pos, kvl, scale=0.3,
                                       layer=jnp.int32(1))
    ref = attention_reference(q, k, v, pos, kvl, causal=True, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_reference_prefill_chunk_softcap_and_window():
    """T > 1: a chunk at positions 20..27 of rows whose caches hold those tokens already;
    with a soft cap and a sliding window, against the contiguous reference."""
    lengths, N, K, H, ps, M, T = [28, 25], 4, 1, 8, 8, 4, 8
    q1, k, v, _, kvl, kp, vp, pages = paged_problem(lengths, N, K, H, ps, M)
    q = rand((2, T, N, H))
    pos = jnp.broadcast_to(jnp.arange(20, 20 + T, dtype=jnp.int32), (2, T))
    for kw in ({}, {"softcap": 2.0, "window": 5}):
        out = paged_reference(q, kp[0], vp[0], pages, pos, kvl, scale=0.4, **kw)
        ref = attention_reference(q, k, v, pos, kvl, causal=True, scale=0.4, **kw)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # the window really cuts: position 27 with window 5 sees keys 23..27 only
    sm = jax.nn.softmax(2.0 * jnp.tanh(0.4 * jnp.einsum("nh,sh->ns", q[0, -1], k[0, 23:28, 0])
                                       / 2.0), axis=-1)
    want = jnp.einsum("ns,sh->nh", sm, v[0, 23:28, 0])
    got = paged_reference(q, kp[0], vp[0], pages, pos, kvl, scale=0.4,
                                       softcap=2.0, window=5)
    np.testing.assert_allclose(np.asarray(got[0, -1]), np.asarray(want), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_reference_quantized_pool_equals_contiguous_codes(mode):
    lengths, N, K, H, ps, M = [1, 20, 32], 4, 2, 16, 8, 4
    q, k, v, pos, kvl, kp, vp, pages = paged_problem(lengths, N, K, H, ps, M)
    (kc, ks), (vc, vs) = quantize(kp, mode), quantize(vp, mode)
    out = paged_reference(q, kc, vc, pages, pos, kvl, scale=0.3,
                                       layer=jnp.int32(0), k_scale=ks, v_scale=vs)
    # independent: quantize the contiguous tokens themselves (same per-token scales)
    (kc2, ks2), (vc2, vs2) = quantize(k, mode), quantize(v, mode)
    ref = attention_reference(q, kvc.dequantize(kc2, ks2, jnp.float32),
                              kvc.dequantize(vc2, vs2, jnp.float32), pos, kvl, causal=True,
                              scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_operand():
    q, _, _, pos, kvl, kp, vp, pages = paged_problem([3, 5], 2, 1, 8, 8, 2)
    with pytest.raises(ValueError, match="pages must be"):
        paged_reference(q, kp, vp, pages[:1], pos, kvl, scale=1.0,
                                     layer=jnp.int32(0))
    with pytest.raises(ValueError, match="k_pool, v_pool"):
        paged_reference(q, kp, vp, pages, pos, kvl, scale=1.0)  # no layer: 4-D
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        paged_reference(q, kp, vp, pages, pos, kvl, scale=1.0,
                                     layer=jnp.int32(0), k_scale=kp[..., 0])
    with pytest.raises(ValueError, match="page size 8"):
        pa.paged_decode_attention(q.astype(jnp.bfloat16), kp.astype(jnp.bfloat16),
                                  vp.astype(jnp.bfloat16), pages, pos, kvl, scale=1.0,
                                  layer=jnp.int32(0))


# ---- the dispatch, sharded (CPU, 8 emulated devices) ------------------------------------
def _mesh(data, pipe, tensor):
    from jaxformer.sharding import make_mesh
    return make_mesh(data=data, pipe=pipe, tensor=tensor,
                     devices=jax.devices()[:data * pipe * tensor])


@pytest.mark.parametrize("mesh_sizes,mode", [((2, 1, 2), None), ((1, 1, 4), None),
                                             ((2, 1, 2), "int8")])
def test_dispatch_sharded_each_data_shard_owns_its_pages(mesh_sizes, mode):
    """Pool pages split over `data` (each shard's page ids local to it), kv heads over
    `tensor` (or, tensor 4 > K 2, each shard picks its kv head), scales with their codes:
    equals the reference run per data shard on its own half of the pool."""
    from jaxformer import sharding
    dp = mesh_sizes[0]
    N, K, H, ps, M = 8, 2, 8, 8, 3
    shards = [list(paged_problem(lens, N, K, H, ps, M, spare=2))
              for lens in ([5, 17], [24, 1])[:dp]]
    for s in shards:  # codes and scales, or no scales
        s[5:7] = [quantize(a, mode) if mode else (a, None) for a in s[5:7]]
    P = max(s[5][0].shape[1] for s in shards)

    def pool(i, j):  # the shards' pools (or scales) side by side on the page axis
        parts = [s[i][j] for s in shards]
        if parts[0] is None:
            return None
        return jnp.concatenate([jnp.pad(a, ((0, 0), (0, P - a.shape[1]))
                                        + ((0, 0),) * (a.ndim - 2)) for a in parts], axis=1)
    q, pos, kvl, pages = (jnp.concatenate([s[i] for s in shards]) for i in (0, 3, 4, 7))
    run = jax.jit(lambda q, kp, vp, pages, pos, kvl, ks, vs: attn.paged_attention(
        q, kp, vp, pages, pos, kvl, scale=0.3, backend="auto", layer=jnp.int32(0),
        k_scale=ks, v_scale=vs))
    with sharding.use(_mesh(*mesh_sizes), {}):
        out = run(q, pool(5, 0), pool(6, 0), pages, pos, kvl, pool(5, 1), pool(6, 1))
    want = jnp.concatenate([paged_reference(
        s[0], s[5][0], s[6][0], s[7], s[3], s[4], scale=0.3, layer=jnp.int32(0),
        k_scale=s[5][1], v_scale=s[6][1]) for s in shards])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="CPU behaviour")
def test_dispatch_on_cpu_runs_the_reference_and_refuses_explicit_kernels():
    q, _, _, pos, kvl, kp, vp, pages = paged_problem([3, 12], 4, 2, 8, 8, 2)
    ref = paged_reference(q, kp[0], vp[0], pages, pos, kvl, scale=0.5)
    for backend in ("auto", "xla"):  # one-layer pools (no `layer`) too
        out = attn.paged_attention(q, kp[0], vp[0], pages, pos, kvl, scale=0.5,
                                   backend=backend)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="Hopper"):
        attn.paged_attention(q, kp[0], vp[0], pages, pos, kvl, scale=0.5, backend="pallas")
    with pytest.raises(ValueError, match="auto, xla or pallas"):
        attn.paged_attention(q, kp[0], vp[0], pages, pos, kvl, scale=0.5, backend="cudnn")


def test_dispatch_refuses_a_pool_that_does_not_split_over_data():
    from jaxformer import sharding
    q, _, _, pos, kvl, kp, vp, pages = paged_problem([3, 5], 2, 1, 8, 8, 2, spare=0)
    kp, vp = kp[:, :1], vp[:, :1]  # 1 page: cannot split over data = 2
    with sharding.use(_mesh(2, 1, 1), {}):
        with pytest.raises(ValueError, match="pool pages 1"):
            attn.paged_attention(q, kp, vp, pages * 0, pos, kvl, scale=1.0, backend="xla",
                                 layer=jnp.int32(0))


def test_decode_config_two_resident_ctas():
    """ctas_per_sm=2 halves the shared memory the K/V ring may take: at head_dim 128, bf16,
    64 query rows and 64-key steps the ring fits 2 stages (by hand: 227 KiB / 2 = 116224 B,
    less 1024 B of barriers and 64 x 128 x 6 + 8 x 64 = 49664 B of q / o / lse, leaves
    65536 B = two 32 KiB K + V stages), where one resident CTA fits 5."""
    fixed, stage = 64 * 128 * (2 + 4) + 8 * 64, 2 * 64 * 128 * 2
    assert fa.fit_stages(8, fixed, stage, 100, fa.SMEM_BYTES // 2) == 2
    assert fa.fit_stages(8, fixed, stage, 100) == 5
    for bad in (dict(compute_registers=212), dict(compute_registers=264),
                dict(ctas_per_sm=0)):
        with pytest.raises(ValueError, match="PagedDecodeConfig"):
            pa.PagedDecodeConfig(**bad)


def test_quantized_pool_of_small_pages_is_refused_by_the_kernel():
    """16-token pages of int8 codes: the kernel names why it cannot take them (its step
    would be one 16-row page, which has no upcast layout), so dispatch falls back to XLA."""
    q = jax.ShapeDtypeStruct((4, 1, 32, 128), jnp.bfloat16)
    for ps, refused in ((16, True), (32, False)):
        pool = jax.ShapeDtypeStruct((2, 64, ps, 8, 128), jnp.int8)
        reason = pa.check_supported(q, pool, pool, quantized=True)
        assert (reason is not None and "at least 32 tokens" in reason) == refused, reason
    with pytest.raises(ValueError, match="at least 32 tokens"):
        pool = jnp.zeros((1, 8, 16, 8, 128), jnp.int8)
        sc = jnp.ones((1, 8, 16, 8), jnp.float32)
        pa.paged_decode_attention(jnp.zeros((4, 1, 32, 128), jnp.bfloat16), pool, pool,
                                  jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 1), jnp.int32),
                                  jnp.ones((4,), jnp.int32), scale=1.0, layer=jnp.int32(0),
                                  k_scale=sc, v_scale=sc)


# ---- the kernel in the Mosaic GPU interpreter (CPU) --------------------------------------
INTERP = [
    # lengths, N, K, H, ps, block_kv, splits, dtype, mode, rows per CTA
    ([1, 70, 48], 4, 2, 64, 16, 32, 2, jnp.bfloat16, None, 1),   # 2 pages a step, 2 splits
    # int8 codes, 2 pages a step, both rows in one CTA's ring
    ([33, 100], 2, 1, 128, 32, 64, 1, jnp.bfloat16, "int8", 2),
    # 3 rows a CTA over 5 rows (one padding row): rows of 0, 1 and several steps share a
    # ring of 2 slots, a row's first step waits on the slot the row before released
    ([70, 1, 48, 33, 17], 4, 2, 64, 16, 32, 1, jnp.bfloat16, None, 3),
]


@pytest.mark.parametrize("case", INTERP)
def test_paged_decode_kernel_interpreted(case, interpreted):
    lengths, N, K, H, ps, bk, splits, dtype, mode, rows = case
    M = -(-max(lengths) // ps) + 1
    q, k, v, pos, kvl, kp, vp, pages = paged_problem(lengths, N, K, H, ps, M, dtype,
                                                     layers=2, layer=1, nan_pad=True)
    kw = {}
    if mode is not None:  # the contiguous tokens' own codes: the same per-token scales
        (kp, ks), (vp, vs) = quantize(kp, mode), quantize(vp, mode)
        kw = {"k_scale": ks, "v_scale": vs}
        k, v = (kvc.dequantize(*quantize(a, mode), jnp.float32) for a in (k, v))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = attention_reference(f32(q), f32(k), f32(v), pos, kvl, causal=True, scale=H ** -0.5)
    out = jax.jit(functools.partial(
        pa.paged_decode_attention, scale=H ** -0.5, splits=splits, interpret=True,
        config=pa.PagedDecodeConfig(block_kv=bk, stages=2, rows_per_cta=rows)))(
            q, kp, vp, pages, pos, kvl, layer=jnp.int32(1), **kw)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
    assert not interpreted(), "the interpreter's race detector found a race"


def test_paged_prefill_chunk_interpreted(interpreted):
    """T > 1: a 40-token chunk at positions 50..89 (already in the pool) over its row's
    shuffled pages, gathered and run through the flash prefill kernel (interpreted)."""
    N, K, H, ps, M, T = 2, 1, 64, 16, 6, 40
    _, k, v, _, kvl, kp, vp, pages = paged_problem([90], N, K, H, ps, M, jnp.bfloat16)
    q = rand((1, T, N, H), jnp.bfloat16)
    pos = jnp.arange(50, 50 + T, dtype=jnp.int32)[None]
    out = jax.jit(functools.partial(
        pa.paged_prefill_attention, scale=H ** -0.5, interpret=True,
        config=pa.fa.PrefillConfig(block_q=64, block_kv=64, stages=2)))(
            q, kp[0], vp[0], pages, pos, kvl)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    ref = attention_reference(f32(q), f32(k), f32(v), pos, kvl, causal=True, scale=H ** -0.5)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2
    assert not interpreted(), "the interpreter's race detector found a race"


# ---- the compiled kernel (Hopper GPU) ----------------------------------------------------
def _hopper():
    devs = jax.devices()
    return bool(devs) and attn.is_hopper(devs[0])


gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")


def big_paged_problem(B, S, N, K, H, ps, dtype, lengths, layers=2, layer=1, seed=0,
                      pad=jnp.nan):
    """Serving-size problem built on the device: contiguous q, k, v [B, S, K, H] and pools
    [layers, 1 + B*S/ps, ps, K, H] holding the rows' pages shuffled; page 0 and every other
    layer are NaN and the page tables' padding points at page 0, so any load of a page past
    a row's last one (or of another layer) shows as NaN (pad: that fill value instead)."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, 1, N, H), dtype)
    k = jax.random.normal(kk, (B, S, K, H), dtype)
    v = jax.random.normal(kv, (B, S, K, H), dtype)
    M = S // ps
    perm = jnp.asarray(np.random.default_rng(seed).permutation(B * M) + 1, jnp.int32)
    used = -(-np.asarray(lengths) // ps)
    pages = jnp.where(jnp.arange(M)[None, :] < jnp.asarray(used)[:, None],
                      perm.reshape(B, M), 0).astype(jnp.int32)

    def pool(x):
        one = jnp.full((1 + B * M, ps, K, H), pad, dtype).at[perm].set(
            x.reshape(B * M, ps, K, H))
        return jnp.full((layers,) + one.shape, pad, dtype).at[layer].set(one)
    kvl = jnp.asarray(lengths, jnp.int32)
    return q, k, v, (kvl - 1)[:, None], kvl, pool(k), pool(v), pages


def _lengths(B, S, seed=0):
    lens = np.random.default_rng(seed).integers(1, S + 1, size=B)
    lens[0], lens[-1] = S, 1
    return lens


def _rel(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out)), "non-finite output (a page past a row's end was read?)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@functools.partial(jax.jit, static_argnames=("scale",))
def _f32_ref(q, k, v, pos, kvl, scale):
    f = lambda a: a.astype(jnp.float32)  # noqa: E731
    return attention_reference(f(q), f(k), f(v), pos, kvl, causal=True, scale=scale)


GPU_CASES = [
    # B, S, N, K, H, ps, dtype, block_kv, splits
    (64, 4096, 32, 8, 128, 64, jnp.bfloat16, 128, None),   # the serving shape, default
    (64, 4096, 32, 8, 128, 16, jnp.bfloat16, 128, None),
    (64, 4096, 32, 8, 128, 32, jnp.bfloat16, 128, None),
    (64, 4096, 32, 8, 128, 128, jnp.bfloat16, 128, None),
    (64, 4096, 32, 8, 128, 64, jnp.bfloat16, 64, None),    # one page a step
    (64, 4096, 32, 8, 128, 64, jnp.bfloat16, 256, None),   # four pages a step
    (2, 4096, 32, 8, 128, 64, jnp.bfloat16, 128, None),    # few rows: split (flash-decoding)
    (3, 2048, 64, 8, 64, 32, jnp.float16, 128, 5),         # G = 8, head_dim 64, odd splits
    (8, 1024, 16, 16, 128, 64, jnp.bfloat16, 128, None),   # MHA
]


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_CASES)
def test_paged_decode_kernel_gpu(case):
    B, S, N, K, H, ps, dtype, bk, splits = case
    q, k, v, pos, kvl, kp, vp, pages = big_paged_problem(B, S, N, K, H, ps, dtype,
                                                         _lengths(B, S))
    out, lse = jax.jit(functools.partial(
        pa.paged_decode_attention, scale=H ** -0.5, splits=splits, return_lse=True,
        config=pa.PagedDecodeConfig(block_kv=bk)))(q, kp, vp, pages, pos, kvl,
                                                   layer=jnp.int32(1))
    ref = _f32_ref(q, k, v, pos, kvl, H ** -0.5)
    assert _rel(out, ref) < 1.5e-2
    _, ref_lse = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), pos, kvl, causal=True,
                                     scale=H ** -0.5, return_lse=True)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)


@gpu
@needs_hopper
@pytest.mark.parametrize("B,rows,mode,ps", [(512, 4, None, 16), (61, 8, None, 16),
                                             (64, 2, "int8", 32)])
def test_paged_decode_kernel_gpu_rows_per_cta(B, rows, mode, ps):
    """Several rows per CTA at serving shapes (short rows), a batch that does not divide
    into them, and int8 codes."""
    S, N, K, H = 512, 32, 8, 128
    q, k, v, pos, kvl, kp, vp, pages = big_paged_problem(B, S, N, K, H, ps, jnp.bfloat16,
                                                         _lengths(B, S))
    kw = {}
    if mode is not None:
        (kp, ks), (vp, vs) = quantize(kp, mode), quantize(vp, mode)
        kw = {"k_scale": ks, "v_scale": vs}
        k, v = (kvc.dequantize(*quantize(a, mode), jnp.float32) for a in (k, v))
    out = jax.jit(functools.partial(
        pa.paged_decode_attention, scale=H ** -0.5,
        config=pa.PagedDecodeConfig(rows_per_cta=rows)))(q, kp, vp, pages, pos, kvl,
                                                         layer=jnp.int32(1), **kw)
    assert _rel(out, _f32_ref(q, k, v, pos, kvl, H ** -0.5)) < 1.5e-2


@gpu
@needs_hopper
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("B,S,ps", [(64, 4096, 64), (2, 4096, 32)])
def test_paged_decode_kernel_gpu_quantized_pool(B, S, ps, mode):
    N, K, H = 32, 8, 128
    q, k, v, pos, kvl, kp, vp, pages = big_paged_problem(B, S, N, K, H, ps, jnp.bfloat16,
                                                         _lengths(B, S, 1))
    (kc, ks), (vc, vs) = quantize(kp, mode), quantize(vp, mode)
    deq = [kvc.dequantize(*quantize(a, mode), jnp.float32) for a in (k, v)]
    out = jax.jit(functools.partial(pa.paged_decode_attention, scale=H ** -0.5))(
        q, kc, vc, pages, pos, kvl, layer=jnp.int32(1), k_scale=ks, v_scale=vs)
    assert _rel(out, _f32_ref(q, *deq, pos, kvl, H ** -0.5)) < 1.5e-2


@gpu
@needs_hopper
@pytest.mark.parametrize("backend", ["pallas", "auto"])
def test_paged_dispatch_gpu(backend):
    B, S, N, K, H, ps = 16, 2048, 32, 8, 128, 64
    q, k, v, pos, kvl, kp, vp, pages = big_paged_problem(B, S, N, K, H, ps, jnp.bfloat16,
                                                         _lengths(B, S, 2))
    out = jax.jit(functools.partial(attn.paged_attention, scale=H ** -0.5, backend=backend))(
        q, kp, vp, pages, pos, kvl, layer=jnp.int32(1))
    assert _rel(out, _f32_ref(q, k, v, pos, kvl, H ** -0.5)) < 1.5e-2


@gpu
@needs_hopper
@pytest.mark.parametrize("T,offset", [(256, 0), (300, 1000)])
def test_paged_prefill_dispatch_gpu(T, offset):
    """Prefill chunks (already in the pool) through the dispatch: gathered pages and the
    flash kernel. Padding pages are finite here: the flash kernel reads (and masks) the
    keys of a block past the last visible one, as it does in a contiguous cache."""
    B, N, K, H, ps = 4, 32, 8, 128, 64
    S = 2048
    lengths = np.full(B, offset + T)
    _, k, v, _, kvl, kp, vp, pages = big_paged_problem(B, S, N, K, H, ps, jnp.bfloat16,
                                                        lengths, pad=0.0)
    q = jax.random.normal(jax.random.key(7), (B, T, N, H), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(offset, offset + T, dtype=jnp.int32), (B, T))
    out = jax.jit(functools.partial(attn.paged_attention, scale=H ** -0.5, backend="pallas"))(
        q, kp, vp, pages, pos, kvl, layer=jnp.int32(1))
    assert _rel(out, _f32_ref(q, k, v, pos, kvl, H ** -0.5)) < 1.5e-2
