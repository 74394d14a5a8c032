"""Attention kernels against the reference, and the dispatch.

CPU: the dispatch (xla/auto/errors), the mask-as-data bounds, the decode combine, the
shard_map wrapper on 8 emulated devices, and both Mosaic GPU kernels in the Mosaic GPU
interpreter (jax's CPU simulation of TMA copies, barriers and warpgroups, with its race
detector and NaN-filled memory) on tiny shapes. GPU (`-m gpu`, Hopper only): the compiled
kernels on many shapes, ragged lengths, GQA ratios, both dtypes and head dims, with the
output memory poisoned first.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxformer.kernels import attention as attn
from jaxformer.kernels import decode_attention as da
from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels.reference import attention_mask, attention_reference

_seed = iter(range(10_000, 1_000_000))


def rand(shape, dtype=jnp.float32):
    """Fresh standard-normal values (numpy: no per-shape jax compile on CPU)."""
    x = np.random.default_rng(next(_seed)).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(x.astype(jnp.dtype(dtype)))


def rel_err(out, ref, rows=None):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if rows is not None:  # compare only rows [B, T] that see at least one key
        out, ref = out[rows], ref[rows]
    assert np.all(np.isfinite(out)), "non-finite output (unwritten or NaN)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def visible_rows(q_positions, kv_lengths, S, causal):
    """[B, T] bool: query rows that see at least one key."""
    mask = attention_mask(q_positions, kv_lengths, S, causal).any(-1)
    return np.broadcast_to(np.asarray(mask), q_positions.shape)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "return_lse"))
def f32_reference(q, k, v, pos, kvl, causal, scale, return_lse=False):
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    return attention_reference(up(q), up(k), up(v), pos, kvl, causal=causal, scale=scale,
                               return_lse=return_lse)


def problem(B, T, S, N, K, H, dtype, lengths=None, offset=0):
    q, k, v = rand((B, T, N, H), dtype), rand((B, S, K, H), dtype), rand((B, S, K, H), dtype)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + offset, (B, T)).astype(jnp.int32)
    if lengths is None:
        lengths = np.random.default_rng(next(_seed)).integers(1, S + 1, size=B)
    return q, k, v, pos, jnp.asarray(lengths, jnp.int32)


# ---- dispatch (CPU) ----------------------------------------------------------------------
@pytest.mark.parametrize("B,T,S,N,K,H,causal", [(2, 7, 7, 4, 2, 16, True),
                                                (3, 1, 33, 8, 1, 32, False)])
def test_xla_backend_equals_reference(B, T, S, N, K, H, causal):
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, jnp.float32)
    kw = {"causal": causal, "scale": 1 / math.sqrt(H)}
    out = jax.jit(functools.partial(attn.attention, backend="xla", **kw))(q, k, v, pos, kvl)
    ref = jax.jit(functools.partial(attention_reference, **kw))(q, k, v, pos, kvl)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="CPU behaviour")
def test_auto_on_cpu_is_reference_and_logs_once(caplog):
    q, k, v, pos, kvl = problem(2, 5, 5, 4, 2, 16, jnp.bfloat16)
    attn._logged.clear()
    kw = {"causal": True, "scale": 0.25}
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        out = jax.jit(functools.partial(attn.attention, backend="auto", **kw))(q, k, v, pos, kvl)
        jax.jit(functools.partial(attn.attention, backend="auto", **kw))(  # traced again
            q[:, :4], k[:, :4], v[:, :4], pos[:, :4], kvl)
    ref = jax.jit(functools.partial(attention_reference, **kw))(q, k, v, pos, kvl)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    msgs = [r.getMessage() for r in caplog.records if "uses xla" in r.getMessage()]
    assert len(msgs) == 1 and "Hopper" in msgs[0]


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="CPU behaviour")
@pytest.mark.parametrize("backend", ["pallas", "cudnn"])
def test_explicit_gpu_backend_on_cpu_raises(backend):
    q, k, v, pos, kvl = problem(1, 4, 4, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match=backend):
        attn.attention(q, k, v, pos, kvl, causal=True, scale=0.1, backend=backend)


def test_unknown_backend_raises():
    q, k, v, pos, kvl = problem(1, 4, 4, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="must be one of"):
        attn.attention(q, k, v, pos, kvl, causal=True, scale=0.1, backend="triton")


@pytest.mark.parametrize("dtype,H,match", [(jnp.float32, 64, "float32"),
                                           (jnp.bfloat16, 96, "head_dim 96"),
                                           (jnp.float16, 256, "head_dim 256")])
def test_kernel_support_checks_name_the_problem(dtype, H, match):
    q, k, v = rand((1, 8, 4, H), dtype), rand((1, 8, 2, H), dtype), rand((1, 8, 2, H), dtype)
    assert match in fa.check_supported(q, k, v)
    assert match in da.check_supported(q[:, :1], k, v)
    with pytest.raises(ValueError, match=match):
        fa.flash_attention(q, k, v, jnp.zeros((1, 8), jnp.int32), jnp.ones((1,), jnp.int32),
                           causal=True, scale=1.0)
    assert fa.check_supported(q.astype(jnp.bfloat16)[..., :64], k.astype(jnp.bfloat16)[..., :64],
                              v.astype(jnp.bfloat16)[..., :64]) is None


# ---- masks as data (CPU) -----------------------------------------------------------------
@pytest.mark.parametrize("causal,bq,bk", [(True, 64, 128), (False, 64, 64)])
def test_tile_bounds_cover_exactly_the_visible_keys(causal, bq, bk):
    rng = np.random.default_rng(next(_seed))
    B, T, S = 3, 4 * bq, 5 * bk
    pos = np.sort(rng.integers(-3, S + 5, size=(B, T)), axis=1).astype(np.int32)
    pos[0] = np.arange(T)  # the prefill layout
    kvl = np.array([S, 1, rng.integers(0, S)], np.int32)
    lim = fa.visible_limit(jnp.asarray(pos), jnp.asarray(kvl), S, causal)
    steps, full = map(np.asarray, fa.tile_bounds(lim, bq, bk))
    mask = np.broadcast_to(np.asarray(attention_mask(jnp.asarray(pos), jnp.asarray(kvl), S,
                                                     causal)), (B, T, S))
    np.testing.assert_array_equal(mask, np.arange(S)[None, None] <= np.asarray(lim)[..., None])
    for b in range(B):
        for t in range(T // bq):
            m = mask[b, t * bq:(t + 1) * bq]
            cols = np.nonzero(m.any(0))[0]
            want_steps = 0 if cols.size == 0 else cols.max() // bk + 1
            assert steps[b, t] == want_steps
            assert 0 <= full[b, t] <= steps[b, t]
            assert m[:, :full[b, t] * bk].all()  # unmasked blocks really are fully visible


def _np_lse(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis, keepdims=True))).squeeze(axis)


def test_decode_combine_equals_one_softmax():
    B, K, P_, G, H, S = 2, 3, 4, 5, 16, 40
    s = np.asarray(rand((B, K, G, S)), np.float64) * 3
    vals = np.asarray(rand((B, K, S, H)), np.float64)
    chunks = np.array_split(np.arange(S), P_)
    o = np.zeros((B, K, P_, 8, H))  # partial rows padded to 8, as the kernel writes them
    lse2 = np.full((B, K, P_, 64), np.nan)
    for p, c in enumerate(chunks):
        lse = _np_lse(s[..., c])
        o[:, :, p, :G] = np.einsum("bkgs,bksh->bkgh", np.exp(s[..., c] - lse[..., None]),
                                   vals[:, :, c])
        lse2[:, :, p, :G] = lse / math.log(2)
    lse2[1, 2, 3], o[1, 2, 3] = -np.inf, 0.0  # an empty split contributes nothing
    keep = np.ones(S, bool)
    keep[chunks[3]] = False
    out, lse = jax.jit(da.combine, static_argnums=2)(jnp.asarray(o, jnp.float32),
                                                      jnp.asarray(lse2, jnp.float32), G)
    s12 = s.copy()
    s12[1, 2][:, ~keep] = -np.inf
    full_lse = _np_lse(s12)
    ref = np.einsum("bkgs,bksh->bkgh", np.exp(s12 - full_lse[..., None]), vals)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), full_lse, rtol=1e-5, atol=1e-5)
    # a row with no keys in any split: output 0 and lse -inf, never NaN
    lse2[0, 1, :, :G] = -np.inf
    o[0, 1] = 0.0
    out, lse = jax.jit(da.combine, static_argnums=2)(jnp.asarray(o, jnp.float32),
                                                      jnp.asarray(lse2, jnp.float32), G)
    assert np.all(np.asarray(out)[0, 1] == 0) and np.all(np.asarray(lse)[0, 1] == -np.inf)
    # one split: its normalised partial and its lse, converted to natural log
    out1, lse1 = da.combine(jnp.asarray(o[:, :, :1], jnp.float32),
                            jnp.asarray(lse2[:, :, :1], jnp.float32), G)
    np.testing.assert_array_equal(np.asarray(out1), o[:, :, 0, :G].astype(np.float32))
    np.testing.assert_allclose(np.asarray(lse1), lse2[:, :, 0, :G] * math.log(2), rtol=1e-6)


def test_choose_splits_fills_one_wave():
    assert da.choose_splits(1, 8, 32768, 128, sms=132) == 16
    assert da.choose_splits(8, 8, 32768, 128, sms=132) == 2
    assert da.choose_splits(64, 8, 32768, 128, sms=132) == 1
    assert da.choose_splits(1, 8, 384, 128, sms=132) == 3  # never more splits than blocks
    assert da.choose_splits(1, 8, 256, 128, sms=132) == 1  # too short to pay for a merge


# ---- shard_map wrapper (CPU, 8 emulated devices) ----------------------------------------
def _mesh(data, pipe, tensor):
    from jaxformer.sharding import make_mesh
    if jax.device_count() < data * pipe * tensor:
        pytest.skip(f"needs {data * pipe * tensor} devices")
    return make_mesh(data=data, pipe=pipe, tensor=tensor,
                     devices=jax.devices()[:data * pipe * tensor])


@pytest.mark.parametrize("K", [4, 1])
def test_sharded_wrapper_matches_unsharded(K):
    from jaxformer import sharding
    mesh = _mesh(2, 2, 2)
    B, T, N, H = 4, 6, 4, 8
    q, k, v, pos, kvl = problem(B, T, T, N, K, H, jnp.float32)
    seen = []

    def fn(q, k, v, pos, kvl, layer=None):  # per shard: the reference, recording shapes
        seen.append((q.shape, k.shape))
        return attention_reference(q, k, v, pos, kvl, causal=True, scale=0.3)

    with sharding.use(mesh, {}):
        out = jax.jit(lambda *a: attn._sharded(fn, *a))(q, k, v, pos, kvl)
    ref = attention_reference(q, k, v, pos, kvl, causal=True, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    (qs, ks), = seen
    assert qs == (B // 2, T, N // 2, H)            # batch on data, heads on tensor
    assert ks[2] == (K // 2 if K % 2 == 0 else 1)  # kv heads split, or the one needed


def test_sharded_wrapper_inside_pipe_shard_map():
    from jaxformer import sharding
    mesh = _mesh(2, 2, 2)
    q, k, v, pos, kvl = problem(4, 5, 5, 4, 2, 8, jnp.float32)
    fn = functools.partial(attention_reference, causal=True, scale=0.5)

    def stage(q, k, v, pos, kvl):
        return attn._sharded(lambda *a: fn(*a[:5]), q, k, v, pos, kvl)
    with sharding.use(mesh, {}):
        out = jax.jit(jax.shard_map(stage, mesh=mesh, in_specs=P(), out_specs=P(),
                                    axis_names={"pipe"}, check_vma=False))(q, k, v, pos, kvl)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fn(q, k, v, pos, kvl)), rtol=1e-6,
                               atol=1e-6)


# ---- the kernels in the Mosaic GPU interpreter (CPU): the `interpreted` fixture (conftest) --
INTERP_PREFILL = [
    # B, T, S, N, K, H, dtype, causal, lengths, offset
    (1, 100, 100, 2, 1, 64, jnp.bfloat16, False, [77], 0),     # T, S not block multiples; GQA 2
    (1, 64, 300, 1, 1, 128, jnp.float16, True, [290], 200),    # causal chunk at positions 200+
]


@pytest.mark.parametrize("case", INTERP_PREFILL)
def test_prefill_kernel_interpreted(case, interpreted):
    B, T, S, N, K, H, dtype, causal, lengths, offset = case
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, dtype, lengths, offset)
    cfg = fa.PrefillConfig(block_q=64, block_kv=64, stages=2)
    out, lse = jax.jit(functools.partial(fa.flash_attention, causal=causal, scale=H ** -0.5,
                                         return_lse=True, config=cfg, interpret=True))(
        q, k, v, pos, kvl)
    ref, ref_lse = f32_reference(q, k, v, pos, kvl, causal, H ** -0.5, return_lse=True)
    rows = visible_rows(pos, kvl, S, causal)
    assert rel_err(out, ref, rows) < 1e-2
    np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(ref_lse)[rows], atol=2e-3)
    assert not interpreted(), "the interpreter's race detector found a race"


def _stacked(k, layer, L, dtype):
    """k [B, S, K, H] placed at `layer` of a fresh random [L, B, S, K, H] stack."""
    stack = rand((L,) + k.shape, dtype)
    return stack.at[layer].set(k)


@pytest.mark.parametrize("mesh_sizes", [None, (2, 1, 2), (1, 1, 4)])
def test_stacked_cache_layer_equals_its_slice(mesh_sizes):
    """attention(layer=l) over a stacked [L, B, S, K, H] cache == attention over layer l."""
    from jaxformer import sharding
    B, S, N, K, H, L = 4, 24, 8, 4, 16, 3
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, jnp.float32)
    pos = (kvl - 1)[:, None]
    ks, vs = _stacked(k, 1, L, jnp.float32), _stacked(v, 1, L, jnp.float32)
    run = jax.jit(lambda q, k, v, p, n, l: attn.attention(q, k, v, p, n, causal=True,
                                                          scale=0.25, backend="auto", layer=l))
    if mesh_sizes is None:
        out = run(q, ks, vs, pos, kvl, jnp.int32(1))
    else:
        with sharding.use(_mesh(*mesh_sizes), {}):
            out = run(q, ks, vs, pos, kvl, jnp.int32(1))
    ref = attention_reference(q, k, v, pos, kvl, causal=True, scale=0.25)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_sharded_wrapper_passes_the_layer_and_the_stack():
    from jaxformer import sharding
    mesh = _mesh(2, 1, 2)
    B, N, K, H, S, L = 4, 4, 2, 8, 10, 3
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, jnp.float32)
    pos = (kvl - 1)[:, None]
    ks, vs = _stacked(k, 2, L, jnp.float32), _stacked(v, 2, L, jnp.float32)
    seen = []

    def fn(q, k, v, pos, kvl, layer):  # per shard: read the layer, record local shapes
        seen.append(k.shape)
        return attention_reference(q, k[layer], v[layer], pos, kvl, causal=True, scale=0.3)

    with sharding.use(mesh, {}):
        out = jax.jit(lambda *a: attn._sharded(fn, *a))(q, ks, vs, pos, kvl, jnp.int32(2))
    ref = attention_reference(q, k, v, pos, kvl, causal=True, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert seen == [(L, B // 2, S, K // 2, H)]  # the stack, batch on data, kv heads on tensor


@pytest.mark.parametrize("mesh_sizes,local_kv", [((2, 1, 2), 1), ((1, 1, 4), 1)])
def test_sharded_wrapper_shards_a_quantized_caches_scales_with_its_codes(mesh_sizes,
                                                                           local_kv):
    """The scales [L, B, S, K] travel with the codes: batch on data, kv heads on tensor, or
    (tensor 4 > K 2) each shard's own kv head picked out of both; per shard the reference
    over codes and scales equals the unsharded one."""
    from jaxformer import cache as kvc
    from jaxformer import sharding
    B, N, K, H, S, L = 4, 8, 2, 8, 10, 3
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, jnp.float32)
    pos = (kvl - 1)[:, None]
    stack = [_stacked(a, 2, L, jnp.float32) for a in (k, v)]
    (kc, ksc), (vc, vsc) = (kvc.quantize(a, "int8") for a in stack)
    seen = []

    def fn(q, k, v, pos, kvl, layer, k_scale, v_scale):
        seen.append((k.shape, k_scale.shape, v_scale.shape))
        return attention_reference(q, k[layer], v[layer], pos, kvl, causal=True, scale=0.3,
                                   k_scale=k_scale[layer], v_scale=v_scale[layer])

    with sharding.use(_mesh(*mesh_sizes), {}):
        out = jax.jit(lambda q, k, v, p, n, l, a, b: attn._sharded(fn, q, k, v, p, n, l,
                                                                   (a, b)))(
            q, kc, vc, pos, kvl, jnp.int32(2), ksc, vsc)
    ref = attention_reference(q, kc[2], vc[2], pos, kvl, causal=True, scale=0.3,
                              k_scale=ksc[2], v_scale=vsc[2])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    b_local = B // mesh_sizes[0]
    assert seen == [((L, b_local, S, local_kv, H), (L, b_local, S, local_kv),
                     (L, b_local, S, local_kv))]


def test_write_layer_touches_only_the_new_entries():
    from jaxformer import cache as kvc
    L, B, S, K, H, T = 3, 2, 8, 2, 4, 2
    stack = rand((L, B, S, K, H))
    new = rand((B, T, K, H))
    start = jnp.asarray([1, 5], jnp.int32)
    got = np.asarray(jax.jit(kvc.write_layer)(stack, new, jnp.int32(2), kvc.Write.at(start)))
    want = np.asarray(stack).copy()
    for b, s0 in enumerate([1, 5]):
        want[2, b, s0:s0 + T] = np.asarray(new)[b]
    np.testing.assert_array_equal(got, want)
    one = np.asarray(jax.jit(kvc.write_layer)(stack[:, 1:], new[1:], jnp.int32(1),
                                              kvc.Write.at(start[1:])))
    want1 = np.asarray(stack)[:, 1:].copy()
    want1[1, 0, 5:5 + T] = np.asarray(new)[1]  # a batch of one: the plain-update path
    np.testing.assert_array_equal(one, want1)
    got0 = np.asarray(jax.jit(kvc.write_layer)(stack, new, jnp.int32(0), kvc.Write.prefill()))
    want0 = np.asarray(stack).copy()
    want0[0, :, :T] = np.asarray(new)
    np.testing.assert_array_equal(got0, want0)
    # a prefill of one chunk of rows: rows [1, 2) of the cache
    got1 = np.asarray(jax.jit(kvc.write_layer)(stack, new[:1], jnp.int32(1),
                                               kvc.Write.prefill(1)))
    want1 = np.asarray(stack).copy()
    want1[1, 1, :T] = np.asarray(new)[0]
    np.testing.assert_array_equal(got1, want1)


def test_cache_put_rows_copies_rows_into_slots():
    """KVCache.put_rows (the Engine's insert): b rows of a shorter cache land in the named
    rows, slots [0, S'), codes and scales alike; every other entry is untouched."""
    from jaxformer import cache as kvc
    L, B, S, K, H, Sp = 2, 4, 8, 2, 4, 4
    dst = kvc.KVCache(rand((L, B, S, K, H)), rand((L, B, S, K, H)), rand((L, B, S, K)),
                      rand((L, B, S, K)), "int8")
    src = kvc.KVCache(rand((L, 2, Sp, K, H)), rand((L, 2, Sp, K, H)), rand((L, 2, Sp, K)),
                      rand((L, 2, Sp, K)), "int8")
    got = jax.jit(lambda d, s: d.put_rows(s, jnp.asarray([3, 0])))(dst, src)
    assert got.quant == "int8"
    for f in ("k", "v", "k_scale", "v_scale"):
        want = np.asarray(getattr(dst, f)).copy()
        want[:, 3, :Sp] = np.asarray(getattr(src, f))[:, 0]
        want[:, 0, :Sp] = np.asarray(getattr(src, f))[:, 1]
        np.testing.assert_array_equal(np.asarray(getattr(got, f)), want)


INTERP_DECODE = [
    # B, S, N, K, H, dtype, lengths, splits, block_kv
    (1, 256, 4, 1, 64, jnp.bfloat16, [201], 2, 64),    # G = 4, ragged tail block, 2 splits
    (2, 128, 2, 2, 128, jnp.float16, [1, 128], 1, 64),  # MHA, a length-1 sequence
]


@pytest.mark.parametrize("case", INTERP_DECODE)
def test_decode_kernel_interpreted(case, interpreted):
    B, S, N, K, H, dtype, lengths, splits, bk = case
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, dtype, lengths)
    pos = (kvl - 1)[:, None]
    out, lse = jax.jit(functools.partial(
        da.decode_attention, causal=True, scale=H ** -0.5, return_lse=True, splits=splits,
        config=da.DecodeConfig(block_kv=bk, stages=2), interpret=True))(q, k, v, pos, kvl)
    ref, ref_lse = f32_reference(q, k, v, pos, kvl, True, H ** -0.5, return_lse=True)
    assert rel_err(out, ref) < 1e-2
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-3)
    assert not interpreted(), "the interpreter's race detector found a race"


