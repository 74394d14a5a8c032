"""generate(): greedy / beam search against transformers, sampling filters on constructed
logits, seeds, meshes, streaming, stop conditions and bad input."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxformer as jf
from conftest import assert_top_matches, teacher_forced_top
from conversion.hf import convert
from jaxformer import sampling as smp

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
MAX_NEW = 8


def _hf_dir(tmp_path_factory, name, hf_model):
    d = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(d / "hf")
    convert(d / "hf", d / "ckpt")
    return d / "ckpt"


def _randomize(model):
    """HF initialises biases and norms to constants; random ones catch more mistakes."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "weight" in name else 0))
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = _randomize(transformers.LlamaForCausalLM(cfg)).eval()
    path = _hf_dir(tmp_path_factory, "llama", hf)
    return hf, path, jf.load(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=None, eos_token_id=None)
    hf = _randomize(transformers.GPT2LMHeadModel(cfg)).eval()
    path = _hf_dir(tmp_path_factory, "gpt2", hf)
    return hf, path, jf.load(path)


def hf_generate(hf, prompt, **kw):
    ids = torch.tensor([prompt])
    kw.setdefault("eos_token_id", None)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                      do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_matches_transformers(family, request):
    hf, _, model = request.getfixturevalue(family)
    out = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    for prompt, got in zip(PROMPTS, out.tokens):
        assert got == hf_generate(hf, prompt)


def test_greedy_stops_at_eos_like_transformers(llama):
    hf, _, model = llama
    free = hf_generate(hf, PROMPTS[0])
    eos = free[3]  # a token greedy decoding really emits
    ref = hf_generate(hf, PROMPTS[0], eos_token_id=eos)
    got = model.generate(PROMPTS, max_new_tokens=MAX_NEW,
                         sampling=jf.Sampling(temperature=0, stop_token_ids=(eos,)))
    assert got.tokens[0] == ref and got.tokens[0][-1] == eos and len(ref) < MAX_NEW


def test_repetition_penalty_matches_transformers(gpt2):
    hf, _, model = gpt2
    got = model.generate(PROMPTS, max_new_tokens=MAX_NEW,
                         sampling=jf.Sampling(temperature=0, repetition_penalty=1.5))
    for prompt, toks in zip(PROMPTS, got.tokens):
        assert toks == hf_generate(hf, prompt, repetition_penalty=1.5)


@pytest.mark.parametrize("num_beams", [1, 2, 3, 4])
def test_beam_search_matches_transformers(llama, num_beams):
    hf, _, model = llama
    eos = hf_generate(hf, PROMPTS[1])[2]
    for lp in (1.0, 0.5):
        s = jf.Sampling(temperature=0, num_beams=num_beams, length_penalty=lp,
                        stop_token_ids=(eos,))
        got = model.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s)
        for prompt, toks in zip(PROMPTS, got.tokens):
            assert toks == hf_generate(hf, prompt, num_beams=num_beams, length_penalty=lp,
                                       eos_token_id=eos)


