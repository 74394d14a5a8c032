"""Continuous batching on meshes other than one device (issue 22's "every mesh"): on
tensor=2, pipe=2 and data=2 x tensor=2 (two replicas behind one scheduler), requests arriving
in random order decode exactly: each request's greedy tokens are the argmax of a
teacher-forced pass over its own sequence on the one-device model and its log-probs agree
within 1e-5, as do the top-20 alternatives (ids and log-probs) of the requests that ask for
them (every other one; the vocabulary sharded on `tensor`), and under the paged scheduler
the prompt log-probs its chunked prefill gives requests 0 and 4. The contiguous and the paged
scheduler alike."""
import dataclasses

import jax
import numpy as np
import pytest

import jaxformer as jf
from conftest import assert_top_matches, backend_compiles, teacher_forced, teacher_forced_top
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.replicas import ReplicaScheduler
from jaxformer.serving.request import ABORTED, FINISHED
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig

GREEDY_LP = jf.Sampling(temperature=0, logprobs=True)
TOP_LP = jf.Sampling(temperature=0, logprobs=True, top_logprobs=20)  # requests 0, 2, ...
ECHO = dataclasses.replace(TOP_LP, prompt_logprobs=True)  # requests 0, 4
CONFIG = SchedulerConfig(slots=4, max_length=64, steps_per_tick=3, max_prefill=2)
# small enough that requests are preempted, with a shared prefix
PAGED = PagedConfig(page_size=4, num_pages=11, prefill_tokens=24, chunk=16)


@pytest.fixture(scope="module")
def reference(llama4):
    return jf.load(llama4[1])


@pytest.fixture(scope="module")
def requests():
    rng = np.random.default_rng(0)
    common = rng.integers(1, 96, 8).tolist()  # prompts of at most 16: one prefill bucket
    reqs = []
    for i in range(8):
        tail = rng.integers(1, 96, rng.integers(1, 9)).tolist()
        reqs.append(((common + tail) if i % 3 == 0 else tail, int(rng.integers(3, 10))))
    return reqs, rng.permutation(len(reqs)).tolist(), rng.integers(0, 3, len(reqs)).tolist()


def run(sched, requests):
    reqs, order, gaps = requests
    handles = {}
    for k, gap in zip(order, gaps):
        prompt, n = reqs[k]
        sampling = GREEDY_LP if k % 2 else ECHO if k % 4 == 0 else TOP_LP
        handles[k] = sched.submit(prompt, sampling, max_new_tokens=n)
        for _ in range(gap):
            sched.tick()
    sched.run_until_idle()
    return [handles[k].result(timeout=0) for k in range(len(reqs))]


def check(outs, requests, reference, paged=False):
    for k, ((prompt, n), out) in enumerate(zip(requests[0], outs)):
        assert out.status == FINISHED and len(out.tokens) == n, out
        want, want_lp = teacher_forced(reference, prompt, out.tokens)
        assert out.tokens == want
        np.testing.assert_allclose(out.logprobs, want_lp, atol=1e-5)
        if k % 2 == 0:
            assert_top_matches(out.top_logprobs,
                               teacher_forced_top(reference, prompt, out.tokens), 20)
        if not paged or k % 4:
            assert out.prompt_logprobs is None  # the contiguous scheduler computes none
            continue
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        _, want_lp = teacher_forced(reference, prompt[:1], prompt[1:])
        np.testing.assert_allclose([v for v, _ in out.prompt_logprobs[1:]], want_lp, atol=1e-5)
        assert_top_matches([a for _, a in out.prompt_logprobs[1:]],
                           teacher_forced_top(reference, prompt[:1], prompt[1:]), 20)


@pytest.fixture(scope="module")
def tensor2(llama4):
    return jf.load(llama4[1], jf.make_mesh(tensor=2))


def test_tensor_parallel_contiguous(tensor2, requests, reference):
    check(run(Scheduler(tensor2, CONFIG), requests), requests, reference)


def test_tensor_parallel_paged(tensor2, requests, reference):
    """After warmup() serving compiles nothing: every call returns the decode state in the
    shardings it came in (where tensor=2 shards the pool and the [B, V] penalty rows)."""
    sched = PagedScheduler(tensor2, CONFIG, PAGED)
    sched.warmup()
    with backend_compiles() as compiled:
        outs = run(sched, requests)
    assert compiled == []
    check(outs, requests, reference, paged=True)
    assert sched.preemptions > 0 and sched.pool.prefix_hit_tokens > 0
    assert sched.pool.num_in_use == 0