def test_decode_kernel_interpreted_reads_one_layer_of_the_stack(interpreted):
    """The stacked-cache path: layer 1 of 3, the other layers NaN (a read of them shows)."""
    B, S, N, K, H, dtype = 2, 128, 2, 1, 64, jnp.bfloat16
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, dtype, [70, 128])
    pos = (kvl - 1)[:, None]
    nan = jnp.full((3, B, S, K, H), jnp.nan, dtype)
    ks, vs = nan.at[1].set(k), nan.at[1].set(v)
    out = jax.jit(functools.partial(
        da.decode_attention, causal=True, scale=H ** -0.5, splits=1,
        config=da.DecodeConfig(block_kv=64, stages=2), interpret=True))(
            q, ks, vs, pos, kvl, layer=jnp.int32(1))
    ref = f32_reference(q, k, v, pos, kvl, True, H ** -0.5)
    assert rel_err(out, ref) < 1e-2
    assert not interpreted(), "the interpreter's race detector found a race"


# ---- the compiled kernels (Hopper GPU) ---------------------------------------------------
def _hopper():
    devs = jax.devices()
    return bool(devs) and attn.is_hopper(devs[0])


def quantized_problem(B, S, N, K, H, mode, lengths, layers=1, layer=0):
    """q, the quantized stacked cache (codes [L, B, S, K, H] and scales [L, B, S, K], other
    layers NaN-scaled so a read of them shows), pos, kvl, and the float32 reference: the
    attention over the dequantized layer."""
    from jaxformer import cache as kvc
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, jnp.bfloat16, lengths)
    (kc, ks), (vc, vs) = kvc.quantize(k, mode), kvc.quantize(v, mode)
    pos = (kvl - 1)[:, None]
    ref = f32_reference(q, kvc.dequantize(kc, ks, jnp.float32),
                        kvc.dequantize(vc, vs, jnp.float32), pos, kvl, True, H ** -0.5)

    def stack(a, fill):
        return jnp.full((layers,) + a.shape, fill, a.dtype).at[layer].set(a)
    return (q, stack(kc, 0), stack(vc, 0), stack(ks, jnp.nan), stack(vs, jnp.nan), pos, kvl,
            ref)


