"""Packed rows (varseqlen): attention `spans` keep each sequence of a row to itself, in the
flash prefill kernel (Mosaic GPU interpreter on CPU; the real kernel on a Hopper GPU) and
the dispatch, against the pure-jnp reference with the same spans."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer as jf
from jaxformer.kernels import attention as attn
from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels.reference import attention_mask, attention_reference


def packed_problem(T, N, K, H, dtype, segments, seed=0):
    """One row of T tokens holding sequences of the given lengths back to back (the rest
    padding): q, k, v, positions (restarting), kv_lengths, spans (lo, lim)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s, np.float32).astype(jnp.dtype(dtype)))
               for s in ((1, T, N, H), (1, T, K, H), (1, T, K, H)))
    pos, lo, lim = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32), \
        np.full((1, T), -1, np.int32)
    o = 0
    for n in segments:
        pos[0, o:o + n], lo[0, o:o + n], lim[0, o:o + n] = np.arange(n), o, o + n - 1
        o += n
    assert o <= T
    return q, k, v, jnp.asarray(pos), jnp.asarray([o], jnp.int32), (jnp.asarray(lo),
                                                                     jnp.asarray(lim))


@functools.partial(jax.jit, static_argnames=("scale",))
def f32_reference(q, k, v, pos, kvl, spans, scale):
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    return attention_reference(up(q), up(k), up(v), pos, kvl, causal=False, scale=scale,
                               spans=spans)


def check(out, ref, pos, kvl, spans, T, tol):
    rows = np.asarray(attention_mask(pos, kvl, T, False, spans=spans).any(-1))
    out, ref = np.asarray(out, np.float32)[rows], np.asarray(ref, np.float32)[rows]
    assert np.all(np.isfinite(out))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol


# segments cross 64-row tiles and 64-key blocks; one sequence of 1 token; padding at the end
SEGMENTS = [37, 63, 1, 89]


def test_flash_kernel_with_spans_interpreted(interpreted):
    T, H = 200, 64
    q, k, v, pos, kvl, spans = packed_problem(T, 2, 1, H, jnp.bfloat16, SEGMENTS)
    cfg = fa.PrefillConfig(block_q=64, block_kv=64, stages=2)
    out = jax.jit(functools.partial(fa.flash_attention, causal=False, scale=H ** -0.5,
                                    config=cfg, interpret=True))(q, k, v, pos, kvl,
                                                                 spans=spans)
    check(out, f32_reference(q, k, v, pos, kvl, spans, H ** -0.5), pos, kvl, spans, T, 1e-2)
    assert not interpreted(), "the interpreter's race detector found a race"


def test_dispatch_with_spans_on_cpu():
    T, H = 48, 16
    q, k, v, pos, kvl, spans = packed_problem(T, 4, 2, H, jnp.float32, [20, 3, 17])
    out = attn.attention(q, k, v, pos, kvl, causal=False, scale=0.25, backend="xla",
                         spans=spans)
    check(out, f32_reference(q, k, v, pos, kvl, spans, 0.25), pos, kvl, spans, T, 1e-6)
    with pytest.raises(ValueError, match="spans must be two"):
        attn.attention(q, k, v, pos, kvl, causal=False, scale=0.25, backend="xla",
                       spans=(spans[0][:, :5], spans[1]))


def _hopper() -> bool:
    return any(attn.is_hopper(d) for d in jax.devices())


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("backend", ["pallas", "cudnn"])
def test_packed_attention_gpu(backend):
    rng = np.random.default_rng(1)
    segments = rng.integers(1, 384, 40).tolist()
    T = 2048
    segments = segments[:int(np.searchsorted(np.cumsum(segments), T))]
    q, k, v, pos, kvl, spans = packed_problem(T, 12, 12, 64, jnp.float16, segments)
    out = attn.attention(q, k, v, pos, kvl, causal=False, scale=0.125, backend=backend,
                         spans=spans)
    check(out, f32_reference(q, k, v, pos, kvl, spans, 0.125), pos, kvl, spans, T, 1.5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")
def test_embed_packed_equals_padded_through_the_kernel_gpu():
    """BERT-base shapes in bf16 with random weights: the flash kernel takes head_dim 64,
    so packed (spans) and padded (lengths) both run it; the embeddings agree."""
    cfg = jf.ModelConfig.from_preset("bert-base").replace(num_layers=2)
    model = jf.Model.random(cfg, dtype="bfloat16", attention="pallas")
    rng = np.random.default_rng(2)
    rows = [rng.integers(1000, 30000, n).tolist() for n in rng.integers(2, 300, 24)]
    padded = model.embed(rows, normalize=True)
    packed = model.embed(rows, normalize=True, packed=True)
    ref = jf.Model.random(cfg, dtype="float32", attention="xla").embed(rows, normalize=True)
    assert np.abs(padded - ref).max() < 3e-2
    assert np.abs(packed - ref).max() < 3e-2


def test_sharded_wrapper_shards_spans_with_the_rows():
    """The kernels' shard_map hands each data shard its own rows' spans."""
    from jaxformer import sharding
    from jaxformer.sharding import make_mesh
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    mesh = make_mesh(data=2, pipe=1, tensor=2, devices=jax.devices()[:4])
    parts = [packed_problem(24, 4, 2, 8, jnp.float32, segs, seed=i)
             for i, segs in enumerate([[5, 19], [11, 2, 7]])]
    q, k, v, pos, kvl = (jnp.concatenate([p[j] for p in parts]) for j in range(5))
    spans = tuple(jnp.concatenate([p[5][j] for p in parts]) for j in range(2))
    seen = []

    def fn(q, k, v, pos, kvl, layer=None, span_lo=None, span_lim=None):
        seen.append((q.shape, span_lo.shape))
        return attention_reference(q, k, v, pos, kvl, causal=False, scale=0.3,
                                   spans=(span_lo, span_lim))

    with sharding.use(mesh, {}):
        out = jax.jit(lambda *a: attn._sharded(fn, *a[:5], spans=a[5:]))(q, k, v, pos, kvl,
                                                                           *spans)
    ref = attention_reference(q, k, v, pos, kvl, causal=False, scale=0.3, spans=spans)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert seen == [((1, 24, 2, 8), (1, 24))]  # a row and its spans per data shard
