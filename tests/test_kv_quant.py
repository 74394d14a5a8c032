"""INT8 / FP8 KV cache (RunConfig.kv_cache): the quantizer against numpy, decoding against a
teacher-forced float pass, meshes against one device, and the memory it saves."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxformer as jf
from jaxformer import cache as kvc
from jaxformer import memory

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
NEW = 10


@pytest.fixture(scope="module")
def llama(llama4):
    """The checkpoint of conftest's 4-layer LLaMA."""
    return llama4[1]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantizer_matches_numpy(mode):
    x = np.random.default_rng(0).standard_t(4, (3, 5, 2, 16)).astype(np.float32)
    x[0, 0, 0] = 0.0  # an all-zero head keeps scale 1/qmax and codes 0
    q, s = jax.jit(kvc.quantize, static_argnums=1)(jnp.asarray(x), mode)
    qmax = 127.0 if mode == "int8" else 448.0
    amax = np.abs(x).max(-1)
    want_s = np.where(amax > 0, amax, 1.0) * np.float32(1 / qmax)
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-7)
    y = x / want_s[..., None]
    if mode == "int8":
        np.testing.assert_array_equal(np.asarray(q), np.clip(np.round(y), -127, 127))
        bound = want_s[..., None] / 2
    else:
        np.testing.assert_array_equal(np.asarray(q).astype(np.float32),
                                      y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
        bound = np.maximum(np.abs(x) * 2.0 ** -4, want_s[..., None] * 2.0 ** -10)
    err = np.abs(np.asarray(kvc.dequantize(q, s, jnp.float32)) - x)
    assert (err <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_attention_over_codes_equals_attention_over_the_dequantized_cache(mode):
    """Attention reading a quantized stacked cache's codes, its scales folded into the
    scores and probabilities, equals the reference over that layer dequantized to float32
    (grouped heads, ragged lengths, causal); cuDNN refuses a quantized cache, and the Pallas
    decode kernel what it cannot take."""
    from jaxformer.kernels.attention import attention
    from jaxformer.kernels.reference import attention_reference
    rng = np.random.default_rng(1)
    L, B, S, N, K, H = 3, 2, 16, 4, 2, 8
    k, v = (jnp.asarray(rng.standard_normal((L, B, S, K, H)), jnp.float32) for _ in "kv")
    (kq, ks), (vq, vs) = kvc.quantize(k, mode), kvc.quantize(v, mode)
    q = jnp.asarray(rng.standard_normal((B, 1, N, H)), jnp.float32)
    lengths = jnp.asarray([9, 16], jnp.int32)
    pos = (lengths - 1)[:, None]
    with jax.default_matmul_precision("highest"):  # GPUs would otherwise round to TF32
        want = attention_reference(q, kvc.dequantize(kq[1], ks[1], jnp.float32),
                                   kvc.dequantize(vq[1], vs[1], jnp.float32), pos, lengths,
                                   causal=True, scale=0.3)
        got = attention(q, kq, vq, pos, lengths, causal=True, scale=0.3, layer=jnp.int32(1),
                        k_scale=ks, v_scale=vs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'cudnn' does not read a quantized KV cache"):
        attention(q, kq[1], vq[1], pos, lengths, causal=True, scale=0.3, backend="cudnn",
                  k_scale=ks[1], v_scale=vs[1])
    # the decode kernel: not on CPUs, and not head_dim 8 on a GPU
    with pytest.raises(ValueError, match="'pallas' does not support this call"):
        attention(q, kq[1], vq[1], pos, lengths, causal=True, scale=0.3, backend="pallas",
                  k_scale=ks[1], v_scale=vs[1])


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_decode_with_quantized_cache_tracks_the_float_pass(llama, mode):
    """Each generated token's log-probability from the quantized-cache decode equals the
    teacher-forced float32 forward over prompt + generated tokens to the quantization
    noise (measured: about 1e-3 int8, 1e-2 fp8), and the greedy choice is that forward's
    argmax wherever its top two logits are not within that noise."""
    model = jf.load(llama, kv_cache=mode)
    assert model.run.kv_cache == mode
    out = model.generate(PROMPTS, max_new_tokens=NEW,
                         sampling=jf.Sampling(temperature=0, logprobs=True))
    worst = 0.0
    for prompt, toks, lps in zip(PROMPTS, out.tokens, out.logprobs):
        seq = np.asarray([prompt + toks])
        logits = model.logits(seq)[0, len(prompt) - 1:-1]  # predicts each generated token
        ref = jax.nn.log_softmax(jnp.asarray(logits), -1)
        got = np.asarray(lps)
        want = np.asarray(ref)[np.arange(len(toks)), toks]
        worst = max(worst, float(np.abs(got - want).max()))
        top2 = np.sort(logits, -1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 0.1
        assert (np.argmax(logits, -1)[clear] == np.asarray(toks)[clear]).all()
    assert worst < (0.01 if mode == "int8" else 0.05), worst


@pytest.mark.parametrize("sizes,loop", [((2, 1, 2), "scan"), ((1, 2, 1), "scan"),
                                        ((1, 2, 2), "unroll"), ((2, 1, 1), "unroll")])
def test_quantized_cache_on_meshes_equals_one_device(llama, sizes, loop):
    one = jf.load(llama, kv_cache="int8").generate(PROMPTS, max_new_tokens=6).tokens
    d, p, t = sizes
    mesh = jf.make_mesh(d, p, t, devices=jax.devices()[:d * p * t])
    model = jf.load(llama, mesh=mesh, kv_cache="int8", layer_loop=loop)
    assert model.generate(PROMPTS, max_new_tokens=6).tokens == one


def test_beam_search_with_a_quantized_cache(llama):
    s = jf.Sampling(temperature=0, num_beams=3)
    got = jf.load(llama, kv_cache="int8").generate(PROMPTS, max_new_tokens=5, sampling=s)
    ref = jf.load(llama).generate(PROMPTS, max_new_tokens=5, sampling=s)
    agree = np.mean([a == b for x, y in zip(got.tokens, ref.tokens) for a, b in zip(x, y)])
    assert agree >= 0.8, (got.tokens, ref.tokens)


def test_cache_bytes_halve_and_the_fitting_batch_doubles():
    cfg = jf.ModelConfig.from_preset("llama-7b")
    bf16 = memory.kv_cache_bytes(cfg, None, "bfloat16", 8, 1024)
    int8 = memory.kv_cache_bytes(cfg, None, "bfloat16", 8, 1024, kv_cache="int8")
    assert int8 == bf16 // 2 + 2 * 32 * 8 * 1024 * 32 * 4  # codes + one f32 scale per head
    assert int8 / bf16 < 0.52
    fp = memory.plan(cfg, None, "bfloat16", batch=1, max_length=1024, device_memory="80GiB",
                     attention="pallas")
    q = memory.plan(cfg, None, "bfloat16", batch=1, max_length=1024, device_memory="80GiB",
                    attention="pallas", kv_cache="int8")
    # where the cache, not the prefill activations, bounds the batch (256 to 1024 tokens
    # here; longer prompts' activations grow as fast), twice the rows fit
    for (length, b_fp), (_, b_q) in zip(fp.fit_table(), q.fit_table()):
        assert b_q >= b_fp, (length, b_fp, b_q)
        if 256 <= length <= 1024:
            assert b_q >= 2 * b_fp > 0, (length, b_fp, b_q)
    # the plan counts what init_cache allocates
    small = jf.ModelConfig.from_preset("demo")
    c = kvc.init_cache(small, 2, 128, jnp.bfloat16, kv_cache="int8")
    assert sum(a.nbytes for a in jax.tree.leaves(c)) == memory.kv_cache_bytes(
        small, None, "bfloat16", 2, 128,
                                                             kv_cache="int8")


def test_bad_kv_cache_value_is_named():
    with pytest.raises(ValueError, match="RunConfig.kv_cache"):
        jf.RunConfig(kv_cache="int4")


def test_cli_generate_with_a_quantized_cache(capsys):
    from jaxformer import cli
    assert cli.main(["generate", "--kv-cache", "int8", "--max-new-tokens", "4",
                     "--prompt", "hi", "--no-compile-cache"]) == 0
    assert "=== prompt 0" in capsys.readouterr().out


def test_decode_loop_compiles_once_before_the_cache_exists(caplog):
    """generate() compiles the decode loop ahead of prefill (so that XLA's autotuning
    copies of the stacked cache never sit beside the real one) and the call then reuses
    that executable: one compilation of the loop, which takes the int8 cache."""
    import logging
    model = jf.Model.random(jf.ModelConfig.from_preset("demo"), dtype="float32").with_run(
        kv_cache="int8")
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        first = model.generate(PROMPTS, max_new_tokens=4).tokens
        again = model.generate(PROMPTS, max_new_tokens=4).tokens
    loops = [r for r in caplog.records
             if r.getMessage().startswith("Compiling jit(<lambda>)") and "int8[" in r.getMessage()]
    assert len(loops) == 1, [r.getMessage()[:120] for r in loops]
    assert first == again


def _hopper():
    from jaxformer.kernels.attention import is_hopper
    return is_hopper(jax.devices()[0])


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU")
def test_gqa_decode_reads_the_int8_cache_with_the_decode_kernel(monkeypatch):
    """On Hopper a GQA model (2 query heads per kv head, head_dim 128) decodes its int8
    cache with the Pallas kernel (seen at trace time), and its greedy tokens and
    log-probabilities match the same model decoding through XLA's dots."""
    import dataclasses

    from jaxformer.kernels import decode_attention as da
    seen = []
    real = da.decode_attention

    def spy(*args, **kw):
        seen.append((jnp.dtype(args[1].dtype).name, kw.get("k_scale") is not None))
        return real(*args, **kw)
    monkeypatch.setattr(da, "decode_attention", spy)
    cfg = dataclasses.replace(jf.ModelConfig.from_preset("llama-7b"), num_layers=2,
                              hidden_size=512, num_heads=4, num_kv_heads=2, ffn_size=1024,
                              vocab_size=1024)
    sampling = jf.Sampling(temperature=0, logprobs=True)
    runs = {}
    for attention in ("auto", "xla"):
        model = jf.Model.random(cfg, dtype="bfloat16", seed=0, kv_cache="int8",
                                attention=attention)
        runs[attention] = model.generate(PROMPTS, max_new_tokens=NEW, sampling=sampling)
    assert ("int8", True) in seen, seen
    kernel, dots = runs["auto"], runs["xla"]
    for a, b, la, lb in zip(kernel.tokens, dots.tokens, kernel.logprobs, dots.logprobs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        assert n >= 3, (a, b)  # near-ties may part the two later
        np.testing.assert_allclose(np.asarray(la[:n]), np.asarray(lb[:n]), atol=0.05)
