"""Continuous batching (jaxformer/serving/scheduler.py): requests of any length arriving in
any order decode exactly as generate() does each alone; seeded sampling ignores the
neighbours; every request ends with a status under bursts and aborts; failures stay with
the requests they belong to."""
import threading

import numpy as np
import pytest

import jaxformer as jf
from conftest import teacher_forced
from jaxformer.serving.request import ABORTED, FAILED, FINISHED, QueueFull
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig

GREEDY_LP = jf.Sampling(temperature=0, logprobs=True)


@pytest.fixture(scope="module")
def model(llama4):
    return jf.load(llama4[1])


def alone(model, prompt, n, sampling=None, seed=0):
    out = model.generate([prompt], max_new_tokens=n, sampling=sampling or GREEDY_LP,
                         seed=seed, progress=False)
    return out.tokens[0], (out.logprobs or [None])[0]


def test_random_arrivals_decode_as_alone(model):
    """Prompts of 1 to 30 tokens arriving between ticks, more requests than slots: each
    request's greedy tokens are the argmax of a teacher-forced pass over its own sequence
    and its log-probs agree within 1e-5; one of them equals generate() of it alone."""
    rng = np.random.default_rng(0)
    sched = Scheduler(model, SchedulerConfig(slots=4, max_length=64, steps_per_tick=3,
                                             max_prefill=2))
    reqs = [(rng.integers(1, 96, rng.integers(1, 31)).tolist(), int(rng.integers(1, 11)))
            for _ in range(10)]
    handles = {}
    for k in rng.permutation(len(reqs)):  # arrivals interleaved with the loop's ticks
        prompt, n = reqs[k]
        handles[k] = sched.submit(prompt, GREEDY_LP, max_new_tokens=n)
        for _ in range(int(rng.integers(0, 3))):
            sched.tick()
    sched.run_until_idle()
    for k, (prompt, n) in enumerate(reqs):
        out = handles[k].result(timeout=0)
        assert out.status == FINISHED and out.reason == "length", (k, out)
        want, want_lp = teacher_forced(model, prompt, out.tokens)
        assert out.tokens == want and len(out.tokens) == n, k
        np.testing.assert_allclose(out.logprobs, want_lp, atol=1e-5)
    prompt, n = reqs[0]
    assert handles[0].result().tokens == alone(model, prompt, n)[0]


def test_seeded_sampling_ignores_neighbours_and_streams(model):
    s = jf.Sampling(temperature=0.9, top_k=30, top_p=0.9, presence_penalty=0.5)
    solo = Scheduler(model, SchedulerConfig(slots=2, max_length=48, steps_per_tick=2))
    h = solo.submit([7, 8, 9], s, max_new_tokens=9, seed=4)
    solo.run_until_idle()
    crowd = Scheduler(model, SchedulerConfig(slots=2, max_length=48, steps_per_tick=2))
    other = crowd.submit([1, 1, 2, 3, 5], jf.Sampling(temperature=1.5), max_new_tokens=6,
                         seed=9)
    crowd.tick()
    h2 = crowd.submit([7, 8, 9], s, max_new_tokens=9, seed=4)
    crowd.run_until_idle()
    assert h2.result().tokens == h.result().tokens and other.result().status == FINISHED
    chunks = list(h2.stream(timeout=1))
    assert sum(chunks, []) == h2.result().tokens and len(chunks) > 1


def test_burst_with_aborts_loses_nothing(model):
    """A bounded burst of 500 requests from 4 threads, a random tenth aborted: every request
    ends finished or aborted, each finished one with its own max_new tokens."""
    sched = Scheduler(model, SchedulerConfig(slots=16, max_length=48, steps_per_tick=4,
                                             max_prefill=8)).start()
    rng = np.random.default_rng(1)
    specs = [(rng.integers(1, 96, rng.integers(1, 9)).tolist(), int(rng.integers(1, 5)),
              bool(rng.random() < 0.1)) for _ in range(500)]
    handles = [None] * len(specs)

    def client(idx):
        for i in idx:
            prompt, n, abort = specs[i]
            handles[i] = sched.submit(prompt, max_new_tokens=n)
            if abort:
                handles[i].abort()

    threads = [threading.Thread(target=client, args=(range(t, 500, 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        outs = [h.result(timeout=240) for h in handles]
    finally:
        sched.stop(timeout=30)
    status = [o.status for o in outs]
    assert set(status) <= {FINISHED, ABORTED}
    assert status.count(ABORTED) <= sum(a for *_, a in specs)
    for o, (_, n, _) in zip(outs, specs):
        if o.status == FINISHED:
            assert len(o.tokens) == n
    assert sched.running == 0 and sched.waiting == 0


def test_bad_requests_and_failed_calls_stay_alone(model, monkeypatch):
    # the sizes of test_seeded_sampling_ignores_neighbours_and_streams: its compiled programs
    sched = Scheduler(model, SchedulerConfig(slots=2, max_length=48, steps_per_tick=2,
                                             max_queue=3))
    too_long = sched.submit(list(range(1, 46)), max_new_tokens=8)
    bad_id = sched.submit([5, 500], max_new_tokens=2)
    zero = sched.submit([5], max_new_tokens=0)
    for h, msg in ((too_long, "exceeds the context of 48"), (bad_id, "token id 500"),
                   (zero, "max_new_tokens must be a positive")):
        assert h.result(timeout=0).status == FAILED and msg in h.result().reason
    ok = sched.submit([5, 6], max_new_tokens=3)
    calls = {"n": 0}
    real = sched.engine.step

    def flaky(*a, **k):  # the first decode call fails, as an out-of-memory would
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (injected)")
        return real(*a, **k)

    monkeypatch.setattr(sched.engine, "step", flaky)
    sched.run_until_idle()
    assert ok.result().status == FAILED and "out of memory (injected)" in ok.result().reason
    again = sched.submit([5, 6], max_new_tokens=3)  # the model is still usable
    sched.run_until_idle()
    assert again.result().tokens == alone(model, [5, 6], 3)[0]
    for _ in range(3):
        sched.submit([1], max_new_tokens=1)
    with pytest.raises(QueueFull):
        sched.submit([1], max_new_tokens=1)
    with pytest.raises(ValueError, match="SchedulerConfig.slots"):
        SchedulerConfig(slots=0)


def test_generate_with_more_prompts_than_max_batch_runs_continuously(model):
    """generate(max_batch=2) over 5 prompts of different lengths: the greedy tokens and
    log-probs of the static batch, each prompt joining as a row frees."""
    rng = np.random.default_rng(5)
    # lengths within one prompt bucket (16): each generate compiles one prefill shape per row
    # count, not two
    prompts = [rng.integers(1, 96, n).tolist() for n in (3, 14, 1, 9, 16)]
    static = model.generate(prompts, max_new_tokens=6, sampling=GREEDY_LP, progress=False)
    cont = model.generate(prompts, max_new_tokens=6, sampling=GREEDY_LP, progress=False,
                          max_batch=2)
    assert cont.tokens == static.tokens
    np.testing.assert_allclose(np.concatenate(cont.logprobs), np.concatenate(static.logprobs),
                               atol=1e-5)
    with pytest.raises(ValueError, match="beam search runs on a static batch"):
        model.generate(prompts, max_new_tokens=2, sampling=jf.Sampling(num_beams=2),
                       max_batch=2)