INTERP_QUANT_DECODE = [
    # B, S, N, K, H, mode, lengths, splits, block_kv
    (1, 256, 4, 1, 128, "int8", [201], 2, 64),   # G = 4, ragged tail block, 2 splits
    (2, 128, 2, 2, 128, "fp8", [1, 128], 1, 64),  # MHA, a length-1 sequence
]


@pytest.mark.parametrize("case", INTERP_QUANT_DECODE)
def test_decode_kernel_interpreted_reads_a_quantized_cache(case, interpreted):
    """Codes and per-key scales streamed, dequantized in shared memory; layer 1 of a stack
    whose other layers have NaN scales; against attention over the dequantized cache."""
    B, S, N, K, H, mode, lengths, splits, bk = case
    q, kc, vc, ks, vs, pos, kvl, ref = quantized_problem(B, S, N, K, H, mode, lengths,
                                                         layers=2, layer=1)
    out = jax.jit(functools.partial(
        da.decode_attention, causal=True, scale=H ** -0.5, splits=splits,
        config=da.DecodeConfig(block_kv=bk, stages=2), interpret=True))(
            q, kc, vc, pos, kvl, layer=jnp.int32(1), k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < 1e-2
    assert not interpreted(), "the interpreter's race detector found a race"


def test_decode_kernel_refuses_what_it_cannot_read_from_a_quantized_cache():
    q, kc, vc, ks, vs, pos, kvl, _ = quantized_problem(1, 128, 2, 1, 128, "int8", [5])
    with pytest.raises(ValueError, match="k_scale and v_scale go together"):
        da.decode_attention(q, kc[0], vc[0], pos, kvl, causal=True, scale=1.0, k_scale=ks[0])
    with pytest.raises(ValueError, match="head_dim 128 or 256"):
        da.decode_attention(q[..., :64], kc[0, ..., :64], vc[0, ..., :64], pos, kvl,
                            causal=True, scale=1.0, k_scale=ks[0], v_scale=vs[0])
    with pytest.raises(ValueError, match="without head_dim"):
        da.decode_attention(q, kc[0], vc[0], pos, kvl, causal=True, scale=1.0,
                            k_scale=ks[0, :, :64], v_scale=vs[0, :, :64])


gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")


def poison(*shapes):
    """Fill and free device memory with NaN, so a kernel output that reuses it and is not
    fully written shows up as NaN."""
    for shape in shapes:
        x = jnp.full(shape, jnp.nan, jnp.float32)
        x.block_until_ready()
        x.delete()


GPU_PREFILL = [
    # B, T, S, N, K, H, dtype, causal, offset
    (2, 128, 128, 4, 4, 128, jnp.bfloat16, True, 0),
    (3, 200, 200, 8, 2, 128, jnp.bfloat16, True, 0),      # GQA 4, T not a block multiple
    (2, 1000, 1000, 4, 1, 64, jnp.float16, True, 0),      # MQA, head_dim 64
    (1, 1, 1, 2, 2, 64, jnp.bfloat16, True, 0),           # T == S == 1 via the prefill kernel
    (2, 333, 333, 16, 2, 64, jnp.bfloat16, False, 0),     # non-causal, GQA 8
    (2, 384, 384, 4, 2, 128, jnp.float16, False, 0),
    (2, 128, 700, 4, 2, 128, jnp.bfloat16, True, 500),    # chunked prefill against a cache
    (1, 2048, 2048, 8, 8, 128, jnp.bfloat16, True, 0),
    (1, 4096, 4096, 2, 1, 64, jnp.float16, True, 0),
]


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_PREFILL)
def test_prefill_kernel_gpu(case):
    B, T, S, N, K, H, dtype, causal, offset = case
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, dtype, offset=offset)
    kvl = kvl.at[0].set(S)  # one full sequence, the rest ragged
    poison((B, T, N, H), (B, N, T))
    out, lse = jax.jit(functools.partial(fa.flash_attention, causal=causal, scale=H ** -0.5,
                                         return_lse=True))(q, k, v, pos, kvl)
    ref, ref_lse = f32_reference(q, k, v, pos, kvl, causal, H ** -0.5, return_lse=True)
    rows = visible_rows(pos, kvl, S, causal)
    assert rel_err(out, ref, rows) < 1.5e-2
    np.testing.assert_allclose(np.asarray(lse)[rows], np.asarray(ref_lse)[rows], atol=2e-2)


