"""Sliding windows, attention-logit soft-capping and ALiBi: reference, dispatch and kernels.

CPU: the reference against a per-query numpy loop (and ALiBi against transformers' BLOOM
bias), the per-tile kv block ranges against the mask they stand for, the argument errors,
and both Mosaic GPU kernels in the interpreter (race detector on, NaN-filled memory) with
NaN in the kv blocks before every window: a kernel that used one would return NaN. GPU
(`-m gpu`, Hopper): the compiled kernels at realistic shapes, and the dispatch.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import _hopper, _mesh, poison, problem, rel_err

from jaxformer.kernels import attention as attn
from jaxformer.kernels import decode_attention as da
from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels.reference import attention_mask, attention_reference

SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)


def numpy_attention(q, k, v, pos, kvl, *, causal, scale, window=None, softcap=None,
                    slopes=None, bloom_bias=None):
    """One query at a time in float64: the definition of reference.py's docstring.
    bloom_bias [N, S]: added instead of slopes (transformers' BLOOM form)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            keys = [s for s in range(S) if s < kvl[b] and (not causal or s <= p)
                    and (window is None or s > p - window)]
            if not keys:
                continue
            for n in range(N):
                kh = n // (N // K)
                x = np.array([q[b, t, n] @ k[b, s, kh] for s in keys]) * scale
                if slopes is not None:
                    x = x + slopes[n] * (np.array(keys) - p)
                if bloom_bias is not None:
                    x = x + bloom_bias[n, keys]
                if softcap is not None:
                    x = softcap * np.tanh(x / softcap)
                w = np.exp(x - x.max())
                out[b, t, n] = (w / w.sum()) @ v[b, keys, kh]
    return out


def sees_some(pos, kvl, S, causal, window):
    mask = attention_mask(jnp.asarray(pos), jnp.asarray(kvl), S, causal, window)
    return np.asarray(mask.any(-1))


# ---- the reference (CPU) -----------------------------------------------------------------
@pytest.mark.parametrize("window,softcap,alibi,causal", [
    (3, None, False, True), (None, 2.0, False, True), (4, 1.5, True, True),
    (2, None, False, False), (50, None, True, True)])
def test_reference_equals_the_definition(window, softcap, alibi, causal):
    B, T, S, N, K, H = 2, 6, 9, 4, 2, 8
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, jnp.float32, [9, 7], offset=2)
    q = q * 2  # scores beyond the cap, so the cap matters
    slopes = jnp.asarray(SLOPES) if alibi else None
    out = attention_reference(q, k, v, pos, kvl, causal=causal, scale=0.4,
                              window=window, softcap=softcap, alibi_slopes=slopes)
    want = numpy_attention(q, k, v, np.asarray(pos), np.asarray(kvl), causal=causal,
                           scale=0.4, window=window, softcap=softcap,
                           slopes=SLOPES if alibi else None)
    rows = sees_some(pos, kvl, S, causal, window)
    np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5)


def test_reference_alibi_equals_bloom():
    """transformers' BLOOM adds slope * key index (build_alibi_tensor): the same softmax."""
    torch = pytest.importorskip("torch")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    B, T, N, H = 1, 7, 4, 8
    q, k, v, pos, kvl = problem(B, T, T, N, N, H, jnp.float32, [T])
    alibi = build_alibi_tensor(torch.ones(1, T), N, torch.float32)  # [N, 1, S]
    slopes = build_alibi_tensor(torch.ones(1, 2), N, torch.float32)[:, 0, 1]  # slope * 1
    out = attention_reference(q, k, v, pos, kvl, causal=True, scale=H ** -0.5,
                              alibi_slopes=jnp.asarray(slopes.numpy()))
    want = numpy_attention(q, k, v, np.asarray(pos), np.asarray(kvl), causal=True,
                           scale=H ** -0.5, bloom_bias=alibi[:, 0].numpy())
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)


