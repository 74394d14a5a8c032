"""Quantized models served: meshes, checkpoints, the CLI, the Megatron converter and the
memory plan (jaxformer.quant; the numerics are tests/test_quant.py).

- Meshes: quantized logits on tensor=2, pipe=2 x tensor=2, data=2 x tensor=2 equal one
  device's; scales sharded like their weights; calibration on a pipe mesh equals one device's.
- Save / load, converters and CLI with --quantize, memory plan, and the errors.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer as jf
from jaxformer import cli, memory
from jaxformer.config import RunConfig
from jaxformer.quant import ops, params as qp
from jaxformer.quant.spec import parse

sys.path.insert(0, os.path.dirname(__file__))
from quant_fixtures import F32, float_checkpoint, mesh  # noqa: E402,F401

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
        padded = tuple(sspec) + (None,) * (ndim - len(tuple(sspec)))
        if "tensor" in padded[ndim - contract:]:  # K-minor: the group axes come last
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


def test_recalibration_reaches_compiled_calls(tiny):
    """Compiled entry points take the params as a flat tuple built once (engine.ParamsJit):
    calibrating again after a call changes the next call's logits, to those of a model
    calibrated on the same prompts before any call."""
    _, models = tiny
    ids = np.concatenate([IDS, IDS[::-1]])  # 96 rows: past ops.SMALL_M, act scales in use
    model = jf.load(models["fp8"][0])
    before = model.logits(ids)
    prompts = [[7, 7, 7, 7], [99, 98, 97]]
    model.calibrate(prompts)
    fresh = jf.load(models["fp8"][0])
    fresh.calibrate(prompts)
    after = model.logits(ids)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_array_equal(after, fresh.logits(ids))


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


def test_quantization_record_layout(tiny, tmp_path):
    """A quantization.json without a layout: int8 loads (always K-minor), int4 (stored in the
    float layout before the field existed) is refused with how to redo it; an unknown
    layout is refused too."""
    import json
    import shutil
    from jaxformer.checkpoint import CheckpointError
    for name in ("int8", "int4-g32"):
        old = tmp_path / name
        shutil.copytree(tiny[1][name][0], old)
        (old / "quantization.json").write_text(json.dumps({"quantize": name}))
        if name == "int8":
            assert np.abs(jf.load(old).logits(IDS) - tiny[1][name][1]).max() == 0.0
        else:
            with pytest.raises(CheckpointError, match="float layout; quantize the float"):
                jf.load(old)
        (old / "quantization.json").write_text(json.dumps({"quantize": name,
                                                           "layout": "n-minor"}))
        with pytest.raises(CheckpointError, match="unknown quantized layout 'n-minor'"):
            jf.load(old)


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
    assert cli.main(["info", "--preset", "llama-7b", "--quantize", "int8", "--dtype",
                     "bfloat16"]) == 0
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
    assert ", int8, mesh" in captured.err and "=== prompt 0" in captured.out
    assert cli.main(["generate", "--checkpoint", str(tiny[0]), "--quantize", "fp8",
                     "--prompt", "x", "--max-new-tokens", "2"]) == 2  # no tokenizer: ids only
    assert "string prompts need a tokenizer" in capsys.readouterr().err
    assert cli.main(["generate", "--quantize", "int5", "--max-new-tokens", "2"]) == 2
    assert "--quantize: must be None or one of" in capsys.readouterr().err
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