GPU_DECODE = [
    # B, S, N, K, H, dtype, splits
    (1, 4096, 32, 8, 128, jnp.bfloat16, None),
    (3, 1000, 8, 1, 64, jnp.float16, None),      # MQA G = 8, S not a multiple of 128
    (8, 2048, 16, 16, 128, jnp.bfloat16, 3),     # MHA, odd split count
    (5, 777, 12, 4, 64, jnp.bfloat16, 7),        # S padded to 64
    (2, 8192, 64, 8, 128, jnp.float16, None),    # G = 8
    (64, 512, 32, 8, 128, jnp.bfloat16, None),
]


@gpu
@needs_hopper
@pytest.mark.parametrize("case", GPU_DECODE)
def test_decode_kernel_gpu(case):
    B, S, N, K, H, dtype, splits = case
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, dtype)
    kvl = kvl.at[0].set(S).at[-1].set(1)
    pos = (kvl - 1)[:, None]
    poison((B, K, 64, 64, H))
    out, lse = jax.jit(functools.partial(da.decode_attention, causal=True, scale=H ** -0.5,
                                         return_lse=True, splits=splits))(q, k, v, pos, kvl)
    ref, ref_lse = f32_reference(q, k, v, pos, kvl, True, H ** -0.5, return_lse=True)
    assert rel_err(out, ref) < 1.5e-2
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)