def test_xla_backend_and_sharded_wrapper_take_the_modifiers():
    """attention(backend="xla") passes them to the reference; _sharded hands each tensor
    shard its own heads' ALiBi slopes."""
    from jaxformer import sharding
    B, T, N, K, H = 4, 6, 4, 2, 8
    q, k, v, pos, kvl = problem(B, T, T, N, K, H, jnp.float32)
    slopes = jnp.asarray(SLOPES)
    kw = {"causal": True, "scale": 0.3, "softcap": 1.0}
    want = numpy_attention(q, k, v, np.asarray(pos), np.asarray(kvl), causal=True, scale=0.3,
                           window=3, softcap=1.0, slopes=SLOPES)
    rows = sees_some(pos, kvl, T, True, 3)
    for w in (3, jnp.int32(3)):  # a Python int, and a traced scalar (a per-layer window)
        out = jax.jit(lambda q, k, v, pos, kvl, w: attn.attention(
            q, k, v, pos, kvl, backend="xla", alibi_slopes=slopes, window=w, **kw),
            static_argnums=(5,) if isinstance(w, int) else ())(q, k, v, pos, kvl, w)
        np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-5)

    seen = []

    def fn(q, k, v, pos, kvl, layer=None, alibi_slopes=None, window=None):
        seen.append((alibi_slopes.shape, window.shape))
        return attention_reference(q, k, v, pos, kvl, alibi_slopes=alibi_slopes,
                                   window=window, **kw)
    with sharding.use(_mesh(2, 1, 2), {}):
        got = jax.jit(lambda q, k, v, pos, kvl, w: attn._sharded(
            fn, q, k, v, pos, kvl, slopes=slopes, window=w))(q, k, v, pos, kvl, jnp.int32(3))
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=2e-5)
    assert seen == [((N // 2,), ())]


@pytest.mark.parametrize("kw,match", [
    ({"window": 0}, "window"), ({"window": 2.5}, "window"),
    ({"softcap": -1.0}, "softcap"), ({"alibi_slopes": jnp.ones(3)}, "alibi_slopes")])
def test_bad_modifiers_raise_naming_the_field(kw, match):
    q, k, v, pos, kvl = problem(1, 4, 4, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        attn.attention(q, k, v, pos, kvl, causal=True, scale=0.1, backend="xla", **kw)
    with pytest.raises(ValueError, match=match):
        da.decode_attention(q[:, :1], k, v, pos[:, :1], kvl, causal=True, scale=0.1, **kw)
    with pytest.raises(ValueError, match=match):
        fa.flash_attention(q, k, v, pos, kvl, causal=True, scale=0.1, **kw)


@pytest.mark.parametrize("kw", [{"window": 2}, {"softcap": 3.0},
                                {"alibi_slopes": jnp.asarray(SLOPES[:2])}])
def test_cudnn_refuses_the_modifiers(kw):
    q, k, v, pos, kvl = problem(1, 4, 4, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"cudnn.*{next(iter(kw))}"):
        attn.attention(q, k, v, pos, kvl, causal=True, scale=0.1, backend="cudnn", **kw)


# ---- kv block ranges (CPU) ---------------------------------------------------------------
@pytest.mark.parametrize("window,causal", [(100, True), (7, True), (1, True), (40, False)])
def test_tile_ranges_cover_exactly_the_visible_keys(window, causal):
    """Per 64-row tile: the blocks visited are exactly those holding a visible key (so the
    ones wholly before every row's window are never loaded), and [mid, full) is entirely
    visible; per CTA, the streamed range starts at its non-empty tiles' first block."""
    rng = np.random.default_rng(window)
    bq, bk = 64, 64
    B, T, S = 3, 6 * bq, 8 * bk
    pos = np.sort(rng.integers(-3, S + 5, size=(B, T)), axis=1).astype(np.int32)
    pos[0] = np.arange(T) + 100  # a chunk of a prefill
    kvl = np.array([S, 1, rng.integers(0, S)], np.int32)
    lo, lim = fa.visible_range(jnp.asarray(pos), jnp.asarray(kvl), S, causal, window)
    ranges = np.asarray(fa.tile_ranges(lo, lim, bq, bk))
    mask = np.asarray(attention_mask(jnp.asarray(pos), jnp.asarray(kvl), S, causal, window))
    cols = np.arange(S)[None, None]
    np.testing.assert_array_equal(mask, (cols >= np.asarray(lo)[..., None])
                                  & (cols <= np.asarray(lim)[..., None]))
    for b in range(B):
        for t in range(T // bq):
            m = mask[b, t * bq:(t + 1) * bq]
            first, mid, full, steps = ranges[b, t]
            blocks = np.nonzero(m.reshape(bq, S // bk, bk).any((0, 2)))[0]
            if blocks.size:
                assert (first, steps) == (blocks.min(), blocks.max() + 1)
            else:
                assert steps <= first
            assert first <= mid <= full <= max(steps, first)
            assert m[:, mid * bk:full * bk].all()
    cta = np.asarray(fa.cta_ranges(jnp.asarray(ranges))).reshape(B, -1, 2, 4)
    for b in range(B):
        for c in range(cta.shape[1]):
            pair = ranges[b].reshape(-1, 2, 4)[c]
            busy = [r for r in pair if r[3] > r[0]]
            if busy:
                assert cta[b, c, :, 0].min() == min(r[0] for r in busy)
                assert cta[b, c, :, 3].max() == max(r[3] for r in busy)


# ---- the kernels in the Mosaic GPU interpreter (CPU) -------------------------------------
def nan_before(k, v, keys):
    """k, v with NaN in keys [0, keys[b]) of each sequence b: blocks no visible key lies in."""
    for b, n in enumerate(keys):
        k, v = k.at[b, :n].set(jnp.nan), v.at[b, :n].set(jnp.nan)
    return k, v


INTERP_PREFILL = [
    # B, T, S, N, K, H, dtype, lengths, offset, window, softcap, alibi, nan_keys
    # (a window given as a numpy int32 is a traced operand, as a model's per-layer one is)
    # W < T, a chunk at 200..327: the CTA streams blocks 2..5, of which warpgroup 0 (rows
    # 200..263) skips 5 and warpgroup 1 (264..327) skips 2 in lockstep; keys < 128 NaN
    (1, 128, 330, 2, 1, 64, jnp.bfloat16, [330], 200, 40, 5.0, False, 128),
    (1, 100, 100, 2, 1, 64, jnp.float16, [90], 0, np.int32(100), None, False, 0),  # W == T
    (1, 128, 128, 2, 1, 64, jnp.bfloat16, [128], 0, 1000, 2.0, True, 0),    # W > S, ALiBi
]


@pytest.mark.parametrize("case", INTERP_PREFILL)
def test_prefill_kernel_interpreted_with_window(case, interpreted):
    B, T, S, N, K, H, dtype, lengths, offset, window, cap, alibi, nan_keys = case
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, dtype, lengths, offset)
    q = q * 2
    slopes = jnp.asarray(SLOPES[:N]) if alibi else None
    mods = {"window": window, "softcap": cap}
    kn, vn = nan_before(k, v, [nan_keys])
    cfg = fa.PrefillConfig(block_q=64, block_kv=64, stages=2)
    def run(q, k, v, pos, kvl, slopes, w):
        return fa.flash_attention(q, k, v, pos, kvl, causal=True, scale=H ** -0.5,
                                  return_lse=True, config=cfg, interpret=True, window=w,
                                  softcap=cap, alibi_slopes=slopes)
    static = isinstance(window, int)
    out, lse = jax.jit(run, static_argnums=(6,) if static else ())(
        q, kn, vn, pos, kvl, slopes, window if static else jnp.int32(window))
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_lse = attention_reference(up(q), up(k), up(v), pos, kvl, causal=True,
                                       scale=H ** -0.5, return_lse=True, alibi_slopes=slopes,
                                       **mods)
    rows = sees_some(pos, kvl, S, True, window)
    assert rel_err(out, ref, rows) < 1e-2
    np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(ref_lse)[rows], atol=2e-3)
    assert not interpreted(), "the interpreter's race detector found a race"


INTERP_DECODE = [
    # B, S, N, K, H, lengths, splits, window, softcap, alibi, mode
    (2, 256, 4, 1, 64, [201, 100], 2, np.int32(70), 4.0, False, None),  # W < length, G = 4
    (2, 128, 2, 2, 64, [1, 128], 1, 128, None, True, None),     # W == length; MHA; ALiBi
    (1, 256, 4, 1, 128, [256], 2, 50, 3.0, False, "int8"),      # quantized cache
]


@pytest.mark.parametrize("case", INTERP_DECODE)
def test_decode_kernel_interpreted_with_window(case, interpreted):
    B, S, N, K, H, lengths, splits, window, cap, alibi, mode = case
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, jnp.bfloat16, lengths)
    q = q * 2
    pos = (kvl - 1)[:, None]
    slopes = jnp.asarray(SLOPES[:N]) if alibi else None
    mods = {"window": window, "softcap": cap}
    nan_keys = [max(n - int(window), 0) // 64 * 64 for n in lengths]  # blocks before the window
    quant = {}
    kf, vf = k, v
    if mode is not None:
        from jaxformer import cache as kvc
        (kc, ks), (vc, vs) = kvc.quantize(k, mode), kvc.quantize(v, mode)
        kf, vf = kvc.dequantize(kc, ks, jnp.float32), kvc.dequantize(vc, vs, jnp.float32)
        k, v = kc, vc
        quant = dict(zip(("k_scale", "v_scale"), nan_before(ks, vs, nan_keys)))
    else:
        k, v = nan_before(k, v, nan_keys)
    def run(q, k, v, pos, kvl, slopes, quant, w):
        return da.decode_attention(q, k, v, pos, kvl, causal=True, scale=H ** -0.5,
                                   return_lse=True, splits=splits, interpret=True,
                                   config=da.DecodeConfig(block_kv=64, stages=2), window=w,
                                   softcap=cap, alibi_slopes=slopes, **quant)
    static = isinstance(window, int)  # else a traced operand, as a model's per-layer one
    out, lse = jax.jit(run, static_argnums=(7,) if static else ())(
        q, k, v, pos, kvl, slopes, quant, window if static else jnp.int32(window))
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_lse = attention_reference(up(q), up(kf), up(vf), pos, kvl, causal=True,
                                       scale=H ** -0.5, return_lse=True, alibi_slopes=slopes,
                                       **mods)
    assert rel_err(out, ref) < 1e-2
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-3)
    assert not interpreted(), "the interpreter's race detector found a race"


# ---- the compiled kernels (Hopper GPU) ---------------------------------------------------
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")

GPU_PREFILL = [
    # B, T, S, N, K, H, dtype, offset, window, softcap, alibi
    (2, 4096, 4096, 16, 8, 128, jnp.bfloat16, 0, 1024, None, False),   # Mistral-like
    (2, 4096, 4096, 8, 4, 128, jnp.bfloat16, 0, 4096, 50.0, False),    # W == T, Gemma cap
    (1, 2048, 2048, 8, 4, 128, jnp.bfloat16, 0, 8192, 50.0, False),    # W > T
    (2, 1000, 1000, 8, 2, 64, jnp.float16, 0, 333, 30.0, False),       # ragged T, odd W
    (2, 512, 3000, 8, 2, 128, jnp.bfloat16, 2488, 700, None, False),   # chunk against a cache
    (2, 2048, 2048, 16, 16, 128, jnp.bfloat16, 0, None, None, True),   # BLOOM-like ALiBi
    (1, 1024, 1024, 8, 8, 64, jnp.bfloat16, 0, 1, None, False),        # W = 1: the diagonal
]


def _mods(window, cap, alibi, N):
    slopes = None
    if alibi:  # BLOOM's slopes for N heads (a power of two)
        slopes = jnp.asarray(2.0 ** (-8.0 * np.arange(1, N + 1) / N), jnp.float32)
    return {"window": window, "softcap": cap}, slopes


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_PREFILL)
def test_prefill_kernel_gpu_with_window(case):
    B, T, S, N, K, H, dtype, offset, window, cap, alibi = case
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, dtype, offset=offset)
    kvl = kvl.at[0].set(S)  # one full sequence, the rest ragged
    mods, slopes = _mods(window, cap, alibi, N)
    poison((B, T, N, H), (B, N, T))
    out, lse = jax.jit(functools.partial(fa.flash_attention, causal=True, scale=H ** -0.5,
                                         return_lse=True, **mods))(q, k, v, pos, kvl,
                                                                   alibi_slopes=slopes)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_lse = jax.jit(functools.partial(
        attention_reference, causal=True, scale=H ** -0.5, return_lse=True, **mods))(
            up(q), up(k), up(v), pos, kvl, alibi_slopes=slopes)
    rows = sees_some(pos, kvl, S, True, window)
    assert rel_err(out, ref, rows) < 1.5e-2
    np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(ref_lse)[rows], atol=2e-2)


GPU_DECODE = [
    # B, S, N, K, H, dtype, window, softcap, alibi, mode
    (8, 8192, 32, 8, 128, jnp.bfloat16, 4096, None, False, None),
    (4, 4096, 16, 8, 128, jnp.bfloat16, 1024, 50.0, False, None),  # Gemma-2-like
    (3, 1000, 8, 1, 64, jnp.float16, 333, 30.0, False, None),      # S padded, MQA
    (2, 16384, 64, 8, 128, jnp.bfloat16, 4096, None, False, None),  # one long sequence each
    (4, 2048, 16, 16, 128, jnp.bfloat16, None, None, True, None),  # ALiBi, MHA
    (4, 8192, 32, 8, 128, jnp.bfloat16, 2048, 50.0, False, "int8"),
    (4, 8192, 32, 8, 128, jnp.bfloat16, 2048, None, False, "fp8"),
]


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_DECODE)
def test_decode_kernel_gpu_with_window(case):
    B, S, N, K, H, dtype, window, cap, alibi, mode = case
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, dtype)
    kvl = kvl.at[0].set(S).at[-1].set(1)
    pos = (kvl - 1)[:, None]
    mods, slopes = _mods(window, cap, alibi, N)
    quant, kf, vf = {}, k, v
    if mode is not None:
        from jaxformer import cache as kvc
        (kc, ks), (vc, vs) = kvc.quantize(k, mode), kvc.quantize(v, mode)
        kf, vf = kvc.dequantize(kc, ks, jnp.float32), kvc.dequantize(vc, vs, jnp.float32)
        k, v, quant = kc, vc, {"k_scale": ks, "v_scale": vs}
    poison((B, K, 64, 64, H))
    out, lse = jax.jit(functools.partial(da.decode_attention, causal=True, scale=H ** -0.5,
                                         return_lse=True, **mods))(
        q, k, v, pos, kvl, alibi_slopes=slopes, **quant)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref, ref_lse = jax.jit(functools.partial(
        attention_reference, causal=True, scale=H ** -0.5, return_lse=True, **mods))(
            up(q), up(kf), up(vf), pos, kvl, alibi_slopes=slopes)
    assert rel_err(out, ref) < 1.5e-2
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)


