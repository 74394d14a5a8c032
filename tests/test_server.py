"""`jaxformer serve`'s app (jaxformer.serving) over two tiny float32 demo models on disjoint
devices, served by uvicorn on loopback and called through the real `openai` client and httpx.

References are independent of the server: greedy text is generate() of the prompt alone (the
contiguous engine, no scheduler), log-probabilities a teacher-forced forward pass
(conftest.teacher_forced), the chat prompt the transcript written out by hand.
"""
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import random
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from conftest import teacher_forced, teacher_forced_top
from server_fixtures import ServerThread, metric

import jaxformer as jf
from jaxformer.cli import _parser
from jaxformer.cli_args import MEM_FRACTION, UsageError, set_gpu_memory
from jaxformer.cli_serve import sources
from jaxformer.serving import openai_api
from jaxformer.serving.app import create_app
from jaxformer.serving.bridge import ModelSpec
from jaxformer.serving.paged_scheduler import PagedConfig
from jaxformer.serving.scheduler import SchedulerConfig
from jaxformer.serving.server import ModelSource, assign_devices

KEY = "test-key"
MAXN = 12
MAX_BODY = 64 * 1024
PROMPTS = ["Hello", "The sea is", "abc", "Once upon a time", "x", "jaxformer serves"]
SCHED = SchedulerConfig(slots=8, max_length=96, steps_per_tick=4, max_queue=256)
# one chunk length (48): each model warms up 2 prefill shapes, not 4
PAGED = PagedConfig(page_size=8, num_pages=8 * 12 + 1, prefill_tokens=96, chunk=48,
                    min_chunk=48)
# the second model serves one request (test_second_model_on_its_own_device): 4 slots and one
# chunk row warm up 3 programs, not PAGED's 7 (the setup's time is mostly these compiles)
SCHED_B = dataclasses.replace(SCHED, slots=4)
PAGED_B = dataclasses.replace(PAGED, prefill_tokens=48)


@pytest.fixture(scope="module")
def models():
    devs = jax.devices()
    return {"demo": jf.demo_model(mesh=jf.make_mesh(devices=devs[:1])),
            "demo-b": jf.demo_model(mesh=jf.make_mesh(devices=devs[1:2]), seed=1)}


@pytest.fixture(scope="module")
def server(models):
    sizes = {"demo": (SCHED, PAGED), "demo-b": (SCHED_B, PAGED_B)}
    app = create_app([ModelSpec(n, (lambda m=m: m), *sizes[n]) for n, m in models.items()],
                     api_key=KEY, max_body=MAX_BODY)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(models):
    """ref(prompt, k, model) -> generate()'s greedy text of the prompt alone, first k tokens
    (a greedy run's first k tokens are those of a k-token run), stopping at eos."""
    cache = {}

    def get(prompt, k, name="demo"):
        m = models[name]
        key = (json.dumps(prompt), name)
        if key not in cache:
            cache[key] = m.generate([prompt], MAXN).tokens[0]
        toks = cache[key][:k]
        eos = m.config.eos_token_id
        if eos in toks:
            toks = toks[: toks.index(eos)]
        return m.tokenizer.decode(toks)
    return get


def h(server):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=120)


