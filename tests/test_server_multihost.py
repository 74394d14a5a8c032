"""`jaxformer serve --data 2` over two processes: one CPU device each, a data-parallel replica
on each (serving/replica_hosts.py), collectives over gloo. Process 0 serves HTTP and routes
requests to both replicas; process 1 is started with the same flags (the same --port too, so
it would fail to bind if it served HTTP), follows process 0's broadcast plan and reports its
replica's tokens back. The `openai` client's greedy text, completions streamed and not (two
prompts in one request: one on each replica) and a chat, equals generate() of each prompt
alone in this process on one device of the same checkpoint; SIGTERM to process 0 drains, and
both processes exit 0. (A mesh spanning the processes within one replica is tested in
tests/test_scheduler_multihost.py.)"""
import json
import os
import signal
import subprocess
import sys

import jax
import openai
from server_fixtures import metric, wait_ready
from test_distributed import free_port

import jaxformer as jf
from jaxformer import cli
from jaxformer.serving import multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAXN = 8
PROMPTS = ["Hello", "The sea is", "abc"]


def _start(i: int, ckpt, coordinator: int, http: int, log):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAXFORMER_", "SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "jaxformer.cli", "serve", "--checkpoint", str(ckpt),
         "--served-name", "tiny", "--data", "2", "--port", str(http), "--slots", "2",
         "--max-length", "64", "--page-size", "8", "--prefill-tokens", "16",
         "--no-compile-cache", "--coordinator", f"127.0.0.1:{coordinator}",
         "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _logs(tmp_path) -> str:
    return "\n---\n".join((tmp_path / f"p{i}.log").read_text()[-3000:] for i in (0, 1))


def test_two_processes_serve_the_text_of_one(tmp_path):
    model = jf.demo_model(mesh=jf.make_mesh(devices=jax.devices()[:1]))
    model.save(tmp_path / "ckpt")
    http = free_port()
    url = f"http://127.0.0.1:{http}"
    logs = [open(tmp_path / f"p{i}.log", "w") for i in (0, 1)]
    coordinator = free_port()
    procs = []
    try:
        procs += [_start(i, tmp_path / "ckpt", coordinator, http, logs[i]) for i in (0, 1)]
        # meanwhile, the references: generate() of each prompt alone, stopping at eos
        tok, eos = model.tokenizer, model.config.eos_token_id
        chat_ids = tok.encode("User: Hi\nAssistant:")  # the demo tokenizer has no template
        want = {}
        for p in PROMPTS + [chat_ids]:
            t = model.generate([p], MAXN).tokens[0]
            want[str(p)] = tok.decode(t[: t.index(eos)] if eos in t else t)
        wait_ready(url, 240, failed=lambda: any(p.poll() is not None for p in procs) and
                   f"exit codes {[p.poll() for p in procs]}; logs:\n{_logs(tmp_path)}")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        r = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=MAXN,
                                      temperature=0)
        assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == \
            [want[p] for p in PROMPTS[:2]]
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=MAXN,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want[PROMPTS[2]]
        r = client.chat.completions.create(model="tiny", max_tokens=MAXN, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content == want[str(chat_ids)]
        assert r.usage.prompt_tokens == len(chat_ids)
        # process 0's front counts both replicas' pools (process 1's as reported), all free
        pages = 2 * -(-64 // 8)  # per replica: slots x max-length / page-size, null aside
        assert metric(url, "jaxformer_kv_pages_total", model="tiny") == 2 * pages
        assert metric(url, "jaxformer_kv_pages_in_use", model="tiny") == 0
        procs[0].send_signal(signal.SIGTERM)  # drains, then broadcasts the stop
        codes = [p.wait(60) for p in procs]
        assert codes == [0, 0], f"exit codes {codes}; logs:\n{_logs(tmp_path)}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        for f in logs:
            f.close()


def test_broadcast_carries_news_longer_than_a_chunk():
    """The payload travels in CHUNK-byte pieces (one compiled shape); in one process the
    broadcast returns process 0's own news, whole."""
    events = [["submit", {"id": i, "prompt": list(range(i, i + 2000))}] for i in range(4)]
    assert len(json.dumps(events)) > 2 * multihost.CHUNK
    assert multihost.broadcast(events, True) == (events, True)
    assert multihost.broadcast([], False) == ([], False)


def test_what_the_processes_cannot_serve_is_refused_in_one_line(capsys, monkeypatch):
    serve = ["serve", "--no-compile-cache", "--port", "0"]
    join = ["--coordinator", "127.0.0.1:1", "--num-processes", "2"]
    cases = [(serve + ["--num-processes", "2", "--process-id", "0"], "coordinator_address"),
             (serve + join + ["--process-id", "2"], "outside [0, num_processes=2)"),
             (serve + ["--coordinator", "nowhere"] + join[2:] + ["--process-id", "1"],
              "must be host:port")]
    got = [(cli.main(argv), capsys.readouterr()) for argv, _ in cases]
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # as if two processes had met
    cases += [(serve + ["--model", "a=demo", "--model", "b=demo"], "serve one model"),
              (serve, "holds no device of process 1")]  # device 0 alone: process 0's
    got += [(cli.main(argv), capsys.readouterr()) for argv, _ in cases[3:]]
    wrong = [(argv, rc, out.err) for (argv, needle), (rc, out) in zip(cases, got)
             if not (rc == 2 and out.err.count("\n") == 1 and needle in out.err
                     and out.err.startswith("jaxformer serve: error: "))]
    assert wrong == []
