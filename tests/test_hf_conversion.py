"""conversion.hf against Hugging Face transformers (PyTorch, float32, CPU, random weights).

Every family is built in transformers with random, non-trivial weights (norm scales and biases
randomised too: HF initialises them to 1 and 0), saved with save_pretrained, converted with
conversion.hf and loaded with jaxformer.load on several meshes. Logits (and, for BERT, hidden
states and pooled outputs) must match transformers' to max abs diff <= 1e-4 at the valid
positions of right-padded batches.

bfloat16: weights and activations in bfloat16 (norms, softmax and logits accumulate in
float32) stay within BF16_TOL = 0.15 (max abs diff) of transformers' float32 logits, whose
magnitude here is ~1-5 (std ~1); the measured difference is ~0.05-0.06
(gpt2 0.049, llama 0.062, bert 0.047).
"""
import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jaxformer as jf  # noqa: E402
from conversion import hf as conv  # noqa: E402
from jaxformer.checkpoint import CheckpointError  # noqa: E402
from conftest import randomize  # noqa: E402

TOL = 1e-4
BF16_TOL = 0.15
VOCAB = 1000
MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4)]  # (data, tensor); pipe = 1
MESH_IDS = [f"data{d}-tensor{t}" for d, t in MESHES]


def mesh(data=1, tensor=1):
    return jf.make_mesh(data=data, pipe=1, tensor=tensor, devices=jax.devices()[: data * tensor])


def batch(vocab=VOCAB, seed=0, B=4, T=11, types=False):
    """Right-padded ids [B, T], attention_mask [B, T] (rows of lengths T, T-3, 5, 1)."""
    rng = np.random.RandomState(seed)
    lengths = np.array([T, T - 3, 5, 1][:B])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask, rng.randint(0, vocab, (B, T)), 0)
    if types:
        return ids, mask, np.where(mask, rng.randint(0, 2, (B, T)), 0)
    return ids, mask


def hf_forward(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                        for k, v in kw.items()})


def assert_close(ours, ref, mask, tol=TOL, what="logits"):
    valid = np.asarray(mask).astype(bool)
    ours, ref = np.asarray(ours), np.asarray(ref, dtype=np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.isfinite(ours[valid]).all(), what
    diff = float(np.abs(ours[valid] - ref[valid]).max())
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol}"
    return diff


def save_and_convert(model, root, name, *, bin_file=False, shard=None, extra=None, args=()):
    src = root / name
    if bin_file:
        src.mkdir()
        model.config.save_pretrained(src)
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    else:
        model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    for fname, text in (extra or {}).items():
        (src / fname).write_text(text)
    out = root / f"{name}_jf"
    assert conv.main(["--input", str(src), "--output", str(out), *args]) == 0
    return src, out


# ---- models (built and converted once per module) ----------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def gpt2(root):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=8, vocab_size=VOCAB,
                                  n_positions=64, bos_token_id=0, eos_token_id=0)
    model = randomize(transformers.GPT2LMHeadModel(cfg), 0)
    src, out = save_and_convert(model, root, "gpt2")
    return model, src, out


@pytest.fixture(scope="module")
def llama(root):
    """GQA with 16 query heads over 8 kv heads (G = 2), so every mesh up to tensor=8 divides
    it; saved as sharded safetensors with an index."""
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=8,
                                   vocab_size=VOCAB, max_position_embeddings=64,
                                   rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=1,
                                   eos_token_id=2)
    model = randomize(transformers.LlamaForCausalLM(cfg), 1)
    src, out = save_and_convert(model, root, "llama", shard="200KB")
    assert (src / "model.safetensors.index.json").is_file()
    return model, src, out


