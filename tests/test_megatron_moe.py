"""conversion.megatron on synthetic megatron-core MoE checkpoints (tests/megatron_moe_fixtures.py)
written with 2 expert-parallel ranks: every expert layout (SequentialMLP, TEGroupedMLP,
grouped GEMM), tensor-parallel experts, a gated shared expert and pre-softmax routing. The
full weights are drawn first and loaded into transformers' Mixtral / Qwen2-MoE (the
unconverted reference computation); after conversion jaxformer's float32 logits must match
them within TOL = 1e-4 on one device and with the experts split over data=2."""
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jaxformer  # noqa: E402
import megatron_fixtures as mf  # noqa: E402
import megatron_moe_fixtures as mmf  # noqa: E402
from conversion.megatron import MegatronConversionError, convert  # noqa: E402

TOL = 1e-4
SPEC = mf.Spec(kind="llama", vocab=250, D=64, L=2, N=4, K=2, F=32, act="swiglu",
               norm="rmsnorm", position="rope", qkv_bias=False, linear_bias=False, tied=False,
               eps=1e-6, rope_theta=5000.0, dtype="float32")
E = 4


def converted(tmp_path, *, layout, tp, shared=False, pre_softmax=False, seed=0):
    Vm = mf.padded_vocab(SPEC.vocab, 16, tp)
    W = mmf.make_moe_weights(SPEC, Vm, E, Fs=48 if shared else 0, seed=seed)
    mmf.write_moe_checkpoint(tmp_path / "src", W, SPEC, E=E, tp=tp, ep=2, layout=layout,
                             shared=shared, pre_softmax=pre_softmax)
    s = convert(tmp_path / "src", tmp_path / "out", progress=False, echo=lambda *a: None,
                true_vocab_size=SPEC.vocab)
    return W, s


def check(out, ref, layouts):
    ids = np.random.default_rng(0).integers(0, SPEC.vocab, (2, 12))
    want = ref(ids)
    for data, rules in layouts:
        mesh = jaxformer.make_mesh(data, 1, 1, devices=jax.devices()[:data])
        got = jaxformer.load(out, mesh=mesh, dtype="float32", rules=rules).logits(ids)
        diff = float(np.abs(got - want).max())
        assert diff <= TOL, f"data={data} {rules}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("layout", ["sequential", "te_grouped"])
def test_mcore_moe_tp2_ep2(tmp_path, layout):
    W, s = converted(tmp_path, layout=layout, tp=2, seed=1)
    c = s["config"]
    assert c["num_experts"] == E and c["experts_per_token"] == 2
    ref = mmf.hf_moe(W, SPEC, E, 2, shared=False, pre_softmax=False)
    check(tmp_path / "out", ref, [(1, "default"), (2, "expert_parallel")])


def test_mcore_moe_grouped_gemm_shared_expert_pre_softmax(tmp_path):
    W, s = converted(tmp_path, layout="grouped", tp=1, shared=True, pre_softmax=True, seed=2)
    c = s["config"]
    assert c["shared_expert_size"] == 48 and c["shared_expert_gate"]
    assert c["router_norm_topk"] is False
    ref = mmf.hf_moe(W, SPEC, E, 2, shared=True, pre_softmax=True)
    check(tmp_path / "out", ref, [(1, "default")])


def test_missing_expert_rank_is_named(tmp_path):
    Vm = mf.padded_vocab(SPEC.vocab, 16, 1)
    W = mmf.make_moe_weights(SPEC, Vm, E)
    mmf.write_moe_checkpoint(tmp_path / "src", W, SPEC, E=E, tp=1, ep=2, layout="sequential",
                             shared=False, pre_softmax=False)
    import shutil
    shutil.rmtree(tmp_path / "src" / "iter_0000100" / "mp_rank_00_001")
    with pytest.raises(MegatronConversionError, match="expert"):
        convert(tmp_path / "src", tmp_path / "out", progress=False, echo=lambda *a: None)