# ---- the openai client gets generate()'s greedy text ----------------------------------------
def test_completions_match_generate(client, ref, models):
    r = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == ref(PROMPTS[0], 8)
    assert r.choices[0].finish_reason == "length"
    bos = models["demo"].tokenizer.bos_id  # a text prompt gets bos, as generate() gives it
    assert r.usage.prompt_tokens == len(PROMPTS[0]) + 1 and r.usage.completion_tokens == 8

    ids = models["demo"].tokenizer.encode(PROMPTS[1])
    r = client.completions.create(model="demo", prompt=[PROMPTS[2], PROMPTS[1]],
                                  max_tokens=MAXN, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == \
        [ref(PROMPTS[2], MAXN), ref(PROMPTS[1], MAXN)]
    assert r.usage.prompt_tokens == len(PROMPTS[2]) + len(PROMPTS[1]) + 2
    r = client.completions.create(model="demo", prompt=ids, max_tokens=MAXN, temperature=0)
    assert r.choices[0].text == ref(ids, MAXN) and r.usage.prompt_tokens == len(ids)

    chunks = list(client.completions.create(
        model="demo", prompt=PROMPTS[3], max_tokens=MAXN, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref(PROMPTS[3], MAXN)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAXN and not chunks[-1].choices
    assert bos is not None


def test_chat_matches_generate(client, ref, models):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # the demo tokenizer has no template: the plain transcript, written out here
    ids = models["demo"].tokenizer.encode("System: Be brief.\nUser: Hi\nAssistant:")
    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=MAXN,
                                       temperature=0)
    assert r.choices[0].message.content == ref(ids, MAXN)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=MAXN,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref(ids, MAXN)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_second_model_on_its_own_device(client, ref, models):
    assert models["demo-b"].mesh.devices.flat[0] != models["demo"].mesh.devices.flat[0]
    assert sorted(m.id for m in client.models.list().data) == ["demo", "demo-b"]
    r = client.completions.create(model="demo-b", prompt=PROMPTS[4], max_tokens=MAXN,
                                  temperature=0)
    assert r.choices[0].text == ref(PROMPTS[4], MAXN, "demo-b")
    assert ref(PROMPTS[4], MAXN, "demo-b") != ref(PROMPTS[4], MAXN)  # really two models


def test_stop_string_cuts_the_text(client, ref):
    full = ref(PROMPTS[5], MAXN)
    stop = next(c for c in full[2:] if c != "\ufffd")
    r = client.completions.create(model="demo", prompt=PROMPTS[5], max_tokens=MAXN,
                                  temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def _top_texts(tokenizer, ref, k, j):
    """Reference row j (teacher_forced_top) as the completions API's {text: log-prob}: the k
    best, an id whose text an earlier one has dropped; and whether ids are untied there."""
    ids, lps = ref
    out = {}
    for a, v in zip(ids[j, :k], lps[j, :k]):
        out.setdefault(tokenizer.decode([int(a)], skip_special_tokens=False), float(v))
    return out, bool((np.abs(np.diff(lps[j])) > 1e-5).all())


def test_logprobs_match_teacher_forced(client, models, monkeypatch):
    """Log-probs and top alternatives of generated tokens (from the compiled step) and of
    echo's prompt (from the chunked prefill), with no forward pass of their own, equal a
    teacher-forced pass's, streamed or not."""
    m, k = models["demo"], 3
    prompt = [m.tokenizer.bos_id] + m.tokenizer.encode(PROMPTS[1])
    greedy = m.generate([prompt], 6).tokens[0]
    argmax, chosen = teacher_forced(m, prompt, greedy)
    assert argmax == greedy
    full = prompt + greedy
    logits = m.logits(np.asarray([full]))[0].astype(np.float64)
    ls = logits - logits.max(-1, keepdims=True)
    ls = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    ref = teacher_forced_top(m, prompt, greedy, k)
    ref_prompt = teacher_forced_top(m, prompt[:1], prompt[1:], k)
    chat_ids = m.tokenizer.encode("User: a\nAssistant:")
    chat_greedy = m.generate([chat_ids], 4).tokens[0]
    chat_ref = teacher_forced_top(m, chat_ids, chat_greedy, 5)
    # echo under the contiguous scheduler (no prompt log-probs from its prefill): a pass
    # over the prompt
    got_lp, got_top = openai_api._teacher_forced(m, prompt, k)
    np.testing.assert_allclose(got_lp, [ls[p - 1, full[p]] for p in range(1, len(prompt))],
                               atol=1e-5)
    np.testing.assert_allclose([[v for _, v in row] for row in got_top], ref_prompt[1][:, :k],
                               atol=1e-5)

    passes = []  # the server's own model.logits calls from here on: none
    real = m.logits
    monkeypatch.setattr(m, "logits", lambda *a, **kw: (passes.append(1), real(*a, **kw))[1])
    r = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=6,
                                  temperature=0, logprobs=k, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(full) and lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[len(prompt):], chosen, atol=1e-5)
    np.testing.assert_allclose(lp.token_logprobs[1:len(prompt)],
                               [ls[p - 1, full[p]] for p in range(1, len(prompt))], atol=1e-5)
    for p in range(1, len(full)):
        assert len(lp.top_logprobs[p]) <= k  # fewer when two ids decode to the same text
        best = max(lp.top_logprobs[p].values())
        assert best == pytest.approx(ls[p - 1].max(), abs=2e-4)
    for j in range(len(full) - 1):  # the prompt's (prefill) and generated tokens' (step)
        want, untied = _top_texts(m.tokenizer, *((ref_prompt, k, j) if j < len(prompt) - 1
                                                 else (ref, k, j - len(prompt) + 1)))
        got = lp.top_logprobs[j + 1]
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-5)
        assert not untied or list(got) == list(want)
    assert r.choices[0].text.startswith(PROMPTS[1])  # echo

    chunks = list(client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=6,
                                            temperature=0, logprobs=k, stream=True))
    streamed = [(t, v, top) for c in chunks if c.choices and c.choices[0].logprobs
                for t, v, top in zip(c.choices[0].logprobs.tokens,
                                     c.choices[0].logprobs.token_logprobs,
                                     c.choices[0].logprobs.top_logprobs)]
    assert len(streamed) == len(greedy)
    for j, (_, v, got) in enumerate(streamed):  # each chunk carries its tokens' own
        want, untied = _top_texts(m.tokenizer, ref, k, j)
        assert v == pytest.approx(float(chosen[j]), abs=1e-5)
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-5)
        assert not untied or list(got) == list(want)

    msgs = [{"role": "user", "content": "a"}]
    c = client.chat.completions.create(model="demo", messages=msgs, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=5)
    stream = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=4,
                                                 temperature=0, logprobs=True, top_logprobs=5,
                                                 stream=True))
    assert passes == []
    greedy, ref = chat_greedy, chat_ref
    items = c.choices[0].logprobs.content
    streamed = [it for ch in stream if ch.choices and ch.choices[0].logprobs
                for it in ch.choices[0].logprobs.content]
    assert [(it.token, it.logprob) for it in streamed] == [(it.token, it.logprob)
                                                           for it in items]
    for j, item in [*enumerate(items), *enumerate(streamed)]:
        assert len(item.top_logprobs) == 5
        np.testing.assert_allclose([a.logprob for a in item.top_logprobs], ref[1][j, :5],
                                   atol=1e-5)
        if (np.abs(np.diff(ref[1][j])) > 1e-5).all():
            assert [a.token for a in item.top_logprobs] == [
                m.tokenizer.decode([int(a)], skip_special_tokens=False) for a in ref[0][j, :5]]
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)
    assert len(items) == len(greedy)