def test_greedy_equals_teacher_forced_argmax_and_logprobs(llama):
    _, _, model = llama
    greedy = jf.Sampling(temperature=0, logprobs=True)
    tops = [4, 0, 20]  # alternatives per token, per prompt
    out = model.generate(PROMPTS, max_new_tokens=MAX_NEW,
                         sampling=[dataclasses.replace(greedy, top_logprobs=k) for k in tops])
    for prompt, toks, lps, top, k in zip(PROMPTS, out.tokens, out.logprobs,
                                         out.top_logprobs, tops):
        logits = model.logits(np.asarray([prompt + toks]))[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == toks
        ref = jax.nn.log_softmax(jnp.asarray(logits), -1)
        np.testing.assert_allclose(lps, np.asarray(ref)[np.arange(len(toks)), toks], atol=1e-4)
        if k:
            assert_top_matches(top, teacher_forced_top(model, prompt, toks), k, atol=1e-4)
        else:
            assert top == [[]] * len(toks)


def test_batched_rows_equal_running_alone_and_streaming(llama):
    _, _, model = llama
    s = jf.Sampling(temperature=0.9, top_k=20)
    batch = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    for i, p in enumerate(PROMPTS):
        assert model.generate([p], max_new_tokens=MAX_NEW).tokens[0] == batch.tokens[i]
    sampled = model.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=5)
    chunks = list(model.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=5,
                                 stream=True, chunk=3))
    final = chunks[-1]
    assert final.tokens == sampled.tokens
    streamed = [sum((c[i] for c in chunks[:-1]), []) for i in range(len(PROMPTS))]
    assert streamed == sampled.tokens
    assert len(chunks) - 1 == math.ceil((MAX_NEW - 1) / 3) + 1  # prefill token, then chunks


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_prefill_in_row_chunks_equals_one_pass(llama, kv_cache):
    """RunConfig.prefill_tokens below rows x padded prompt: prefill runs the rows in chunks
    (cache.prefill_rows), writing each chunk's cache rows; greedy tokens, log-probs and
    sampled tokens equal the one-pass prefill's, with a float and an int8 cache."""
    from jaxformer.cache import bucket, prefill_rows
    _, _, model = llama
    whole = model.with_run(kv_cache=kv_cache)
    tb = bucket(max(map(len, PROMPTS)))  # the padded prompt length prefill computes
    chunked = model.with_run(kv_cache=kv_cache, prefill_tokens=tb)
    assert prefill_rows(4, tb, tb) == 1 and prefill_rows(4, tb, 2 * tb) == 2
    for s in (jf.Sampling(temperature=0, logprobs=True),
              jf.Sampling(temperature=0.8, top_p=0.9, repetition_penalty=1.3, logprobs=True)):
        a = whole.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=3)
        b = chunked.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=3)
        assert a.tokens == b.tokens
        np.testing.assert_allclose(np.concatenate(a.logprobs), np.concatenate(b.logprobs),
                                   atol=1e-5)
    with pytest.raises(ValueError, match=r"with_run cannot change \['dtype'\]"):
        model.with_run(dtype="bfloat16")
    with pytest.raises(ValueError, match="RunConfig.prefill_tokens: must be a positive"):
        model.with_run(prefill_tokens=0)


def test_seeds_reproduce_and_differ_and_temperature_zero_limit(llama):
    _, _, model = llama
    s = jf.Sampling(temperature=1.0, top_p=0.95, min_p=0.01)
    a = model.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=1).tokens
    b = model.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=1).tokens
    c = model.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=s, seed=2).tokens
    assert a == b and a != c
    greedy = model.generate(PROMPTS, max_new_tokens=MAX_NEW).tokens
    cold = model.generate(PROMPTS, max_new_tokens=MAX_NEW, seed=3,
                          sampling=jf.Sampling(temperature=1e-6)).tokens
    assert cold == greedy


def test_per_row_sampling_mixes_greedy_and_sampled(llama):
    _, _, model = llama
    greedy = model.generate(PROMPTS, max_new_tokens=MAX_NEW).tokens
    mixed = model.generate(PROMPTS, max_new_tokens=MAX_NEW, seed=4,
                           sampling=[jf.Sampling(temperature=0), jf.Sampling(temperature=2.0),
                                     jf.Sampling(temperature=0)]).tokens
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2] and mixed[1] != greedy[1]


@pytest.mark.parametrize("mesh", [(1, 1, 1), (1, 1, 2), (2, 1, 4)])
def test_same_tokens_on_every_mesh(llama, mesh):
    _, path, ref = llama
    model = jf.load(path, mesh=jf.make_mesh(data=mesh[0], pipe=mesh[1], tensor=mesh[2],
                                            devices=jax.devices()[: np.prod(mesh)]))
    s = jf.Sampling(temperature=0.8, top_k=30, top_p=0.9, presence_penalty=0.5,
                    frequency_penalty=0.3)
    for sampling in (None, s):
        want = ref.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=sampling, seed=7)
        got = model.generate(PROMPTS, max_new_tokens=MAX_NEW, sampling=sampling, seed=7)
        assert got.tokens == want.tokens


def _constructed(seed, B=64, V=50):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(B, V)) * 3, jnp.float32)


@pytest.mark.parametrize("setting", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2),
                                     dict(top_k=5, top_p=0.7, min_p=0.05)])
