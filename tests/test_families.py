"""Model families against transformers (PyTorch, float32, CPU, random weights): one table.

Each row builds a tiny transformers model (2 layers, hidden 32-64, vocab 96) with random
weights, norm scales ~ 1 + N(0, 0.2) and biases ~ N(0, 0.2) (so a missing or misplaced norm or
bias cannot pass), saves it, converts it with conversion.hf (one shared helper) and loads it
with jaxformer.load. What must hold, per row:
- logits within TOL = 1e-4 (max abs diff) of transformers' at the valid positions of a
  right-padded batch whose longest row is LONG tokens: longer than every sliding window here
  and past the original context of every rope scaling; on mesh 1 and tensor=2 (pipe=2 for
  gemma2, whose sliding / full layers need global layer numbers in each stage, and gpt_neox);
  the unrolled layer loop on one device and tensor=2, the stacked scan on pipe=2;
- greedy tokens equal to transformers' generate from a prompt longer than the window, the
  new tokens running past the original context of the rope scalings.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxformer as jf  # noqa: E402
from conversion import hf as conv  # noqa: E402
from conftest import randomize  # noqa: E402

TOL = 1e-4
VOCAB = 96
LONG = 24  # > every window (4-6) and original context (8-16) below
PROMPT = list(range(3, 15))  # 12 tokens: past the windows, short of the original contexts
NEW = 8  # ends at position 19: past the original contexts of 16
T = transformers
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=16, bos_token_id=None, eos_token_id=None,
             pad_token_id=None, tie_word_embeddings=False)


def rope(kind, **kw):
    return dict(LLAMA, rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **kw})


GEMMA = dict(LLAMA, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
             sliding_window=4, query_pre_attn_scalar=24,
             layer_types=["sliding_attention", "full_attention"])
GPTJ = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
            bos_token_id=None, eos_token_id=None)
OPT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
           bos_token_id=None, eos_token_id=None, pad_token_id=1)
FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              bos_token_id=None, eos_token_id=None)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96, max_position_embeddings=64, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)

# name: (config class, model class, config kwargs, meshes (data, pipe, tensor) for logits)
M2 = [(1, 1, 1), (1, 1, 2)]
FAMILIES = {
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", rope("linear", factor=2.0), M2),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM", rope("dynamic", factor=2.0), M2),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   rope("yarn", factor=4.0, original_max_position_embeddings=8), M2),
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM",
                     rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16), M2),
    "llama-longrope": ("LlamaConfig", "LlamaForCausalLM",
                       dict(rope("longrope", original_max_position_embeddings=16,
                                 long_factor=[1.0 + 0.5 * i for i in range(8)],
                                 short_factor=[1.0 + 0.1 * i for i in range(8)]),
                            max_position_embeddings=64), M2),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(LLAMA, sliding_window=5, max_position_embeddings=64), M2),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(LLAMA, max_position_embeddings=64, use_sliding_window=True,
                   sliding_window=4, max_window_layers=1), M2),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA, max_position_embeddings=64), M2),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(LLAMA, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                   max_position_embeddings=64), M2),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(GEMMA, attn_logit_softcapping=4.0, final_logit_softcapping=3.0,
                    max_position_embeddings=64), M2 + [(1, 2, 1)]),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(GEMMA, max_position_embeddings=64, rope_parameters={
                   "full_attention": {"rope_type": "linear", "factor": 2.0,
                                      "rope_theta": 10000.0},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}), M2),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(LLAMA, max_position_embeddings=64, original_max_position_embeddings=64,
                  sliding_window=6, rope_parameters={"rope_type": "default",
                                                     "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5}), M2),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25}),
                 M2 + [(1, 2, 1)]),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", GPTJ, M2),
    "opt": ("OPTConfig", "OPTForCausalLM", OPT, M2),
    "opt-post-ln": ("OPTConfig", "OPTForCausalLM", dict(OPT, do_layer_norm_before=False), M2),
    "falcon-gqa": ("FalconConfig", "FalconForCausalLM",
                   dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True), M2),
    "falcon-mqa": ("FalconConfig", "FalconForCausalLM",
                   dict(FALCON, new_decoder_architecture=False, multi_query=True), M2),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=None,
                   eos_token_id=None, pad_token_id=None), M2),
}


def build(name, root):
    """(hf model, converted checkpoint path) for one table row."""
    cfg_cls, model_cls, kw, _ = FAMILIES[name]
    hf = getattr(T, model_cls)(getattr(T, cfg_cls)(**kw))
    hf = randomize(hf, sum(map(ord, name)))
    src, out = root / name, root / f"{name}_jf"
    hf.save_pretrained(src)
    assert conv.main(["--input", str(src), "--output", str(out)]) == 0
    return hf, out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


_built = {}


@pytest.fixture
def family(request, root):
    name = request.param
    if name not in _built:
        _built[name] = build(name, root)
    return name, *_built[name]


def batch(seed):
    rng = np.random.RandomState(seed)
    lengths = np.array([LONG, LONG - 7, 5])
    mask = (np.arange(LONG)[None] < lengths[:, None]).astype(np.int64)
    return np.where(mask, rng.randint(0, VOCAB, (3, LONG)), 0), mask


def mesh(data, pipe, tensor):
    return jf.make_mesh(data=data, pipe=pipe, tensor=tensor,
                        devices=jax.devices()[: data * pipe * tensor])


def hf_generate(hf, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_logits_and_greedy_match_transformers(family):
    name, hf, out = family
    ids, mask = batch(seed=len(name))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    for data, pipe, tensor in FAMILIES[name][3]:
        # the unrolled layer loop (the GPU default) compiles faster here; the pipe meshes
        # run the stacked scan, so both loops meet the per-layer sliding / full switch
        loop = "scan" if pipe > 1 else "unroll"
        jm = jf.load(out, mesh=mesh(data, pipe, tensor), dtype="float32", layer_loop=loop)
        ours = jm.logits(ids, mask)
        diff = float(np.abs(ours[valid] - ref[valid]).max())
        assert diff <= TOL, f"{name} mesh {(data, pipe, tensor)}: max abs diff {diff:.3g}"
        if (data, pipe, tensor) == (1, 1, 1):
            got = jm.generate([PROMPT], max_new_tokens=NEW).tokens[0]
            assert got == hf_generate(hf, PROMPT, NEW), name


@pytest.fixture(scope="module")
def llama_2kv(root):
    """8 query heads over 2 kv heads: tensor=4 and 8 need each kv head copied 2 / 4 times."""
    hf = randomize(T.LlamaForCausalLM(T.LlamaConfig(**dict(
        LLAMA, num_attention_heads=8, head_dim=8, max_position_embeddings=64))), 7)
    src, out = root / "llama_2kv", root / "llama_2kv_jf"
    hf.save_pretrained(src)
    conv.convert(src, out)
    return hf, out


@pytest.mark.parametrize("tensor", [4, 8])
def test_kv_head_replication(llama_2kv, tensor):
    hf, out = llama_2kv
    ids, mask = batch(seed=tensor)
    one = jf.load(out, mesh=mesh(1, 1, 1), layer_loop="unroll")
    jm = jf.load(out, mesh=mesh(1, 1, tensor), layer_loop="unroll")
    assert jm.config.kv_heads == tensor and one.config.kv_heads == 2
    qkv = jm.params["layers"][0]["attn"]["qkv"]["kernel"][...]  # unrolled: [1, D, K, G+2, H]
    assert qkv.sharding.spec[2] == "tensor" and qkv.addressable_shards[0].data.shape[2] == 1
    ours, ref = jm.logits(ids, mask), one.logits(ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= TOL
    with torch.no_grad():
        hf_ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert np.abs(ours[valid] - hf_ref.numpy()[valid]).max() <= TOL
    assert jm.generate([PROMPT], max_new_tokens=NEW).tokens[0] == hf_generate(hf, PROMPT, NEW)


@pytest.mark.parametrize("knob", [dict(window=4), dict(softcap=5.0),
                                  dict(alibi_slopes=np.ones(4, np.float32))])
def test_cudnn_refuses_score_knobs_and_auto_takes_them(knob):
    """cuDNN does not implement sliding windows, soft-capping or ALiBi: asked for explicitly
    it raises naming the knob; "auto" (the Pallas kernels on Hopper, kernels/masking.py;
    the XLA reference here) computes them."""
    from jaxformer.kernels.attention import attention
    from jaxformer.kernels.reference import attention_reference
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 6, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 6, 2, 8)).astype(np.float32) for _ in range(2))
    pos, lengths = np.arange(6, dtype=np.int32)[None], np.array([6], np.int32)
    name = next(iter(knob))
    with pytest.raises(ValueError, match=name):
        attention(q, k, v, pos, lengths, causal=True, scale=0.3, backend="cudnn", **knob)
    got = attention(q, k, v, pos, lengths, causal=True, scale=0.3, backend="auto", **knob)
    want = attention_reference(q, k, v, pos, lengths, causal=True, scale=0.3, **knob)
    plain = attention_reference(q, k, v, pos, lengths, causal=True, scale=0.3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(want) - np.asarray(plain)).max() > 1e-3  # the knob acts


def test_quantized_cache_decode_with_score_knobs():
    """A decode step over a stacked int8 cache (the layer read in place, scales folded into
    scores) with a window and soft-capping equals the reference over the dequantized keys."""
    import jax.numpy as jnp
    from jaxformer.kernels.attention import attention
    from jaxformer.kernels.reference import attention_reference
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
    kc, vc = (rng.integers(-127, 128, (2, 2, 7, 2, 8)).astype(np.int8) for _ in range(2))
    ks, vs = (rng.uniform(0.001, 0.02, (2, 2, 7, 2)).astype(np.float32) for _ in range(2))
    pos, lengths = np.array([[6], [4]], np.int32), np.array([7, 5], np.int32)
    knobs = dict(window=3, softcap=2.0)
    got = attention(q, kc, vc, pos, lengths, causal=True, scale=0.3, layer=jnp.int32(1),
                    k_scale=ks, v_scale=vs, **knobs)
    k, v = kc[1] * ks[1][..., None], vc[1] * vs[1][..., None]
    want = attention_reference(q, k, v, pos, lengths, causal=True, scale=0.3, **knobs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    full = attention_reference(q, k, v, pos, lengths, causal=True, scale=0.3)
    assert np.abs(np.asarray(want) - np.asarray(full)).max() > 1e-3