def test_n_choices_are_seeds_in_order(client):
    kw = dict(model="demo", prompt=PROMPTS[0], max_tokens=8, temperature=1.0,
              extra_body={"top_k": 50})
    both = client.completions.create(n=2, seed=7, **kw)
    one = [client.completions.create(seed=s, **kw).choices[0].text for s in (7, 8)]
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == one
    assert one[0] != one[1] and both.usage.completion_tokens == 16
    texts = ["", ""]
    for c in client.completions.create(n=2, seed=7, stream=True, **kw):
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == one


# ---- 64 concurrent clients ------------------------------------------------------------------
def test_64_concurrent_clients_mixed(server, client, ref):
    def ended():  # requests the server counted as ended, any outcome
        return sum(metric(server.url, "jaxformer_requests_total", model="demo", outcome=o)
                   for o in ("finished_length", "finished_stop", "aborted", "failed"))
    before = ended()
    rng = random.Random(0)
    jobs = []
    for i in range(64):
        p, k = rng.choice(PROMPTS), rng.choice([4, 8, MAXN])
        kind = rng.choice(["greedy", "greedy_stream", "sampled", "penalised"])
        jobs.append((i, p, k, kind))

    def run(job):
        i, p, k, kind = job
        if kind == "greedy":
            r = client.completions.create(model="demo", prompt=p, max_tokens=k, temperature=0,
                                          user=str(i))
            return i, r.choices[0].text, r.usage.completion_tokens
        if kind == "greedy_stream":
            chunks = list(client.completions.create(model="demo", prompt=p, max_tokens=k,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            return i, "".join(c.choices[0].text for c in chunks if c.choices), \
                chunks[-1].usage.completion_tokens
        extra = {"top_k": 20, "min_p": 0.01} if kind == "sampled" else \
            {"repetition_penalty": 1.3}
        r = client.completions.create(model="demo", prompt=p, max_tokens=k, temperature=0.9,
                                      top_p=0.9, seed=i, presence_penalty=0.5,
                                      frequency_penalty=0.2, extra_body=extra)
        return i, r.choices[0].text, r.usage.completion_tokens

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        results = list(ex.map(run, jobs, timeout=300))
    assert time.monotonic() - t0 < 300
    assert sorted(i for i, *_ in results) == list(range(64))  # each once
    assert ended() == before + 64  # the server ran each once: none lost or duplicated
    for (i, p, k, kind), (_, text, n) in zip(jobs, results):
        assert n == k, (i, kind)  # demo's eos is never reached in 12 tokens
        if kind.startswith("greedy"):
            assert text == ref(p, k), (i, kind)


# ---- Triton / KServe v2 ---------------------------------------------------------------------
def test_triton_generate(server, ref):
    with h(server) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2/models/demo/ready").json() == {"name": "demo", "ready": True}
        meta = c.get("/v2/models/demo").json()
        assert meta["name"] == "demo" and meta["outputs"][0]["name"] == "text_output"
        assert c.get("/v2").json()["extensions"] == ["generate"]
        r = c.post("/v2/models/demo/generate", json={
            "text_input": PROMPTS[2], "max_tokens": MAXN, "parameters": {"temperature": 0}})
        assert r.status_code == 200 and r.json()["text_output"] == ref(PROMPTS[2], MAXN)
        with c.stream("POST", "/v2/models/demo/generate_stream",
                      json={"text_input": PROMPTS[2], "max_tokens": MAXN,
                            "temperature": 0}) as s:
            events = [json.loads(line[5:]) for line in s.iter_lines()
                      if line.startswith("data:")]
        assert "".join(e["text_output"] for e in events) == ref(PROMPTS[2], MAXN)
        assert events[-1]["finish_reason"] == "length"
        assert c.post("/v2/models/nope/generate", json={"text_input": "a"}).status_code == 404
        bad = c.post("/v2/models/demo/generate", json={"text_input": "a", "top_p": 2})
        assert bad.status_code == 400 and "top_p" in bad.json()["error"]


# ---- faults ---------------------------------------------------------------------------------
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, client, ref):
    ok = {"model": "demo", "prompt": "a", "max_tokens": 2, "temperature": 0}
    with h(server) as c:
        def post(body=None, **kw):
            return c.post("/v1/completions", json=body, **kw)
        r = c.post("/v1/completions", content=b"{not json", headers={
            "content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        for field, value in [("temperature", -1), ("top_p", 0), ("max_tokens", 0),
                             ("n", 0), ("min_p", 2), ("logprobs", 99)]:
            r = post({**ok, field: value})
            assert r.status_code == 400, field
            assert r.json()["error"]["param"] == field, r.json()
        r = post({**ok, "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = post({**ok, "prompt": "a" * 200})  # longer than the context of 96
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"
        r = post({**ok, "prompt": [999]})
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
        r = post({**ok, "prompt": "a" * (MAX_BODY + 1)})
        assert r.status_code == 413
        assert httpx.post(server.url + "/v1/completions", json=ok).status_code == 401
        assert httpx.post(server.url + "/v1/completions", json=ok,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/health").json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong",
                      max_retries=0).models.list()
    r = client.completions.create(**ok)
    assert r.choices[0].text == ref("a", 2)


def _stream_first_chunk(c, body):
    """Open a stream and read up to its first data event; returns the open stream and its
    line iterator (kept: dropping it would close the connection)."""
    s = c.stream("POST", "/v1/completions", json={**body, "stream": True})
    lines = s.__enter__().iter_lines()
    for line in lines:
        if line.startswith("data:"):
            return s, lines
    raise AssertionError("no event")


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def loop_gate(sched, delay=0.0):
    """Hold the scheduler's step loop: each tick first waits for the gate (open: after
    `delay` seconds), so a test sees a request mid-flight or a queue that does not drain.
    With delay None it yields once the loop waits at the gate: a tick already under way
    when the gate went in (the loop is busy under load) has ended, so it takes nothing
    that the test sends next."""
    gate, tick, held = threading.Event(), sched.tick, threading.Event()

    def gated():
        held.set()
        gate.wait(30) if delay is None else time.sleep(delay)
        return tick()
    sched.tick = gated
    try:
        if delay is None:  # an idle loop ticks every 50 ms: it reaches the gate soon
            assert held.wait(30), "the scheduler's loop did not reach the gate"
        yield gate
    finally:
        gate.set()
        del sched.tick


def test_disconnect_mid_stream_frees_pages(server):
    sched = server.app.state.jaxformer.models["demo"].sched
    aborted = metric(server.url, "jaxformer_requests_total", model="demo", outcome="aborted")
    long = {"model": "demo", "prompt": "abort me", "max_tokens": 80, "temperature": 0,
            "ignore_eos": True}
    with h(server) as c, loop_gate(sched, delay=0.1):  # 20 ticks: 2 s mid-stream at least
        s, lines = _stream_first_chunk(c, long)
        assert metric(server.url, "jaxformer_kv_pages_in_use", model="demo") > 0
        s.__exit__(None, None, None)  # the client goes away mid-stream
        _wait_for(lambda: metric(server.url, "jaxformer_requests_total", model="demo",
                                 outcome="aborted") == aborted + 1, 120)
    _wait_for(lambda: metric(server.url, "jaxformer_kv_pages_in_use", model="demo") == 0)
    assert metric(server.url, "jaxformer_requests_running", model="demo") == 0


def test_full_queue_answers_429(server, client, ref):
    sched = server.app.state.jaxformer.models["demo"].sched
    config = sched.config
    rejected = metric(server.url, "jaxformer_requests_total", model="demo",
                      outcome="rejected_queue_full")
    try:
        sched.config = dataclasses.replace(config, max_queue=1)
        with loop_gate(sched, delay=None) as gate, \
                concurrent.futures.ThreadPoolExecutor(1) as ex:
            waiting = ex.submit(client.completions.create, model="demo", prompt="y",
                                max_tokens=2, temperature=0)
            _wait_for(lambda: sched.waiting == 1)  # held: the loop takes nothing in
            with h(server) as c:
                r = c.post("/v1/completions", json={"model": "demo", "prompt": "z"})
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"
            gate.set()
            assert waiting.result(timeout=120).choices[0].text == ref("y", 2)
    finally:
        sched.config = config
    assert metric(server.url, "jaxformer_requests_total", model="demo",
                  outcome="rejected_queue_full") == rejected + 1


def test_metrics(server, client):
    client.completions.create(model="demo", prompt="m", max_tokens=3, temperature=0)
    u = server.url
    assert metric(u, "jaxformer_time_to_first_token_seconds_count", model="demo") >= 1
    assert metric(u, "jaxformer_inter_token_latency_seconds_count", model="demo") >= 1
    assert metric(u, "jaxformer_e2e_request_latency_seconds_count", model="demo") >= 1
    assert metric(u, "jaxformer_generation_tokens_total", model="demo") >= 3
    assert metric(u, "jaxformer_prompt_tokens_total", model="demo") >= 2
    assert metric(u, "jaxformer_kv_pages_total", model="demo") == PAGED.num_pages - 1
    assert 0 <= metric(u, "jaxformer_prefix_cache_hit_rate", model="demo") <= 1


# ---- pieces without a server ----------------------------------------------------------------
def test_assign_devices():
    src = [ModelSource("a", "demo", tensor=2), ModelSource("b", "demo", devices=[0])]
    assert assign_devices(src, 4) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="model b: device 1 is used twice"):
        assign_devices([ModelSource("a", "demo", devices=[1]),
                        ModelSource("b", "demo", devices=[1])], 4)
    with pytest.raises(ValueError, match="model a: needs 8 devices"):
        assign_devices([ModelSource("a", "demo", tensor=8)], 4)


def test_503_while_loading_and_after_a_failed_load(models):
    gate = threading.Event()

    def slow():
        assert gate.wait(60)
        return models["demo"]

    def broken():
        raise OSError("no such checkpoint")
    app = create_app([ModelSpec("slow", slow, SCHED, PAGED), ModelSpec("bad", broken)],
                     max_body=MAX_BODY)
    with ServerThread(app, wait_models=False) as s, httpx.Client(base_url=s.url) as c:
        body = {"model": "slow", "prompt": "a", "max_tokens": 1}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert c.get("/v2/models/slow/ready").status_code == 503
        gate.set()
        _wait_for(lambda: c.get("/v2/models/slow/ready").status_code == 200)
        assert c.get("/health").json() == {"status": "unavailable",
                                           "models": {"bad": "failed"}}
        r = c.post("/v1/completions", json={**body, "model": "bad"})
        assert r.status_code == 503 and "no such checkpoint" in r.json()["error"]["message"]
        assert c.get("/v2/health/ready").status_code == 503


def test_cli_model_flags():
    args = _parser().parse_args(["serve", "--model", "a=demo", "--model", "b=demo",
                                 "--mesh", "b=1x1x2@3,4", "--tensor", "1"])
    a, b = sources(args)
    assert (a.name, a.source, a.size, a.devices) == ("a", "demo", 1, None)
    assert (b.name, b.tensor, b.devices) == ("b", 2, [3, 4])
    assert assign_devices([a, b], 8) == [[0], [3, 4]]
    for bad, msg in [(["--model", "a=demo", "--model", "a=demo"], "used twice"),
                     (["--model", "a=demo", "--mesh", "c=1x1x1"], "--mesh c=1x1x1"),
                     (["--model", "a=demo", "--mesh", "a=2x2"], "--mesh a=2x2"),
                     (["--model", "a=demo", "--mesh", "a=1x1x2@0,0"], "distinct device")]:
        with pytest.raises(UsageError, match=msg):
            sources(_parser().parse_args(["serve", *bad]))


def test_cli_gpu_memory(monkeypatch):
    monkeypatch.delenv(MEM_FRACTION, raising=False)
    set_gpu_memory(None)  # the serving default where nothing is set
    assert os.environ[MEM_FRACTION] == "0.9"
    monkeypatch.setenv(MEM_FRACTION, "0.5")
    set_gpu_memory(None)  # the variable set by the user wins over the default
    assert os.environ[MEM_FRACTION] == "0.5"
    args = _parser().parse_args(["serve", "--model", "a=demo", "--gpu-memory", "0.8"])
    set_gpu_memory(args.gpu_memory)  # and the flag over both
    assert os.environ[MEM_FRACTION] == "0.8"
    for bad in ("0", "1.5", "most"):
        with pytest.raises(UsageError, match="--gpu-memory"):
            _parser().parse_args(["serve", "--gpu-memory", bad])
