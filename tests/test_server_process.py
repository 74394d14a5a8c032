"""`jaxformer serve` as a process (SIGTERM drains), and SmolLM2-135M-Instruct behind the server
answering a chat request through the openai client with transformers' greedy reply."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import openai
import pytest
import torch
from server_fixtures import ServerThread, wait_ready

import jaxformer as jf
from jaxformer.serving.app import create_app
from jaxformer.serving.bridge import ModelSpec
from jaxformer.serving.paged_scheduler import PagedConfig
from jaxformer.serving.scheduler import SchedulerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_accepting_and_drains(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "XLA_FLAGS": "", "JAXFORMER_CACHE_DIR": str(tmp_path / "jit"),
           "PYTHONPATH": ROOT}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxformer.cli", "serve", "--port", str(port), "--slots", "2",
         "--max-length", "256", "--page-size", "16", "--steps-per-tick", "1",
         "--prefill-tokens", "32",  # 4 warm-up shapes, not 11: the prompt is a few tokens
         "--drain-timeout", "60", "--overlap", "--compile-workers", "2"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, 300)
        events, first = [], threading.Event()

        def stream():
            with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                    "model": "demo", "prompt": "drain", "max_tokens": 240, "temperature": 0,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append((time.monotonic(), line[5:].strip()))
                        first.set()
        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(120), "no first token"
        proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(200):  # new connections are refused while the stream drains
            try:
                httpx.get(url + "/health", timeout=1)
            # a connection the kernel accepted just before uvicorn closed its listener is closed
            # unanswered (RemoteProtocolError): that too is a request the draining server refused
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                refused = time.monotonic()
                break
            time.sleep(0.01)
        t.join(120)
        assert not t.is_alive()
        assert refused is not None and refused < events[-1][0]
        assert events[-1][1] == "[DONE]"
        usage = json.loads(events[-2][1])["usage"]
        assert usage["completion_tokens"] == 240  # the request in flight ran to its end
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    model = jf.load(smollm2[0], mesh=jf.make_mesh(devices=jax.devices()[3:4]))
    spec = ModelSpec("smollm2", lambda: model, SchedulerConfig(slots=2, max_length=128),
                     PagedConfig(page_size=16, num_pages=17, prefill_tokens=128, chunk=64,
                                 min_chunk=64))
    with ServerThread(create_app([spec])) as s:
        yield s, model


def test_smollm2_chat_is_transformers_greedy_reply(smollm2_server, smollm2_ref):
    server, model = smollm2_server
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = model.tokenizer.apply_chat_template(msgs)  # = transformers' (tests/test_gguf.py)
    with torch.no_grad():
        out = smollm2_ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    want = model.tokenizer.decode(out[0, len(ids):].tolist())
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                           timeout=300)
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=16,
                                       temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 16
    chunks = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=16,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