def test_filters_never_emit_outside_allowed_set(setting):
    logits = _constructed(0)
    B, V = logits.shape
    s = jf.Sampling(temperature=1.0, **setting)
    params, feats = smp.row_params([s] * B, B)
    params = smp.RowParams(*map(jnp.asarray, params))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    order = np.argsort(-probs, -1)
    allowed = np.ones((B, V), bool)
    for b in range(B):
        p = probs[b]
        if s.top_k:
            allowed[b, order[b, s.top_k:]] = False
        if s.top_p < 1:
            kept = allowed[b] * p
            kept_sorted = kept[order[b]] / kept.sum()
            before = np.cumsum(kept_sorted) - kept_sorted
            allowed[b, order[b][(before >= s.top_p) & (np.arange(V) > 0)]] = False
        if s.min_p:
            q = np.where(allowed[b], p, 0) / np.where(allowed[b], p, 0).sum()
            allowed[b] &= q >= s.min_p * q.max()
    seen = np.zeros((B, V), bool)
    # jitted as the engine runs it: one compile for the 40 draws (eagerly, each call's
    # lax.cond compiled again: its branches are new closures every call)
    draw = jax.jit(lambda keys: smp.sample(logits, params, feats, keys))
    for step in range(40):
        keys = jax.random.split(jax.random.key(step), B)
        toks, _ = draw(keys)
        toks = np.asarray(toks)
        assert allowed[np.arange(B), toks].all(), setting
        seen[np.arange(B), toks] = True
    assert (seen.sum(1) > 1).any()  # it does sample, not just take the argmax


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")),
                                 dict(top_p=0.0), dict(top_p=float("nan")), dict(top_k=-2),
                                 dict(min_p=1.5), dict(repetition_penalty=0.0),
                                 dict(num_beams=0), dict(presence_penalty=float("inf")),
                                 dict(top_logprobs=21), dict(top_logprobs=-1),
                                 dict(top_logprobs=2.0), dict(prompt_logprobs=1)])
def test_bad_sampling_values_raise(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        jf.Sampling(**bad)


def test_bad_generate_input_raises(llama):
    _, _, model = llama
    with pytest.raises(ValueError, match="empty"):
        model.generate([], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(PROMPTS, max_new_tokens=-3)
    with pytest.raises(ValueError, match="maximum"):
        model.generate([list(range(60))], max_new_tokens=8)
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate([[1, 2, 500]], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate([[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(["text needs a tokenizer"], max_new_tokens=4)


def test_texts_and_stop_strings_with_a_tokenizer(tmp_path, capsys):
    from jaxformer.tokenizer import ByteTokenizer
    cfg = jf.ModelConfig.from_preset("demo", hidden_size=32, num_layers=1, ffn_size=64,
                                     max_position_embeddings=64)
    model = jf.Model.random(cfg, seed=3, tokenizer=ByteTokenizer())
    free = model.generate(["ab"], max_new_tokens=24, ignore_eos=True)
    toks = free.tokens[0]
    assert free.texts[0] == ByteTokenizer().decode(toks)
    i = next(i for i, t in enumerate(toks) if i >= 1 and 32 <= t < 127)  # an ASCII byte
    stop = chr(toks[i])
    got = model.generate(["ab"], max_new_tokens=24, ignore_eos=True,
                         sampling=jf.Sampling(temperature=0, stop_strings=(stop,)))
    first = toks.index(toks[i])
    assert got.tokens[0] == toks[: first + 1]  # stopped on the device at the stop sequence
    assert got.texts[0] == ByteTokenizer().decode(toks[:first])  # and cut from the text

    # the CLI on the same model, saved with its tokenizer
    from jaxformer import cli
    model.save(tmp_path / "ckpt")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "ab",
                     "--max-new-tokens", "24", "--stop", stop, "--stream", "--greedy"]) == 0
    printed = capsys.readouterr().out
    assert f"=== prompt 0: 'ab'\n{got.texts[0]}\n" in printed and "tokens/s" in printed
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_compilation_cache_stores_programs_and_keeps_a_configured_dir(tmp_path):
    import jax
    before = jax.config.jax_compilation_cache_dir
    jax.jit(lambda x: x * 2.5 - 1)(jnp.arange(3.0)).block_until_ready()  # cache opened
    try:
        assert jf.enable_compilation_cache() == before  # the suite's own dir is kept
        d = jf.enable_compilation_cache(tmp_path / "cc")
        assert d == str(tmp_path / "cc") and jax.config.jax_compilation_cache_dir == d
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(jnp.arange(7.0)).block_until_ready()
        assert any((tmp_path / "cc").iterdir()), "no compiled program was stored"
    finally:
        jf.enable_compilation_cache(before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