@pytest.fixture(scope="module")
def llama_small(root):
    """GQA 4 heads / 2 kv heads (G = 2), from a pytorch_model.bin."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB, max_position_embeddings=64)
    model = randomize(transformers.LlamaForCausalLM(cfg), 2)
    src, out = save_and_convert(model, root, "llama_small", bin_file=True)
    return model, src, out


BERT_VOCAB_TXT = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world",
                            "jax", "##former"] + [f"w{i}" for i in range(VOCAB - 9)]) + "\n"


@pytest.fixture(scope="module")
def bert(root):
    """BertForPreTraining: pooler, MLM head and next-sentence head, plus a vocab.txt."""
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                  intermediate_size=128, vocab_size=VOCAB,
                                  max_position_embeddings=64, type_vocab_size=2)
    model = randomize(transformers.BertForPreTraining(cfg), 3)
    src, out = save_and_convert(model, root, "bert", extra={
        "vocab.txt": BERT_VOCAB_TXT, "tokenizer_config.json": json.dumps({"do_lower_case": True})})
    mlm = transformers.BertForMaskedLM.from_pretrained(src).eval()  # same weights, MLM class
    return model, mlm, src, out


# ---- logits against transformers on every mesh ---------------------------------------------
@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
def test_gpt2_logits(gpt2, data, tensor):
    model, _, out = gpt2
    ids, mask = batch(seed=data * 10 + tensor)
    jm = jf.load(out, mesh=mesh(data, tensor), dtype="float32")
    assert_close(jm.logits(ids, mask), hf_forward(model, ids, mask).logits, mask)


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
def test_llama_gqa_logits(llama, data, tensor):
    model, _, out = llama
    ids, mask = batch(seed=data * 10 + tensor)
    jm = jf.load(out, mesh=mesh(data, tensor), dtype="float32")
    assert_close(jm.logits(ids, mask), hf_forward(model, ids, mask).logits, mask)
    if tensor > 1:  # restored straight into Megatron shardings: qkv split over kv heads
        qkv = jm.params["layers"]["attn"]["qkv"]["kernel"][...]
        assert qkv.sharding.spec[2] == "tensor"
        assert qkv.addressable_shards[0].data.shape[2] == 8 // tensor


@pytest.mark.parametrize("data,tensor", [(1, 1), (1, 2)], ids=["data1-tensor1", "data1-tensor2"])
def test_llama_4_heads_2_kv_heads_from_bin(llama_small, data, tensor):
    model, _, out = llama_small
    ids, mask = batch(seed=5)
    jm = jf.load(out, mesh=mesh(data, tensor), dtype="float32")
    assert_close(jm.logits(ids, mask), hf_forward(model, ids, mask).logits, mask)


@pytest.mark.parametrize("data,tensor", MESHES, ids=MESH_IDS)
def test_bert_encode_and_mlm_logits(bert, data, tensor):
    pretrain, mlm, _, out = bert
    ids, mask, types = batch(seed=data * 10 + tensor, types=True)
    jm = jf.load(out, mesh=mesh(data, tensor), dtype="float32")
    hidden, pooled = jm.encode(ids, mask, types)
    ref = hf_forward(pretrain.bert, ids, mask, token_type_ids=types)  # a BertModel
    assert_close(hidden, ref.last_hidden_state, mask, what="hidden")
    assert_close(pooled, ref.pooler_output, np.ones(len(ids)), what="pooled")
    # Model.logits takes no token types: they are all 0, as in HF's default
    assert_close(jm.logits(ids, mask), hf_forward(mlm, ids, mask).logits, mask)


def test_bert_mlm_only_checkpoint(root, bert):
    """A BertForMaskedLM directory has no pooler / NSP head: they are left out."""
    _, mlm, _, _ = bert
    src, out = save_and_convert(mlm, root, "bert_mlm")
    jm = jf.load(out, mesh=mesh(1, 2))
    assert not (jm.config.pooler or jm.config.binary_head) and jm.config.mlm_head
    ids, mask = batch(seed=7)
    hidden, pooled = jm.encode(ids, mask)
    assert pooled is None
    assert_close(jm.logits(ids, mask), hf_forward(mlm, ids, mask).logits, mask)


def test_megatron_bert(root):
    """Megatron BERT (pre-LN, final LayerNorm, no embedding LayerNorm) as HF ports it."""
    cfg = transformers.MegatronBertConfig(hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=8, intermediate_size=128,
                                          vocab_size=VOCAB, max_position_embeddings=64)
    model = randomize(transformers.MegatronBertForPreTraining(cfg), 4)
    _, out = save_and_convert(model, root, "megatron_bert")
    ids, mask, types = batch(seed=8, types=True)
    ref = hf_forward(model.bert, ids, mask, token_type_ids=types)
    jm = jf.load(out, mesh=mesh(2, 4))
    hidden, pooled = jm.encode(ids, mask, types)
    assert_close(hidden, ref.last_hidden_state, mask, what="hidden")
    assert_close(pooled, ref.pooler_output, np.ones(len(ids)), what="pooled")
    assert_close(jm.logits(ids, mask), hf_forward(model, ids, mask).prediction_logits, mask)


@pytest.mark.parametrize("kind", ["qwen2", "llama_attention_bias"])
def test_llama_style_with_biases(root, kind):
    """Qwen2: q/k/v biases, tied embeddings. LLaMA attention_bias: q/k/v and o_proj biases
    (the MLP has none: stored as zeros)."""
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=64)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            tie_word_embeddings=True, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=True,
                                                                       **common))
    model = randomize(model, 5)
    _, out = save_and_convert(model, root, kind)
    ids, mask = batch(seed=9)
    jm = jf.load(out, mesh=mesh(1, 2))
    assert_close(jm.logits(ids, mask), hf_forward(model, ids, mask).logits, mask)


# ---- bfloat16 ------------------------------------------------------------------------------
def test_bfloat16_loading(gpt2, llama, bert):
    for name, (model, out), fwd in (
            ("gpt2", (gpt2[0], gpt2[2]), lambda m, i, k: hf_forward(m, i, k).logits),
            ("llama", (llama[0], llama[2]), lambda m, i, k: hf_forward(m, i, k).logits),
            ("bert", (bert[1], bert[3]), lambda m, i, k: hf_forward(m, i, k).logits)):
        ids, mask = batch(seed=11)
        jm = jf.load(out, mesh=mesh(1, 2), dtype="bfloat16")
        leaf = jax.tree.leaves(jm.params)[0]
        assert leaf.dtype == jax.numpy.bfloat16, name
        ours = jm.logits(ids, mask)
        assert ours.dtype == np.float32
        diff = assert_close(ours, fwd(model, ids, mask), mask, tol=BF16_TOL, what=f"{name} bf16")
        print(f"{name}: bfloat16 vs float32 max abs diff {diff:.3g}, "
              f"|logits| max {np.abs(ours[mask.astype(bool)]).max():.2f}")


def test_convert_to_bfloat16(root, gpt2):
    model, src, _ = gpt2
    out = root / "gpt2_bf16"
    assert conv.main(["--input", str(src), "--output", str(out), "--dtype", "bfloat16"]) == 0
    ids, mask = batch(seed=12)
    ref = hf_forward(model, ids, mask).logits
    for dtype in ("bfloat16", "float32"):  # stored bf16, computed in either
        jm = jf.load(out, mesh=mesh(1, 4), dtype=dtype)
        assert_close(jm.logits(ids, mask), ref, mask, tol=BF16_TOL, what=f"bf16 ckpt, {dtype}")


# ---- checkpoint contents ---------------------------------------------------------------------
def test_checkpoint_layout_and_tokenizer(bert, gpt2):
    _, _, _, out = bert
    assert (out / "config.json").is_file() and (out / "params").is_dir()
    assert (out / "tokenizer").is_dir()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "encoder" and cfg["vocab_size"] == VOCAB
    jm = jf.load(out, mesh=mesh())
    assert jm.tokenizer is not None
    assert jm.tokenizer.encode("hello jaxformer") == [5, 7, 8]
    assert not (gpt2[2] / "tokenizer").exists()  # no tokenizer files in the source: none out
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # staging cleaned up


def test_padded_vocab_rows_are_zero(gpt2):
    jm = jf.load(gpt2[2], mesh=mesh())
    table = np.asarray(jm.params["embed"]["token"]["embedding"][...])
    assert table.shape == (1024, 64) and not table[VOCAB:].any() and table[:VOCAB].any()


# ---- errors --------------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jf.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        jf.load(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["no_params", "garbage_params", "garbage_config"])
def test_corrupt_checkpoint(gpt2, tmp_path, damage):
    ck = tmp_path / "ck"
    shutil.copytree(gpt2[2], ck)
    if damage == "no_params":
        shutil.rmtree(ck / "params")
    elif damage == "garbage_params":
        for f in (ck / "params").rglob("*"):
            if f.is_file():
                f.write_bytes(b"\x00garbage" * 3)
    else:
        (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        jf.load(ck, mesh=mesh()).logits(*batch())


@pytest.mark.parametrize("field,value", [("ffn_size", 512), ("num_layers", 3),
                                         ("vocab_size", 2000), ("tie_embeddings", False)])
def test_config_not_matching_weights(gpt2, tmp_path, field, value):
    ck = tmp_path / "ck"
    shutil.copytree(gpt2[2], ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg[field] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        jf.load(ck, mesh=mesh())


def _hf_copy(src, dst, edit):
    """Copy an HF directory, rewriting its model.safetensors through edit(state dict)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _no_output(out):
    assert not out.exists(), "a failed conversion left an output directory"
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name], "staging left behind"