@gpu
@needs_hopper
@pytest.mark.parametrize("T", [1, 1024])
def test_dispatch_gpu_pallas_with_window_equals_xla(T):
    """attention(backend="pallas") on a tensor=1 mesh-less call and "auto" pick the kernels
    and agree with the xla path."""
    B, S, N, K, H = 4, 2048, 16, 4, 128
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, jnp.bfloat16, offset=S - T)
    kvl = jnp.full((B,), S, jnp.int32)
    if T == 1:
        pos = (kvl - 1)[:, None]
    kw = {"causal": True, "scale": H ** -0.5, "softcap": 50.0}
    want = jax.jit(functools.partial(attn.attention, backend="xla", window=512, **kw))(
        q, k, v, pos, kvl)
    for backend in ("pallas", "auto"):
        got = jax.jit(functools.partial(attn.attention, backend=backend, window=512, **kw))(
            q, k, v, pos, kvl)
        assert rel_err(got, want) < 1.5e-2, backend
        # a traced window (a model's per-layer one): an operand of the same kernels
        got = jax.jit(lambda q, k, v, pos, kvl, w, b=backend: attn.attention(
            q, k, v, pos, kvl, backend=b, window=w, **kw))(q, k, v, pos, kvl, jnp.int32(512))
        assert rel_err(got, want) < 1.5e-2, backend