@gpu
@needs_hopper
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("case", [(4, 4096, 32, 8, 128), (2, 1000, 16, 16, 128),
                                  (1, 16384, 64, 8, 128)])
def test_decode_kernel_gpu_quantized_cache(case, mode):
    """GQA and MHA, a ragged length, a long single sequence (split), layer 2 of a stack whose
    other layers have NaN scales, against attention over the dequantized cache."""
    B, S, N, K, H = case
    q, kc, vc, ks, vs, pos, kvl, ref = quantized_problem(B, S, N, K, H, mode, None,
                                                         layers=3, layer=2)
    poison((B, K, 64, 64, H))
    out = jax.jit(functools.partial(da.decode_attention, causal=True, scale=H ** -0.5))(
        q, kc, vc, pos, kvl, layer=jnp.int32(2), k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < 1.5e-2


@gpu
@needs_hopper
@pytest.mark.parametrize("S", [4096, 1000])
def test_decode_kernel_gpu_stacked_cache(S):
    """Layer 2 of a [4, B, S, K, H] stack with NaN in every other layer."""
    B, N, K, H, dtype = 4, 32, 8, 128, jnp.bfloat16
    q, k, v, _, kvl = problem(B, 1, S, N, K, H, dtype)
    pos = (kvl - 1)[:, None]
    nan = jnp.full((4, B, S, K, H), jnp.nan, dtype)
    ks, vs = nan.at[2].set(k), nan.at[2].set(v)
    out = jax.jit(functools.partial(da.decode_attention, causal=True, scale=H ** -0.5))(
        q, ks, vs, pos, kvl, layer=jnp.int32(2))
    ref = f32_reference(q, k, v, pos, kvl, True, H ** -0.5)
    assert rel_err(out, ref) < 1.5e-2


@gpu
@needs_hopper
@pytest.mark.parametrize("backend", ["pallas", "cudnn", "auto"])
@pytest.mark.parametrize("T", [1, 256, 300])
def test_dispatch_gpu_backends(backend, T):
    B, S, N, K, H = 2, (T if T > 1 else 640), 8, 2, 128
    q, k, v, pos, kvl = problem(B, T, S, N, K, H, jnp.bfloat16)
    if T == 1:
        pos = (kvl - 1)[:, None]
    out = jax.jit(functools.partial(attn.attention, causal=True, scale=H ** -0.5,
                                    backend=backend))(q, k, v, pos, kvl)
    ref = f32_reference(q, k, v, pos, kvl, True, H ** -0.5)
    assert rel_err(out, ref, visible_rows(pos, kvl, S, True)) < 1.5e-2


@gpu
@needs_hopper
def test_dispatch_gpu_float32_falls_back_or_raises():
    q, k, v, pos, kvl = problem(1, 8, 8, 2, 2, 64, jnp.float32)
    out = attn.attention(q, k, v, pos, kvl, causal=True, scale=0.1, backend="auto")
    ref = attention_reference(q, k, v, pos, kvl, causal=True, scale=0.1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with pytest.raises(ValueError, match="float32"):
        attn.attention(q, k, v, pos, kvl, causal=True, scale=0.1, backend="pallas")


@gpu
@needs_hopper
def test_model_greedy_tokens_same_with_kernels_as_with_reference():
    """End to end: prefill (flash kernel, ragged prompts) and decode (flash-decoding over the
    ragged cache) give the greedy tokens of the reference backend."""
    import dataclasses

    from flax import nnx

    import jaxformer as jf

    cfg = jf.ModelConfig(vocab_size=256, hidden_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, ffn_size=512, position_embedding="rope",
                         norm="rmsnorm", activation="silu", gated_mlp=True, qkv_bias=False,
                         linear_bias=False, max_position_embeddings=512)
    ref = jf.Model.random(cfg, dtype="bfloat16", seed=0, attention="xla")
    params = nnx.to_pure_dict(ref.params)
    # wide logit margins, so bf16 rounding differences cannot flip an argmax
    params["embed"]["token"]["embedding"] = params["embed"]["token"]["embedding"] * 20
    ref = jf.Model(cfg, params, ref.mesh, ref.run, ref.rules)
    fast = jf.Model(cfg, params, ref.mesh, dataclasses.replace(ref.run, attention="pallas"),
                    ref.rules)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 70, 130, 257)]
    want = ref.generate(prompts, max_new_tokens=24)
    got = fast.generate(prompts, max_new_tokens=24)
    assert got.tokens == want.tokens
    ids = np.asarray([prompts[2]])
    np.testing.assert_allclose(fast.logits(ids), ref.logits(ids), atol=0.15, rtol=0.02)