def test_failure_midway_leaves_nothing(gpt2, tmp_path):
    """Layer 1's MLP weight has the wrong shape: layer 0 is already written when it fails."""
    key = "transformer.h.1.mlp.c_fc.weight"
    src = _hf_copy(gpt2[1], tmp_path / "bad",
                   lambda sd: sd.update({key: sd[key][:, :100].contiguous()}))
    out = tmp_path / "out"
    with pytest.raises(conv.ConversionError, match=rf"model\.safetensors.*{key}"):
        conv.convert(src, out)
    _no_output(out)


def test_hf_config_not_matching_weights(gpt2, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(gpt2[1], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_inner"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    bad = r"model\.safetensors: key .*h\.0\.mlp\.c_fc\.(weight|bias).*config\.json"
    with pytest.raises(conv.ConversionError, match=bad):
        conv.convert(src, tmp_path / "out")
    _no_output(tmp_path / "out")


def test_unknown_key_is_an_error(gpt2, tmp_path, capsys):
    key = "transformer.h.0.attn.rotary.weight"
    src = _hf_copy(gpt2[1], tmp_path / "bad", lambda sd: sd.update({key: torch.zeros(4, 4)}))
    out = tmp_path / "out"
    assert conv.main(["--input", str(src), "--output", str(out)]) == 1
    assert key in capsys.readouterr().err
    with pytest.raises(conv.ConversionError, match=key):
        conv.convert(src, out)
    _no_output(out)


def test_missing_tensor_is_an_error(gpt2, tmp_path):
    src = _hf_copy(gpt2[1], tmp_path / "bad",
                   lambda sd: sd.pop("transformer.h.1.attn.c_attn.bias"))
    with pytest.raises(conv.ConversionError, match="layers/attn/qkv/bias"):
        conv.convert(src, tmp_path / "out")
    _no_output(tmp_path / "out")


def test_bad_input_directories(tmp_path):
    with pytest.raises(conv.ConversionError, match="does not exist"):
        conv.convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(conv.ConversionError, match="t5"):
        conv.convert(tmp_path / "t5", tmp_path / "out")
    (tmp_path / "noweights").mkdir()
    transformers.GPT2Config(n_layer=1).save_pretrained(tmp_path / "noweights")
    with pytest.raises(conv.ConversionError, match="no weights"):
        conv.convert(tmp_path / "noweights", tmp_path / "out")
    _no_output(tmp_path / "out")


def test_existing_output_needs_overwrite(gpt2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert conv.main(["--input", str(gpt2[1]), "--output", str(out)]) == 1
    assert (out / "keep").exists()
    assert conv.main(["--input", str(gpt2[1]), "--output", str(out), "--overwrite"]) == 0
    assert not (out / "keep").exists() and (out / "params").is_dir()


def test_bad_model_inputs(gpt2):
    jm = jf.load(gpt2[2], mesh=mesh())
    with pytest.raises(ValueError, match="vocabulary"):
        jm.logits(np.array([[1, VOCAB]]))
    with pytest.raises(ValueError, match="positions"):
        jm.logits(np.zeros((1, 65), np.int64))
    with pytest.raises(ValueError, match="divisible"):
        jf.load(gpt2[2], mesh=jf.make_mesh(data=1, pipe=1, tensor=3,
                                           devices=jax.devices()[:3]))


def test_bfloat16_source_without_torch_reader(root, llama_small, monkeypatch):
    """A bfloat16 safetensors model converts through the numpy reader too (no torch), and is
    stored in its own dtype by default: exact, so float32 loading matches to TOL."""
    model = llama_small[0]
    # The reference is float32 with bf16-rounded weights: a model cast .to(bfloat16) would also
    # round its RoPE inv_freq buffer, which the checkpoint does not carry.
    ref_model = transformers.LlamaForCausalLM(model.config).eval()
    ref_model.load_state_dict({k: v.to(torch.bfloat16).float()
                               for k, v in model.state_dict().items()})
    bf16 = transformers.LlamaForCausalLM(model.config).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    monkeypatch.setattr(conv, "_HAVE_TORCH", False)
    _, out = save_and_convert(bf16, root, "llama_bf16")
    monkeypatch.undo()
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata((out / "params").absolute())
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    assert {str(x.dtype) for x in jax.tree.leaves(dict(tree))} == {"bfloat16"}
    ids, mask = batch(seed=13)
    jm = jf.load(out, mesh=mesh(1, 2), dtype="float32")
    assert_close(jm.logits(ids, mask), hf_forward(ref_model, ids, mask).logits, mask)


def test_tokenizer_files_copied_without_tokenizer_module(gpt2, tmp_path, monkeypatch):
    import sys
    src = tmp_path / "src"
    shutil.copytree(gpt2[1], src)
    (src / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (src / "merges.txt").write_text("#version: 0.2\n")
    monkeypatch.setitem(sys.modules, "jaxformer.tokenizer", None)  # import fails
    conv.convert(src, tmp_path / "out")
    tok = tmp_path / "out" / "tokenizer"
    assert sorted(p.name for p in tok.iterdir()) == ["merges.txt", "vocab.json"]
    assert (tok / "vocab.json").read_text() == (src / "vocab.json").read_text()