def test_math_of_soft_cap_log2_matches_tanh():
    """The kernels' exp2 form of C tanh(x / C), in log2 units, over the whole range."""
    x = jnp.linspace(-400.0, 400.0, 20001, dtype=jnp.float32)
    for c in (1.0, 30.0, 50.0):
        got = fa.soft_cap_log2(x * fa.LOG2E, c) / fa.LOG2E
        want = c * np.tanh(np.asarray(x, np.float64) / c)
        np.testing.assert_allclose(np.asarray(got), want, atol=3e-6 * c)
    assert math.isclose(float(fa.soft_cap_log2(jnp.float32(0.0), 5.0)), 0.0, abs_tol=1e-6)


@gpu
@needs_hopper
@pytest.mark.parametrize("extra", [
    dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_positions=128),
    dict(sliding_window=64, layer_types=("sliding", "full"), attn_softcap=30.0),
], ids=["llama3-rope", "sliding-softcap"])
def test_llama3_style_model_same_greedy_tokens_with_kernels_as_with_xla(extra):
    """End to end on the GPU: a Llama-3-style model (llama3 rope scaling past its original
    context; or alternating sliding / full layers with soft-capped scores) generates the
    greedy tokens of the XLA path with the Pallas kernels (prefill over ragged prompts
    longer than the window, decode past it)."""
    import dataclasses

    from flax import nnx

    import jaxformer as jf

    cfg = jf.ModelConfig(vocab_size=256, hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, ffn_size=512, position_embedding="rope",
                         rope_theta=500000.0, norm="rmsnorm", activation="silu",
                         gated_mlp=True, qkv_bias=False, linear_bias=False,
                         max_position_embeddings=1024, **extra)
    ref = jf.Model.random(cfg, dtype="bfloat16", seed=0, attention="xla")
    params = nnx.to_pure_dict(ref.params)
    # wide logit margins, so bf16 rounding differences cannot flip an argmax
    params["embed"]["token"]["embedding"] = params["embed"]["token"]["embedding"] * 20
    ref = jf.Model(cfg, params, ref.mesh, ref.run, ref.rules)
    fast = jf.Model(cfg, params, ref.mesh, dataclasses.replace(ref.run, attention="pallas"),
                    ref.rules)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 70, 200, 300)]
    want = ref.generate(prompts, max_new_tokens=24)
    got = fast.generate(prompts, max_new_tokens=24)
    assert got.tokens == want.tokens
