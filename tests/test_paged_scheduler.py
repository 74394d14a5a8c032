"""Continuous batching over a paged KV cache (serving/paged_scheduler.py): random arrivals,
prompts of 1 to 40 tokens, shared prefixes and a pool small enough that requests are
preempted and recomputed; every request's greedy tokens are the argmax of a teacher-forced
pass over its own sequence and its log-probs agree within 1e-5; pages all come back."""
import numpy as np
import pytest

import jaxformer as jf
from conftest import teacher_forced
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.scheduler import ABORTED, FAILED, FINISHED, SchedulerConfig

GREEDY_LP = jf.Sampling(temperature=0, logprobs=True)


@pytest.fixture(scope="module")
def model(llama4):
    return jf.load(llama4[1])


def test_preemption_prefix_sharing_and_chunks_decode_as_alone(model):
    rng = np.random.default_rng(0)
    sched = PagedScheduler(model, SchedulerConfig(slots=4, max_length=64, steps_per_tick=3),
                           PagedConfig(page_size=4, num_pages=18, prefill_tokens=24,
                                       chunk=16))
    common = rng.integers(1, 96, 16).tolist()
    reqs = []
    for i in range(12):
        tail = rng.integers(1, 96, rng.integers(1, 25)).tolist()
        prompt = (common + tail) if i % 3 == 0 else tail
        reqs.append((prompt[:40], int(rng.integers(4, 13))))
    handles = {}
    for k in rng.permutation(len(reqs)):
        prompt, n = reqs[k]
        handles[k] = sched.submit(prompt, GREEDY_LP, max_new_tokens=n)
        for _ in range(int(rng.integers(0, 3))):
            sched.tick()
    sched.run_until_idle()
    for k, (prompt, n) in enumerate(reqs):
        out = handles[k].result(timeout=0)
        assert out.status == FINISHED and len(out.tokens) == n, (k, out)
        want, want_lp = teacher_forced(model, prompt, out.tokens)
        assert out.tokens == want, k
        np.testing.assert_allclose(out.logprobs, want_lp, atol=1e-5)
    assert sched.preemptions > 0, "the pool was meant to run short"
    assert sched.pool.prefix_hit_tokens > 0, "the common prefix was meant to be shared"
    assert sched.pool.num_in_use == 0  # every page released (full blocks stay cached)
    sched.pool.check_invariants()


def test_aborts_oversized_requests_and_pages_come_back(model):
    sched = PagedScheduler(model, SchedulerConfig(slots=8, max_length=64, steps_per_tick=2),
                           PagedConfig(page_size=4, num_pages=12, prefill_tokens=32))
    too_big = sched.submit(list(range(1, 50)), max_new_tokens=4)  # 13 pages > the 11 usable
    rng = np.random.default_rng(2)
    hs = [sched.submit(rng.integers(1, 96, rng.integers(1, 12)).tolist(),
                       max_new_tokens=int(rng.integers(1, 8))) for _ in range(40)]
    for h in hs[::5]:
        h.abort()
    sched.run_until_idle()
    assert too_big.result(timeout=0).status == FAILED
    assert "need more pages than the pool's 11" in too_big.result().reason
    status = [h.result(timeout=0).status for h in hs]
    assert set(status) <= {FINISHED, ABORTED} and status.count(FINISHED) >= 30
    assert sched.pool.num_in_use == 0 and sched.running == 0
    sched.pool.check_invariants()


# ---- sliding windows, soft-capping and ALiBi over the paged pool ----------------------------
def alone(model, prompt, n, sampling=GREEDY_LP, seed=0):
    out = model.generate([prompt], max_new_tokens=n, sampling=sampling, seed=seed,
                         progress=False)
    return out.tokens[0], (out.logprobs or [None])[0]


_TINY = dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, ffn_size=96,
             max_position_embeddings=64)
MODS = {  # a window (4) shorter than every sequence below (prompts 9-16 + 8 new)
    # Gemma 2: sliding and full layers (a traced window per layer), attention and final
    # soft caps, sandwich norms
    "gemma2": dict(_TINY, num_kv_heads=2, head_dim=16, position_embedding="rope",
                   norm="rmsnorm", norm_eps=1e-6, activation="gelu_tanh", gated_mlp=True,
                   qkv_bias=False, linear_bias=False, norm_offset=1.0, embed_scale=8.0,
                   sandwich_norm=True, attn_scale=24 ** -0.5, attn_softcap=4.0,
                   final_softcap=3.0, sliding_window=4, layer_types=("sliding", "full")),
    # BLOOM: ALiBi, embedding norm
    "bloom": dict(_TINY, position_embedding="alibi", norm="layernorm", embed_norm=True,
                  activation="gelu_tanh"),
}


@pytest.mark.parametrize("name", list(MODS))
def test_windows_softcaps_alibi_over_pages_decode_as_alone(name):
    """Tiny float32 models with sliding windows and soft caps (Gemma 2) or ALiBi (BLOOM)
    under continuous batching: chunked prefill (chunks of 8 over a shared prefix),
    a pool small enough that requests are preempted; each request's greedy tokens equal
    generate() of it alone (contiguous cache) and its log-probs agree within 1e-5."""
    model = jf.Model.random(jf.ModelConfig(name=name, **MODS[name]), seed=1)
    rng = np.random.default_rng(3)
    common = rng.integers(1, 96, 8).tolist()
    prompts = [common + rng.integers(1, 96, int(rng.integers(1, 9))).tolist() if i % 2 else
               rng.integers(1, 96, int(rng.integers(9, 17))).tolist() for i in range(6)]
    sched = PagedScheduler(model, SchedulerConfig(slots=3, max_length=48, steps_per_tick=3),
                           PagedConfig(page_size=4, num_pages=14, prefill_tokens=16, chunk=8))
    handles = []
    for p in prompts:
        handles.append(sched.submit(p, GREEDY_LP, max_new_tokens=8))
        sched.tick()
    sched.run_until_idle()
    for p, h in zip(prompts, handles):
        out = h.result(timeout=0)
        want, want_lp = alone(model, p, 8)
        assert out.status == FINISHED and out.tokens == want, (p, out)
        np.testing.assert_allclose(out.logprobs, want_lp, atol=1e-5)
    assert sched.preemptions > 0 and sched.pool.prefix_hit_tokens > 0
    assert sched.pool.num_in_use == 0
