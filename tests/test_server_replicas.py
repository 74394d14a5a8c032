"""`jaxformer serve` over a data-parallel mesh: the server puts a data=2 model behind a
ReplicaScheduler (one paged engine per data replica) and answers through the real `openai`
client with generate()'s greedy text of a data=1 copy of the same model (the contiguous
engine, no scheduler); /metrics sums both replicas' page pools."""
import concurrent.futures
import contextlib
import time

import jax
import openai
import pytest
from server_fixtures import ServerThread, metric

import jaxformer as jf
from jaxformer.serving.app import create_app
from jaxformer.serving.bridge import ModelSpec
from jaxformer.serving.paged_scheduler import PagedConfig
from jaxformer.serving.replicas import ReplicaScheduler
from jaxformer.serving.scheduler import SchedulerConfig

MAXN = 10
PROMPTS = ["Hello", "The sea is", "Once upon a time", "x"]
SCHED = SchedulerConfig(slots=4, max_length=96, steps_per_tick=4, max_queue=64)
# overlapped reads (PagedConfig.overlap): each replica's host work behind its device's;
# one chunk length (48) of one row: each replica warms up 1 prefill shape, not 4 (the setup's
# time is mostly the replicas' compiles)
PAGED = PagedConfig(page_size=8, num_pages=4 * 12 + 1, prefill_tokens=48, chunk=48,
                    min_chunk=48, overlap=True, plain_windows=True)


@pytest.fixture(scope="module")
def reference():
    return jf.demo_model(mesh=jf.make_mesh(devices=jax.devices()[2:3]))


@pytest.fixture(scope="module")
def server():
    model = jf.demo_model(mesh=jf.make_mesh(data=2, devices=jax.devices()[:2]))
    app = create_app([ModelSpec("dp", lambda: model, SCHED, PAGED)])
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def greedy(model, prompt, k):
    toks = model.generate([prompt], k).tokens[0]
    eos = model.config.eos_token_id
    return model.tokenizer.decode(toks[: toks.index(eos)] if eos in toks else toks)


def test_data_parallel_server_matches_generate(server, client, reference):
    sched = server.app.state.jaxformer.models["dp"].sched
    assert isinstance(sched, ReplicaScheduler) and len(sched.replicas) == 2

    def ask(p):
        r = client.completions.create(model="dp", prompt=p, max_tokens=MAXN, temperature=0)
        return r.choices[0].text
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(ask, PROMPTS, timeout=120))
    assert texts == [greedy(reference, p, MAXN) for p in PROMPTS]
    # concurrent requests spread over both replicas (each looked up some prompt)
    assert all(p.prefix_queries > 0 for p in sched.pools)

    chunks = client.chat.completions.create(
        model="dp", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAXN,
        temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@contextlib.contextmanager
def slow_ticks(sched, delay):
    """Every replica's tick sleeps `delay` first, so requests stay in flight a while."""
    for r in sched.replicas:
        r.tick = (lambda tick=r.tick: (time.sleep(delay), tick())[1])
    try:
        yield
    finally:
        for r in sched.replicas:
            del r.tick


def test_metrics_sum_both_replicas_pools(server, client):
    sched = server.app.state.jaxformer.models["dp"].sched
    assert metric(server.url, "jaxformer_kv_pages_total", model="dp") == \
        2 * (PAGED.num_pages - 1)
    long = dict(model="dp", max_tokens=40, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    with slow_ticks(sched, 0.1):
        streams = [client.completions.create(prompt=p, **long) for p in PROMPTS[2:4]]
        firsts = [next(iter(s)) for s in streams]  # both requests are decoding now
        in_use = [p.num_in_use for p in sched.pools]
        assert all(n > 0 for n in in_use), in_use  # one request on each replica
        for _ in range(50):  # a tick between the two reads may grow a table: read again
            got = metric(server.url, "jaxformer_kv_pages_in_use", model="dp")
            if got == sum(in_use):
                break
            in_use = [p.num_in_use for p in sched.pools]
        assert got == sum(in_use), (got, in_use)
        for s in streams:
            s.close()
    assert firsts
    deadline = time.monotonic() + 60
    while metric(server.url, "jaxformer_kv_pages_in_use", model="dp") != 0:
        assert time.monotonic() < deadline, "pages still in use after the clients left"
        time.sleep(0.1)
    # the same prompt twice: the second finds its full pages in the prefix cache
    p = "a prompt long enough to fill two pages of eight tokens"
    for _ in range(2):
        client.completions.create(model="dp", prompt=p, max_tokens=2, temperature=0)
    hits = sum(q.prefix_hit_tokens for q in sched.pools)
    looked = sum(q.prefix_query_tokens for q in sched.pools)
    assert hits >= 16
    assert metric(server.url, "jaxformer_prefix_cache_hit_rate", model="dp") == \
        pytest.approx(hits / looked)
