"""Continuous batching over a paged KV cache (serving/paged_scheduler.py): random arrivals,
prompts of 1 to 40 tokens, shared prefixes and a pool small enough that requests are
preempted and recomputed; every request's greedy tokens are the argmax of a teacher-forced
pass over its own sequence and its log-probs agree within 1e-5; pages all come back."""
import jax
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


def test_warmup_compiles_every_shape_and_partial_batches_decode_exactly(model):
    """After warmup() a burst compiles nothing (jax's compile events are counted), and a
    batch using only its first slots (the decode runs the first 4 of 8 rows) stays exact."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event)
        if event.endswith("backend_compile_duration") else None)
    sched = PagedScheduler(model, SchedulerConfig(slots=8, max_length=48, steps_per_tick=2),
                           PagedConfig(page_size=4, num_pages=40, prefill_tokens=32, chunk=16,
                                       min_chunk=8))
    shapes = sched.warmup()
    assert shapes == {"chunk prefill (rows, tokens)": [(1, 8), (2, 8), (4, 8), (1, 16),
                                                       (2, 16)],
                      "decode rows": [4, 8]}
    rng = np.random.default_rng(5)
    reqs = [(rng.integers(1, 96, int(rng.integers(1, 30))).tolist(), int(rng.integers(2, 7)))
            for _ in range(10)]
    compiles.clear()
    handles = [sched.submit(p, GREEDY_LP, max_new_tokens=n) for p, n in reqs[:2]]
    sched.tick()  # two requests alone: slots 0 and 1, the 4-row decode
    handles += [sched.submit(p, GREEDY_LP, max_new_tokens=n) for p, n in reqs[2:]]
    sched.run_until_idle()
    assert compiles == []
    for h, (prompt, n) in zip(handles, reqs):
        out = h.result(timeout=0)
        want, want_lp = teacher_forced(model, prompt, out.tokens)
        assert out.status == FINISHED and len(out.tokens) == n and out.tokens == want
        np.testing.assert_allclose(out.logprobs, want_lp, atol=1e-5)
