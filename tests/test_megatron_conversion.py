"""conversion.megatron on synthetic Megatron-LM checkpoints of every layout.

Fixtures: tests/megatron_fixtures.py.

Each fixture's full weights are drawn first, loaded into an independent float32 reference
(transformers' GPT2LMHeadModel / LlamaForCausalLM / MegatronBertForPreTraining, or
megatron_fixtures.reference_logits, a plain torch forward written from MEGATRON_FORMAT.md §6
for the numerics transformers lacks), then split into Megatron files as Megatron stores them.
After conversion, jaxformer's float32 logits must equal the reference's to max abs diff
<= TOL = 1e-4 (logit magnitudes here are ~5-20). Weights stored in fp16/bf16 are rounded before
the reference sees them, so those conversions are exact too.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jaxformer  # noqa: E402
import megatron_fixtures as mf  # noqa: E402
from conversion.megatron import MegatronConversionError, convert  # noqa: E402

TOL = 1e-4
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def ids_for(spec, B=2, T=12, seed=0):
    return np.random.default_rng(seed).integers(0, spec.vocab, (B, T))


def run_convert(src, out, **kw):
    return convert(src, out, progress=False, echo=lambda *a: None, **kw)


def load(out, data=1, pipe=1, tensor=1):
    mesh = jaxformer.make_mesh(data, pipe, tensor, devices=jax.devices()[: data * pipe * tensor])
    return jaxformer.load(out, mesh=mesh, dtype="float32")


def params(out) -> dict:
    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().restore(Path(out).absolute() / "params")
    flat = {}

    def walk(d, p=""):
        for k, v in d.items():
            walk(v, f"{p}{k}/") if isinstance(v, dict) else flat.__setitem__(p + k, np.asarray(v))
    walk(tree)
    return flat


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].shape == pb[k].shape, k
        np.testing.assert_array_equal(pa[k].astype(np.float32), pb[k].astype(np.float32), err_msg=k)


def check_logits(out, ref, spec, meshes=((1, 1, 1),)):
    """Logits on each (data, pipe, tensor) mesh equal the reference's. Meshes with pipe > 1
    come last: if the runtime (not the converter) cannot run them, the test is xfailed."""
    ids = ids_for(spec)
    want = ref(ids)
    for data, pipe, tensor in sorted(meshes, key=lambda m: m[1]):
        try:
            got = load(out, data, pipe, tensor).logits(ids, attention_mask=None)
        except Exception as e:
            if pipe == 1:
                raise
            pytest.xfail(f"jaxformer runtime cannot run pipe={pipe} x tensor={tensor} yet: "
                         f"{type(e).__name__}: {str(e)[:200]}")
        assert got.shape == want.shape
        err = np.abs(got - want).max()
        assert err <= TOL, f"mesh data={data} pipe={pipe} tensor={tensor}: max abs diff {err}"


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory):
    return mf.write_gpt2_vocab(tmp_path_factory.mktemp("gpt2tok"))


# ---- legacy GPT --------------------------------------------------------------------------------
GPT2 = mf.Spec()  # learned positions, LayerNorm, exact GeLU, biases, tied; vocab 257


@pytest.fixture(scope="module")
def v0_gpt(tmp_path_factory):
    Vm = mf.padded_vocab(GPT2.vocab, 128, 2)
    W = mf.make_weights(GPT2, Vm, seed=1)
    root = tmp_path_factory.mktemp("v0")
    mf.write_torch_checkpoint(root / "src", W, GPT2, scheme="v0", version=0, tp=2, pp=1,
                              divisor=128)
    return root, W


def test_v0_gpt_tp2(v0_gpt, gpt2_tok, tmp_path):
    """checkpoint_version absent: `transformer`/`attention` names, strided (3, np_r, hn) QKV."""
    root, W = v0_gpt
    s = run_convert(root / "src", tmp_path / "out", vocab_file=gpt2_tok[0],
                    merges_file=gpt2_tok[1])
    assert s["config"]["vocab_size"] == 257 and "activation" not in s["config"]  # exact GeLU
    model = load(tmp_path / "out")
    assert model.tokenizer is not None and model.tokenizer.vocab_size == 257
    check_logits(tmp_path / "out", mf.hf_gpt2(W, GPT2), GPT2, meshes=[(1, 1, 1), (1, 1, 2)])
    emb = params(tmp_path / "out")["embed/token/embedding"]
    assert emb.shape == (384, 64) and not emb[257:].any()  # Megatron's padding rows dropped


@pytest.fixture(scope="module")
def v0_ref(v0_gpt):
    root, _ = v0_gpt
    run_convert(root / "src", root / "out_ref", true_vocab_size=257)
    return root / "out_ref"


@pytest.mark.parametrize("version", [1, 2])
def test_qkv_versions_agree(v0_gpt, v0_ref, tmp_path, version):
    """The same weights stored as version 1.0 (np_r, hn, 3) and 2.0 (np_r, 3, hn) QKV rows
    convert to the parameters of the version-0 checkpoint."""
    _, W = v0_gpt
    mf.write_torch_checkpoint(tmp_path / "src", W, GPT2, scheme="v2021" if version == 2 else "v0",
                              version=version, tp=2, pp=1, divisor=128)
    run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=257)
    assert_same_params(v0_ref, tmp_path / "out")


@pytest.mark.filterwarnings("ignore:.*old \\(pre-1.6\\) torch format")
def test_v0_old_torch_format_without_args(v0_gpt, v0_ref, tmp_path):
    """2019-era files: torch's pre-1.6 serialization and stripped args (NGC release files);
    the head count then comes from an override."""
    _, W = v0_gpt
    mf.write_torch_checkpoint(tmp_path / "src", W, GPT2, scheme="v0", version=0, tp=2, pp=1,
                              divisor=128, args=False, old_format=True)
    with pytest.raises(MegatronConversionError, match="num-attention-heads"):
        run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=257)
    run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=257,
                overrides={"num_heads": GPT2.N})
    assert_same_params(v0_ref, tmp_path / "out")


GPT2_TANH = mf.Spec(act="gelu_tanh", dtype="float16")  # bias_gelu_fusion: tanh GeLU; fp16 files


@pytest.fixture(scope="module")
def v3_gpt(tmp_path_factory):
    Vm = mf.padded_vocab(GPT2_TANH.vocab, 128, 2)
    W = mf.make_weights(GPT2_TANH, Vm, seed=2)
    root = tmp_path_factory.mktemp("v3")
    mf.write_torch_checkpoint(root / "src", W, GPT2_TANH, scheme="v2021", version=3, tp=2, pp=2,
                              divisor=128)
    run_convert(root / "src", root / "out", true_vocab_size=257, dtype="float32")
    return root, W


def test_v3_gpt_tp2_pp2(v3_gpt):
    """encoder/self_attention names, TP=2 x PP=2 with stage-local layer numbers, the tied head
    copy (word_embeddings_for_head) on the last stage, padded vocab, fp16 source."""
    root, W = v3_gpt
    cfg = json.loads((root / "out" / "config.json").read_text())
    assert cfg["activation"] == "gelu_tanh" and cfg["tie_embeddings"]
    check_logits(root / "out", mf.hf_gpt2(W, GPT2_TANH), GPT2_TANH,
                 meshes=[(1, 1, 1), (1, 1, 2), (1, 2, 2)])


def test_v3_gpt_virtual_pipeline(v3_gpt, tmp_path):
    """VP=2 (model0/model1 chunks, stage 0 = layers [0], [2]; stage 1 = [1], [3]) converts to
    the same parameters; the source dtype (fp16) is kept by default."""
    root, W = v3_gpt
    mf.write_torch_checkpoint(tmp_path / "src", W, GPT2_TANH, scheme="v2021", version=3, tp=2,
                              pp=2, vp=2, divisor=128)
    s = run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=257)
    assert s["dtype"] == "float16" and "VP=2" in s["source"]
    assert_same_params(root / "out", tmp_path / "out")


def test_keep_vocab_padding(v3_gpt, tmp_path):
    """--keep-vocab-padding keeps Megatron's 512 rows (257 padded to a multiple of 128 x TP 2)
    verbatim; logits stay masked to the true 257."""
    root, W = v3_gpt
    run_convert(root / "src", tmp_path / "out", true_vocab_size=257, keep_vocab_padding=True,
                dtype="float32")
    cfg = jaxformer.checkpoint.read_config(tmp_path / "out")
    assert cfg.vocab_size == 257 and cfg.padded_vocab_size == W["word"].shape[0] == 512
    np.testing.assert_array_equal(params(tmp_path / "out")["embed/token/embedding"], W["word"])
    ids = ids_for(GPT2_TANH)
    np.testing.assert_allclose(load(tmp_path / "out").logits(ids),
                               load(root / "out").logits(ids), atol=1e-5)


# ---- post-2023-09 legacy (LLaMA-style) ----------------------------------------------------------
LLAMA = mf.Spec(kind="llama", vocab=250, N=4, K=2, act="swiglu", norm="rmsnorm", position="rope",
                qkv_bias=False, linear_bias=False, tied=False, eps=1e-6, rope_theta=5000.0,
                dtype="bfloat16")


def test_legacy_2023_llama_style(tmp_path):
    """input_norm/post_attention_norm/final_norm, norm_epsilon, SwiGLU with per-rank [W_r; V_r],
    no biases, GQA (4 heads, 2 groups), untied output_layer, RoPE, bf16 source."""
    Vm = mf.padded_vocab(LLAMA.vocab, 16, 2)
    W = mf.make_weights(LLAMA, Vm, seed=3)
    mf.write_torch_checkpoint(tmp_path / "src", W, LLAMA, scheme="v2023", version=3, tp=2, pp=1)
    s = run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=250)
    c = s["config"]
    assert (c["num_kv_heads"], c["activation"], c["norm"], c["gated_mlp"], c["norm_eps"]) == \
        (2, "silu", "rmsnorm", True, 1e-6)
    assert s["dtype"] == "bfloat16"
    check_logits(tmp_path / "out", mf.hf_llama(W, LLAMA), LLAMA, meshes=[(1, 1, 1), (1, 1, 2)])


# ---- legacy BERT --------------------------------------------------------------------------------
BERT = mf.Spec(kind="bert", vocab=300)


@pytest.mark.parametrize("scheme", ["v2021", "v2023"])
def test_legacy_bert(tmp_path, scheme):
    """tokentype embeddings, pooler, lm_head (lm_head.layernorm in 2021, lm_head.norm from
    2023-09), binary head; TP=2; WordPiece vocab.txt gives the true vocabulary."""
    Vm = mf.padded_vocab(BERT.vocab, 128, 2)
    W = mf.make_weights(BERT, Vm, seed=4)
    mf.write_torch_checkpoint(tmp_path / "src", W, BERT, scheme=scheme, version=3, tp=2, pp=1,
                              divisor=128)
    vocab_txt = mf.write_wordpiece_vocab(tmp_path / "tok", BERT.vocab)
    s = run_convert(tmp_path / "src", tmp_path / "out", vocab_txt=vocab_txt)
    c = s["config"]
    assert c["arch"] == "encoder" and c["pooler"] and c["mlm_head"] and c["binary_head"]
    rng = np.random.default_rng(5)
    ids = rng.integers(0, BERT.vocab, (2, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    types = (np.arange(10)[None] >= 5).astype(np.int64).repeat(2, 0)
    ref = mf.hf_bert(W, BERT)
    hidden, pooled, _, nsp = ref(ids, mask, types)
    mlm = ref(ids, mask, np.zeros_like(types))[2]  # Model.logits takes no token types
    for tensor in (1, 2):
        model = load(tmp_path / "out", tensor=tensor)
        h, p = model.encode(ids, mask, types)
        valid = mask.astype(bool)
        assert np.abs(h - hidden)[valid].max() <= TOL
        assert np.abs(p - pooled).max() <= TOL
        logits = model.logits(ids, mask)
        assert np.abs(logits - mlm)[valid].max() <= TOL
    pr = params(tmp_path / "out")
    got_nsp = p @ pr["binary_head/kernel"] + pr["binary_head/bias"]
    assert np.abs(got_nsp - nsp).max() <= TOL


# ---- megatron-core torch format -----------------------------------------------------------------
def test_mcore_te_names(tmp_path):
    """decoder.layers.N with Transformer-Engine names (norms fused into linear_qkv/linear_fc1),
    empty io.BytesIO _extra_state, TP=2 x PP=2, tied head copy as output_layer.weight on the
    last stage, apply_layernorm_1p (stored weight = gamma - 1)."""
    spec = mf.Spec(layernorm_1p=True)
    Vm = mf.padded_vocab(spec.vocab, 128, 2)
    W = mf.make_weights(spec, Vm, seed=6)
    mf.write_torch_checkpoint(tmp_path / "src", W, spec, scheme="mcore_te", version=3, tp=2, pp=2,
                              divisor=128)
    s = run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=spec.vocab)
    assert "megatron-core" in s["source"] and s["config"].get("tie_embeddings", True)
    check_logits(tmp_path / "out", mf.hf_gpt2(W, spec), spec, meshes=[(1, 1, 1), (1, 2, 2)])


def test_mcore_local_spec(tmp_path):
    """Local-spec names (input_layernorm, pre_mlp_layernorm), uint8-tensor _extra_state,
    SwiGLU + GQA + untied head, TP=2."""
    Vm = mf.padded_vocab(LLAMA.vocab, 16, 2)
    W = mf.make_weights(LLAMA, Vm, seed=7)
    mf.write_torch_checkpoint(tmp_path / "src", W, LLAMA, scheme="mcore_local", version=3, tp=2,
                              pp=1, extra_state="uint8")
    run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=LLAMA.vocab)
    check_logits(tmp_path / "out", mf.hf_llama(W, LLAMA), LLAMA)


@pytest.mark.parametrize("scaling,factor", [("llama3", 8.0), ("linear", 4.0)])
def test_mcore_qk_layernorm_and_rope_scaling(tmp_path, scaling, factor):
    """megatron-core --qk-layernorm (RMSNorm over H of q and k before rope) with
    --use-rope-scaling (Llama 3.1's scaling; factor from --rope-scaling-factor) or
    --rotary-seq-len-interpolation-factor (positions / f); the reference is transformers'
    Qwen3 with that rope_type. The scaled reference differs from the unscaled one by far
    more than TOL, so the scaling is really tested."""
    import dataclasses
    spec = dataclasses.replace(LLAMA, qk_norm=True, rope_scaling=scaling, rope_factor=factor,
                               rope_theta=1e6, dtype="float32")
    Vm = mf.padded_vocab(spec.vocab, 16, 2)
    W = mf.make_weights(spec, Vm, seed=9)
    mf.write_torch_checkpoint(tmp_path / "src", W, spec, scheme="mcore_local", version=3, tp=2,
                              pp=1)
    c = run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=spec.vocab)["config"]
    assert c["qk_norm"] and c["rope_scaling"] == scaling and c["rope_factor"] == factor
    ref = mf.hf_llama(W, spec)
    ids = ids_for(spec)
    plain = mf.hf_llama(W, dataclasses.replace(spec, rope_scaling="none"))(ids)
    assert np.abs(plain - ref(ids)).max() > 100 * TOL
    check_logits(tmp_path / "out", ref, spec, meshes=[(1, 1, 1), (1, 1, 2)])


# ---- torch_dist ---------------------------------------------------------------------------------
@pytest.mark.parametrize("per_layer_keys", [False, True], ids=["stacked", "per-layer-keys"])
def test_torch_dist_single_process(tmp_path, per_layer_keys):
    """DCP written without a process group: stacked [L, ...] keys at global shape (or the
    per-layer decoder.layers.{g}.* keys of heterogeneous models), SwiGLU fc1 stored as
    [W_all; V_all], args in common.pt, metadata.json, tracker one level up, optimizer tensors
    and ShardedObject bytes that must be skipped."""
    spec = LLAMA
    Vm = mf.padded_vocab(spec.vocab, 16, 2)
    W = mf.make_weights(spec, Vm, seed=8)
    mf.write_torch_dist(tmp_path / "src", W, spec, tp=2, per_layer_keys=per_layer_keys)
    s = run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=spec.vocab)
    assert s["source"].startswith("torch_dist")
    check_logits(tmp_path / "out", mf.hf_llama(W, spec), spec, meshes=[(1, 1, 1), (1, 1, 2)])


def test_torch_dist_two_gloo_ranks(tmp_path):
    """DCP written by two gloo processes, each saving its tensor-parallel shards."""
    spec = GPT2
    Vm = mf.padded_vocab(spec.vocab, 16, 2)
    W = mf.make_weights(spec, Vm, seed=9)
    np.savez(tmp_path / "w.npz", **W)
    (tmp_path / "spec.json").write_text(json.dumps(spec.__dict__))
    r = subprocess.run([sys.executable, str(TESTS / "megatron_fixtures.py"), "dist2",
                        str(tmp_path / "w.npz"), str(tmp_path / "spec.json"),
                        str(tmp_path / "src")], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "src" / "iter_0000100").glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]
    run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=spec.vocab)
    check_logits(tmp_path / "out", mf.hf_gpt2(W, spec), spec, meshes=[(1, 1, 2)])


# ---- any partitioning gives the same parameters -------------------------------------------------
GQA = mf.Spec(kind="llama", vocab=250, N=8, K=4, act="swiglu", norm="rmsnorm", position="rope",
              tied=False, eps=1e-6)  # biases on: de-interleaved SwiGLU biases too


def test_partitionings_identical(tmp_path):
    """The same weights split TP=1, TP=2 and TP=4 x PP=2 (padded vocab 256, 256, 512) convert
    to identical parameters; the TP=4 x PP=2 one loads on pipe=2 x tensor=2."""
    W512 = mf.make_weights(GQA, 512, seed=10)
    outs = []
    for tp, pp in ((1, 1), (2, 1), (4, 2)):
        Vm = mf.padded_vocab(GQA.vocab, 128, tp)
        W = dict(W512, word=W512["word"][:Vm], out=W512["out"][:Vm])
        src, out = tmp_path / f"src{tp}x{pp}", tmp_path / f"out{tp}x{pp}"
        mf.write_torch_checkpoint(src, W, GQA, scheme="v2023", version=3, tp=tp, pp=pp,
                                  divisor=128)
        run_convert(src, out, true_vocab_size=GQA.vocab)
        outs.append(out)
    assert_same_params(outs[0], outs[1])
    assert_same_params(outs[0], outs[2])
    # the other ways to name the input: one model_optim_rng.pt, a release/ folder
    single = tmp_path / "src1x1" / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt"
    run_convert(single, tmp_path / "out_file", true_vocab_size=GQA.vocab)
    assert_same_params(outs[0], tmp_path / "out_file")
    W = dict(W512, word=W512["word"][:256], out=W512["out"][:256])
    mf.write_torch_checkpoint(tmp_path / "rel", W, GQA, scheme="v2023", version=3, tp=2, pp=1,
                              divisor=128, release=True)
    run_convert(tmp_path / "rel", tmp_path / "out_rel", true_vocab_size=GQA.vocab)
    assert_same_params(outs[0], tmp_path / "out_rel")
    check_logits(outs[2], lambda ids: mf.reference_logits(W512, GQA, ids), GQA,
                 meshes=[(1, 2, 2)])


# ---- numerics transformers has no model for -----------------------------------------------------
NUMERICS = {
    "rope-half-squared-relu-residual-from-norm": mf.Spec(
        vocab=250, position="rope", rope_fraction=0.5, act="squared_relu",
        residual_from_norm=True),
    "rope-interleaved-gelu-tanh-layernorm-1p": mf.Spec(
        vocab=250, position="rope", rope_interleaved=True, rope_theta=500.0, act="gelu_tanh",
        layernorm_1p=True, tied=False),
}


@pytest.mark.parametrize("name", list(NUMERICS))
def test_megatron_numerics(tmp_path, name):
    """rotary_percent, rotary_interleaved, rotary_base, squared ReLU, tanh GeLU,
    apply_residual_connection_post_layernorm, apply_layernorm_1p against the §6 reference."""
    spec = NUMERICS[name]
    Vm = mf.padded_vocab(spec.vocab, 16, 2)
    W = mf.make_weights(spec, Vm, seed=11)
    mf.write_torch_checkpoint(tmp_path / "src", W, spec, scheme="v2023", version=3, tp=2, pp=1)
    run_convert(tmp_path / "src", tmp_path / "out", true_vocab_size=spec.vocab)
    check_logits(tmp_path / "out", lambda ids: mf.reference_logits(W, spec, ids), spec,
                 meshes=[(1, 1, 2)])


def test_reference_matches_transformers(v0_gpt):
    """The §6 reference agrees with transformers where both apply (so it can stand in)."""
    _, W = v0_gpt
    ids = ids_for(GPT2)
    assert np.abs(mf.reference_logits(W, GPT2, ids) - mf.hf_gpt2(W, GPT2)(ids)).max() <= 1e-4
    W2 = mf.make_weights(LLAMA, 256, seed=3)
    ids = ids_for(LLAMA)
    assert np.abs(mf.reference_logits(W2, LLAMA, ids) - mf.hf_llama(W2, LLAMA)(ids)).max() <= 1e-4


# ---- bad input ----------------------------------------------------------------------------------
@pytest.fixture
def small_ckpt(v0_gpt, tmp_path):
    _, W = v0_gpt
    mf.write_torch_checkpoint(tmp_path / "src", W, GPT2, scheme="v2021", version=3, tp=2, pp=1,
                              divisor=128)
    return tmp_path / "src" / "iter_0000100"


def _expect_error(src, out, pattern):
    with pytest.raises(MegatronConversionError, match=pattern):
        run_convert(src, out, true_vocab_size=257)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # nothing that looks like a checkpoint


def _rewrite(path, fn):
    with mf.fake_megatron():
        sd = torch.load(path, weights_only=False)
        fn(sd)
        torch.save(sd, path)


def test_missing_rank_file(small_ckpt, tmp_path):
    (small_ckpt / "mp_rank_01" / "model_optim_rng.pt").unlink()
    _expect_error(small_ckpt.parent, tmp_path / "out", r"mp_rank_01.*model_optim_rng\.pt")


def test_missing_rank_dir_per_args(small_ckpt, tmp_path):
    shutil.rmtree(small_ckpt / "mp_rank_01")
    _expect_error(small_ckpt, tmp_path / "out", r"mp_rank_01.*missing rank file")


def test_truncated_rank_file(small_ckpt, tmp_path):
    f = small_ckpt / "mp_rank_01" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_error(small_ckpt, tmp_path / "out", r"mp_rank_01/model_optim_rng\.pt.*truncated")


def test_mismatched_shapes_across_ranks(small_ckpt, tmp_path):
    key = "layers.1.mlp.dense_4h_to_h.weight"

    def cut(sd):
        block = sd["model"]["language_model"]["encoder"]
        block[key] = block[key][:, :-8].clone()
    _rewrite(small_ckpt / "mp_rank_01" / "model_optim_rng.pt", cut)
    _expect_error(small_ckpt, tmp_path / "out",
                  r"mp_rank_01/model_optim_rng\.pt \[language_model\.encoder\.layers\.1\.mlp\."
                  r"dense_4h_to_h\.weight\].*disagrees")


def test_unknown_key(small_ckpt, tmp_path):
    def add(sd):
        sd["model"]["language_model"]["encoder"]["layers.0.mystery.weight"] = torch.ones(3)
    for r in (0, 1):
        _rewrite(small_ckpt / f"mp_rank_{r:02d}" / "model_optim_rng.pt", add)
    _expect_error(small_ckpt, tmp_path / "out", r"mp_rank_00.*layers\.0\.mystery\.weight.*unknown")


def test_unsupported_version(small_ckpt, tmp_path):
    _rewrite(small_ckpt / "mp_rank_00" / "model_optim_rng.pt",
             lambda sd: sd.__setitem__("checkpoint_version", 4.0))
    _expect_error(small_ckpt, tmp_path / "out", r"mp_rank_00.*unsupported checkpoint_version 4")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", tmp_path / "out", "not a Megatron checkpoint")


# ---- streaming: peak RSS ------------------------------------------------------------------------
BIG = mf.Spec(vocab=1000, D=1024, L=10, N=16, F=4096, P=64)  # 10 x 48 MiB layers: 486 MiB fp32
LAYER_MB = 48
STREAM_BOUND_MB = 3 * LAYER_MB  # the conversion's own working set: ~one merged layer, twice


def _child(code, *args, timeout=300):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": f"{REPO}:{TESTS}",
                            "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_peak_rss_streaming(tmp_path):
    """Convert a 486 MiB (fp32) TP=2 checkpoint with the CLI in a child process that has
    already imported everything (jax, torch, orbax: ~0.4-0.8 GiB), then reset its RSS
    high-water mark (/proc/self/clear_refs). While layers are read, merged and written, the peak
    RSS (VmHWM; getrusage's ru_maxrss cannot be reset: exiting threads latch it) stays within
    STREAM_BOUND_MB = 3 layers of the RSS at the start,
    i.e. well under the model; the whole run, including CheckpointWriter's final orbax save,
    must stay under half the model over the start."""
    _child("""
        import json, sys, megatron_fixtures as mf
        spec = mf.Spec(**json.loads(sys.argv[2]))
        W = mf.make_weights(spec, 1024, seed=12)
        mf.write_torch_checkpoint(sys.argv[1], W, spec, scheme="v2021", version=3, tp=2, pp=1,
                                  divisor=128)
    """, tmp_path / "src", json.dumps(BIG.__dict__))
    model_mb = sum(f.stat().st_size for f in (tmp_path / "src").rglob("*.pt")) / 2**20
    out = _child("""
        import json, resource, runpy, sys
        import jax, jax.numpy as jnp, torch, orbax.checkpoint, tqdm, conversion.megatron
        import jaxformer.checkpoint, jaxformer.tokenizer, jaxformer.models
        from conversion.megatron.driver import peak_rss_mb  # VmHWM
        jnp.zeros(1).block_until_ready()
        imports_mb = peak_rss_mb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
        start_mb = peak_rss_mb()
        sys.argv = ["conversion.megatron", *sys.argv[1:]]
        try:
            runpy.run_module("conversion.megatron", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        ru_maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"imports_mb": imports_mb, "start_mb": start_mb,
                          "peak_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb}))
    """, "--input", tmp_path / "src", "--output", tmp_path / "out", "--true-vocab-size", 1000,
                 "--no-progress")
    r = json.loads(out.splitlines()[-1])
    start, total = r["start_mb"], r["peak_mb"]
    streaming = float(re.search(r"\(([\d,.]+) MiB before the final save\)", out).group(1)
                      .replace(",", ""))
    print(f"model {model_mb:.0f} MiB; child RSS after imports {start:.0f} MiB (import peak "
          f"{r['imports_mb']:.0f}); peak while streaming {streaming:.0f} MiB "
          f"(+{streaming - start:.0f}); peak overall {total:.0f} MiB (+{total - start:.0f}); "
          f"ru_maxrss {r['ru_maxrss_mb']:.0f} MiB")
    assert model_mb > 450
    assert (tmp_path / "out" / "config.json").exists()
    assert streaming - start <= STREAM_BOUND_MB, (streaming, start)
    # the final save writes chunk by chunk (CHUNK_BYTES = 16 MiB), so the whole run stays
    # under half the model over the start, whatever the model's size
    assert total - start <= model_mb / 2, (total, start, model_mb)