@pytest.fixture(scope="module")
def data2(llama4):
    return jf.load(llama4[1], jf.make_mesh(data=2, tensor=2))


@pytest.mark.parametrize("paged", [None, PAGED], ids=["contiguous", "paged"])
def test_data_parallel_replicas(data2, requests, reference, paged):
    """Two replicas, each on its own tensor=2 half of the mesh with the weights' own shards
    there, behind one front: exact, and both replicas serve."""
    sched = ReplicaScheduler(data2, CONFIG, paged)
    a, b = (r.model for r in sched.replicas)
    devs = [{d for x in jax.tree.leaves(m.params) for d in x.sharding.device_set}
            for m in (a, b)]
    assert len(devs[0]) == len(devs[1]) == 2 and not devs[0] & devs[1]
    served = [0, 0]
    for i, r in enumerate(sched.replicas):  # count admissions per replica
        real = r._admit
        r._admit = lambda real=real, i=i, r=r: (real(), served.__setitem__(i, max(
            served[i], r.running)))
    check(run(sched, requests), requests, reference, paged=paged is not None)
    assert min(served) > 0, served
    if paged is not None:
        assert all(p.num_in_use == 0 for p in sched.pools)
        return
    # the replicas' own loop threads: a burst with aborts ends every request
    sched.start()
    hs = [sched.submit(p, max_new_tokens=n) for p, n in requests[0] * 3]
    for h in hs[::4]:
        h.abort()
    outs = [h.result(timeout=300) for h in hs]
    assert sched.wait_idle(timeout=30)
    sched.stop(timeout=30)
    assert {o.status for o in outs} <= {FINISHED, ABORTED}
    assert [len(o.tokens) for o in outs if o.status == FINISHED] == \
        [n for (_, n), o in zip(requests[0] * 3, outs) if o.status == FINISHED]
    assert sched.running == sched.waiting == 0


@pytest.fixture(scope="module")
def pipe2(llama4):
    return jf.load(llama4[1], jf.make_mesh(pipe=2))


def test_pipeline_parallel_contiguous(pipe2, requests, reference):
    """pipe=2: the circular pipelined decode over the live slots, new requests spread over
    its microbatches (slot i runs in microbatch i % 2)."""
    sched = Scheduler(pipe2, CONFIG)
    sched._slots[:] = [object(), None, object(), None]  # microbatch 0 holds two requests
    assert sched._free_slots() == [1, 3]
    sched._slots[:] = [None, object(), None, None]
    assert sched._free_slots() == [0, 2, 3]  # one each, then the emptier microbatch
    sched._slots[:] = [None] * 4
    check(run(sched, requests), requests, reference)


@pytest.fixture(scope="module")
def pipe2_tensor2(llama4):
    return jf.load(llama4[1], jf.make_mesh(pipe=2, tensor=2))


@pytest.mark.parametrize("mesh", ["pipe2", "pipe2_tensor2"])
def test_pipeline_parallel_paged(mesh, requests, reference, request):
    """pipe=2 (and pipe=2 x tensor=2) over a paged pool: prompt chunks run through the
    stages (GPipe), decode runs the live slots as two microbatches in the circular schedule,
    each stage holding its layers' pages; preemption and the shared prefix as on the other
    meshes; after warmup() nothing compiles."""
    model = request.getfixturevalue(mesh)
    # pipe=2: 8 slots, of which these requests keep at most the first 4 live (the decode
    # over rows [0, 4), the engine's rows loop); pipe=2 x tensor=2: 4 slots (all rows, the
    # Engine's decode loop)
    config = dataclasses.replace(CONFIG, slots=8) if mesh == "pipe2" else CONFIG
    sched = PagedScheduler(model, config, PAGED)
    sched.warmup()
    pool = sched._state.cache
    assert pool.k.sharding.spec[0] == "pipe"  # each stage holds its own layers' pages
    assert {s.data.shape[0] for s in pool.k.addressable_shards} == {2}  # 4 layers / 2
    assert sched._microbatches == 2
    rows = []
    step = sched.engine.step
    sched.engine.step = lambda *a, **kw: (rows.append(kw.get("rows")), step(*a, **kw))[1]
    with backend_compiles() as compiled:
        outs = run(sched, requests)
    assert compiled == []  # warmup() compiled every shape, for the state's one sharding
    check(outs, requests, reference, paged=True)
    assert sched.preemptions > 0 and sched.pool.prefix_hit_tokens > 0
    assert sched.pool.num_in_use == 0
    assert set(rows) == {4} and sched.engine.decode_rows()[-1] == config.slots, rows
