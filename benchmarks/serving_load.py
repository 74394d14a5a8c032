"""The serving load benchmark (`benchmarks/serving.py --server`): Poisson arrivals at several
request rates against `jaxformer serve` and `transformers serve --continuous-batching`, the
same client and workload for both.

    python benchmarks/serving.py --server                       # llama3-8b, random weights
    python benchmarks/serving.py --server --rates 1 2 4 8 16 --json rows.json
    python benchmarks/serving.py --server --servers jaxformer  # without the peer
    python benchmarks/serving.py --server --tiny                # a CPU smoke run
    python benchmarks/serving.py --server --guidellm VENV/bin/guidellm  # + guidellm's view

Workload (seed 0): prompt lengths uniform in 64..1024 tokens and output lengths uniform in
32..512, random token ids; every request streams (`stream: true`) from /v1/completions with
`ignore_eos: true` and max_tokens = its output length. At each rate the client (httpx,
asyncio, one task per request) sends min(--requests, rate x --duration) requests at
exponential gaps and waits for them at most --duration + --drain seconds; what has not
finished by then counts as failed. Per rate: output tokens/s (output tokens over the seconds
from the first send to the last answer), time to first token, inter-token latency and
end-to-end latency p50 and p99. Inter-token latency: each gap between streamed chunks divided
by the tokens the later chunk carries; the chunks carry text, and both servers decode with the
same word tokenizer (token i is the word "t<i>"), so a chunk's words are its tokens (where they
do not add up to usage.completion_tokens, the request's tokens are spread evenly). "Sustained": the highest rate with p99
TTFT < 1 s and p99 inter-token < 50 ms and no failures.

The client runs in a child process (so its event loop does not share a GIL with the server's
threads). jaxformer's server runs in this process (uvicorn on a thread, 127.0.0.1, a free port)
over the model the offline engine (serving.run_engine) ran the same requests through first,
so the table shows the HTTP layer's share of the offline throughput; one request alone
streamed is set against the engine's batch-1 decode (serving.run_single). The peer runs first,
in a child process, before this process's jax takes the GPU: a child writes the same random
llama3-8b-shaped model (LlamaForCausalLM, bf16) and a word-level tokenizer whose word "t<i>" is
token i (so a prompt of ids is sent as the text "t<i> t<j> ...", which transformers serve
requires) to a temporary directory, then `transformers serve --continuous-batching DIR` is
started on a free port and stopped (terminate, then kill) when its rates are done. When it
cannot start (no CUDA, no serving extra, a crash) its row says why and the run goes on.
After its own client, guidellm (when --guidellm names it or it is on PATH) loads jaxformer's
server with the same requests at the same rates (guidellm_run.py); its numbers print beside
the client's, or a row says why it did not run.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import jax
import numpy as np
import uvicorn

import guidellm_run
import harness
import jaxformer as jf
from jaxformer.serving.app import create_app
from jaxformer.serving.bridge import ModelSpec
from jaxformer.serving.paged_scheduler import PagedConfig
from jaxformer.serving.scheduler import SchedulerConfig
from jaxformer.tokenizer import HFJsonTokenizer


@dataclasses.dataclass(frozen=True)
class Load:
    preset: str
    prompt: tuple[int, int]  # tokens, uniform in [lo, hi]
    new: tuple[int, int]  # output tokens, uniform in [lo, hi]
    requests: int  # at most this many per rate
    duration: float  # seconds of arrivals per rate at most
    drain: float  # seconds after the arrivals a rate waits for its answers
    slots: int


FULL = Load("llama3-8b", (64, 1024), (32, 512), 512, 60.0, 60.0, 256)
TINY = Load("demo", (4, 24), (2, 8), 8, 10.0, 20.0, 4)
# the tiny run's scheduler over serving.TINY_ARGS: one prefill chunk length, few row counts,
# so the CPU smoke run compiles few programs
TINY_ARGS = dict(prefill_tokens=32, chunk=16, min_chunk=16)
SLO_TTFT_S, SLO_ITL_S = 1.0, 0.05


def requests(load: Load, n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """n (prompt ids, output length) pairs; the first k of a larger n are the same k."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(rng.integers(load.prompt[0], load.prompt[1] + 1))
        new = int(rng.integers(load.new[0], load.new[1] + 1))
        out.append((rng.integers(0, vocab, p).tolist(), new))
    return out


def arrivals(rate: float, n: int, seed: int = 0) -> np.ndarray:
    """Send times (s) of a Poisson process of `rate` requests/s, the first at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


# ---- the client ------------------------------------------------------------------------

async def _one(client, url, body, at, t0) -> dict:
    """One streamed request sent at t0 + at: its send, chunk and end times, tokens, error."""
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    r = {"sent": time.perf_counter(), "chunks": [], "words": [], "tokens": 0, "error": None}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                r["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    r["error"] = str(obj["error"])[:200]
                elif obj.get("usage"):
                    r["tokens"] = obj["usage"]["completion_tokens"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    r["chunks"].append(time.perf_counter())
                    r["words"].append(len(obj["choices"][0]["text"].split()))
        r["end"] = time.perf_counter()
        r["tokens"] = r["tokens"] or sum(r["words"])  # a server that sends no usage
        if r["error"] is None and r["tokens"] != body["max_tokens"]:
            r["error"] = f"{r['tokens']} tokens, not {body['max_tokens']}"
        elif not r["chunks"]:
            r["error"] = "no chunk"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        r["error"] = f"{type(e).__name__}: {e}"[:200]
    return r


def body(model: str, prompt: list[int], new: int, text: bool) -> dict:
    """The request; text: the prompt as words, and no ignore_eos (transformers serve answers
    422 to it; its model has no EOS token, so it too generates max_tokens)."""
    out = {"model": model, "prompt": " ".join(f"t{i}" for i in prompt) if text else prompt,
           "max_tokens": new, "stream": True, "stream_options": {"include_usage": True},
           "temperature": 0.0}
    return out if text else {**out, "ignore_eos": True}


async def _rate(url, model, reqs, at, limit, text) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(limit), limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(_one(client, url, body(model, p, n, text), a, t0))
                 for (p, n), a in zip(reqs, at)]
        done, pending = await asyncio.wait(tasks, timeout=limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    out = [t.result() if t in done else {"error": f"not done in {limit:.0f} s", "chunks": [],
                                          "tokens": 0} for t in tasks]
    return out, t0


def summarize(results: list[dict], t0: float) -> dict:
    """A rate's row from its requests' records (module docstring)."""
    ok = [r for r in results if r["error"] is None]
    row = {"sent": len(results), "ok": len(ok), "failed": len(results) - len(ok),
           "errors": sorted({r["error"] for r in results if r["error"]})[:3]}
    if not ok:
        return row
    seconds = max(r["end"] for r in ok) - t0
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["chunks"][0] - r["sent"] for r in ok]
    e2e = [r["end"] - r["sent"] for r in ok]
    itl = []
    for r in ok:
        # the tokens each chunk carries: its words (the word tokenizer: one token a word)
        # when they add up, else the request's tokens spread evenly over its chunks
        n = r.get("words", [])
        if sum(n) != r["tokens"] or 0 in n:
            n = [r["tokens"] / len(r["chunks"])] * len(r["chunks"])
        itl += [g / k for g, k in zip(np.diff(r["chunks"]), n[1:])]
    row.update(tokens=tokens, seconds=seconds, tok_s=tokens / seconds)
    for name, xs in (("ttft", ttft), ("itl", itl or [0.0]), ("e2e", e2e)):
        row[f"{name}_p50_s"] = float(np.percentile(xs, 50))
        row[f"{name}_p99_s"] = float(np.percentile(xs, 99))
    return row


def sweep(url: str, model: str, load: Load, rates: list[float], vocab: int, text: bool,
          seed: int = 0) -> list[dict]:
    rows = []
    for rate in rates:
        n = count(load, rate)
        reqs = requests(load, n, vocab, seed)
        at = arrivals(rate, n, seed)
        res, t0 = asyncio.run(_rate(url, model, reqs, at, float(at[-1]) + load.drain, text))
        row = {"rate": rate, **summarize(res, t0)}
        # what the arrivals ask for: a server keeping up serves this, not more
        row["offered_tok_s"] = sum(m for _, m in reqs) / max(float(at[-1]), 1e-9)
        row["sustains"] = sustains(row)
        rows.append(row)
    return rows


def count(load: Load, rate: float) -> int:
    """The requests a rate sends: rate x duration, at least 1, at most load.requests."""
    return max(1, min(load.requests, math.ceil(rate * load.duration)))


def client_rows(payload: str) -> None:
    """(child) sweep() over the payload's server, a row a line ("HFROW " + JSON): the load
    client runs in a process of its own, apart from the server's threads and their GIL."""
    p = json.loads(payload)
    load = Load(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["load"].items()})
    for _ in range(p.get("repeat", 1)):  # repeat: the last of the runs counts
        rows = sweep(p["url"], p["model"], load, p["rates"], p["vocab"], p["text"], p["seed"])
    for row in rows:
        print("HFROW " + json.dumps(row), flush=True)


def sweep_child(url: str, model: str, load: Load, rates, vocab: int, text: bool,
                seed: int = 0, repeat: int = 1) -> list[dict]:
    """sweep() in a child process (client_rows); bounded by the rates' time limits."""
    limit = sum(min(load.requests, math.ceil(r * load.duration)) / r + load.drain
                for r in rates) * repeat + 120  # + the child's start
    payload = dict(url=url, model=model, load=dataclasses.asdict(load), rates=list(rates),
                   vocab=vocab, text=text, seed=seed, repeat=repeat)
    rows = harness.child_rows("serving_load", "client_rows(sys.argv[1])", payload, limit)
    if len(rows) != len(rates):
        raise RuntimeError(f"the load client gave {len(rows)} rows for {len(rates)} rates")
    return rows


def sustains(row: dict) -> bool:
    return (row["failed"] == 0 and row["ok"] > 0 and row["ttft_p99_s"] < SLO_TTFT_S
            and row["itl_p99_s"] < SLO_ITL_S)


def sustained(rows: list[dict]) -> float | None:
    ok = [r["rate"] for r in rows if r.get("sustains")]
    return max(ok) if ok else None


# ---- jaxformer's server ------------------------------------------------------------------

class ServerThread:
    """`with ServerThread(app) as url:` serves app on 127.0.0.1 (an ephemeral port) on a
    thread until the block ends; waits for /health (the model loaded and compiled)."""

    def __init__(self, app, timeout: float):
        self.timeout = timeout
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=10, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        try:
            deadline = time.monotonic() + self.timeout
            while not self.server.started:
                if time.monotonic() > deadline or not self.thread.is_alive():
                    raise RuntimeError("jaxformer's server did not start")
                time.sleep(0.02)
            port = self.server.servers[0].sockets[0].getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, deadline - time.monotonic(), lambda: self.thread.is_alive())
            return url
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def wait_ready(url: str, timeout: float, alive=lambda: True) -> None:
    """Poll /health until 200, at most `timeout` seconds or until `alive()` is false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return
            if '"failed"' in r.text:
                raise RuntimeError(f"{url}: the model failed to load: {r.text[:300]}")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not alive():
            raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.2)


def word_tokenizer(vocab: int):
    """A `tokenizers.Tokenizer` whose whitespace-separated word "t<i>" is token i."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def jaxformer_rows(model, load: Load, rates, args) -> dict:
    """Serve `model` in this process and sweep the rates; then one request alone."""
    sched = SchedulerConfig(slots=load.slots, max_length=load.prompt[1] + load.new[1],
                            steps_per_tick=args.steps_per_tick, max_queue=1 << 16)
    paged = PagedConfig(page_size=args.page_size, num_pages=args.num_pages or 2,
                        prefill_tokens=args.prefill_tokens, chunk=args.chunk,
                        min_chunk=args.min_chunk)
    spec = ModelSpec("bench", lambda: model, sched, paged, size_pool=args.num_pages is None,
                     compile_workers=args.compile_workers)
    vocab = model.config.vocab_size
    t = time.perf_counter()
    with ServerThread(create_app([spec]), args.server_timeout) as url:
        out = {"ready_s": time.perf_counter() - t}
        out["rates"] = sweep_child(url, "bench", load, rates, vocab, text=False)
        out["guidellm"] = guidellm_side(url, load, rates, vocab, args)
        single = Load(load.preset, (args.single[0],) * 2, (args.single[1],) * 2, 1, 1.0,
                      load.drain, load.slots)
        # run twice, the second counts: the first warms the connection and the client
        (r,) = sweep_child(url, "bench", single, [1.0], vocab, False, seed=2, repeat=2)
    if r["ok"] == 1:
        e2e, ttft = r["e2e_p50_s"], r["ttft_p50_s"]
        out["single"] = {"tok_s": r["tokens"] / e2e,
                         "decode_ms": (e2e - ttft) / max(r["tokens"] - 1, 1) * 1e3}
    else:
        out["single"] = {"error": r["errors"][0]}
    return out


def guidellm_side(url: str, load: Load, rates, vocab: int, args) -> dict:
    """guidellm over the same requests at the same rates (guidellm_run.py), or why not."""
    exe, why = guidellm_run.find(args.guidellm)
    if exe is None:
        return {"error": why}
    counts = [count(load, r) for r in rates]
    return guidellm_run.rows(exe, url, "bench", word_tokenizer(vocab),
                             requests(load, max(counts), vocab), rates, counts, load.drain)


# ---- the peer: transformers serve --------------------------------------------------------

def write_hf_model(payload: str) -> None:
    """(child) The random llama-shaped model and word tokenizer into payload's directory."""
    p = json.loads(payload)
    import torch
    import transformers
    if not torch.cuda.is_available():
        print("HFROW " + json.dumps({"error": "no CUDA: transformers serve would run on CPU"}))
        return
    c = p["config"]
    hc = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        intermediate_size=c["ffn"], max_position_embeddings=c["positions"],
        rope_theta=c["rope_theta"], rms_norm_eps=c["eps"], bos_token_id=None,
        eos_token_id=None, pad_token_id=0, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 8B in fp32 is 32 GB
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hc).eval()
    model.generation_config.eos_token_id = None  # every request runs to max_tokens
    model.save_pretrained(p["dir"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(c["vocab_size"]),
                                               unk_token="t0", pad_token="t0")
    fast.save_pretrained(p["dir"])
    print("HFROW " + json.dumps({"dir": p["dir"]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_rows(cfg, load: Load, rates, args) -> dict:
    """transformers serve --continuous-batching over the same workload (module docstring)."""
    if shutil.which("transformers") is None:
        return {"error": "no `transformers` command (pip install 'transformers[serving]')"}
    tmp = tempfile.mkdtemp(prefix="loadbench-hf-")
    proc = None
    try:
        conf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                    layers=cfg.num_layers, heads=cfg.num_heads,
                    kv_heads=cfg.num_kv_heads or cfg.num_heads, ffn=cfg.ffn_size,
                    positions=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                    eps=cfg.norm_eps)
        made = harness.child_rows("serving_load", "write_hf_model(sys.argv[1])",
                                  {"dir": tmp, "config": conf}, args.server_timeout)
        if not made or "error" in made[0]:
            return {"error": made[0]["error"] if made else "writing the model failed"}
        port = free_port()
        log = open(os.path.join(tmp, "serve.log"), "w+")
        proc = subprocess.Popen(["transformers", "serve", "--continuous-batching", "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                 tmp], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        t = time.perf_counter()
        try:
            wait_ready(url, args.server_timeout, lambda: proc.poll() is None)
        except (TimeoutError, RuntimeError) as e:
            log.seek(0)
            return {"error": f"{e}; log: {log.read()[-500:]}"}
        out = {"ready_s": time.perf_counter() - t}
        out["rates"] = sweep_child(url, tmp, load, rates, cfg.vocab_size, text=True)
        return out
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the run -----------------------------------------------------------------------------

def main(args, offline) -> int:
    """The --server run; `offline` is the serving module (its run_engine and run_single; passed
    in because serving.py imports this module)."""
    load = TINY if args.tiny else FULL
    load = dataclasses.replace(load, requests=args.requests or load.requests,
                               duration=args.duration or load.duration,
                               slots=args.slots or load.slots)
    rates = sorted(args.rates or ([1, 2] if args.tiny else [1, 2, 4, 8, 16]))
    if any(r <= 0 for r in rates):
        raise ValueError(f"--rates: request rates must be > 0, got {rates}")
    cfg = jf.ModelConfig.from_preset(load.preset)
    out = {"preset": load.preset, "load": dataclasses.asdict(load), "rates": rates}
    if "transformers" in args.servers and not args.tiny:  # before jax takes the GPU
        out["transformers"] = peer_rows(cfg, load, rates, args)
        report("transformers serve --continuous-batching", out["transformers"])
        write(args.json, out)  # kept should the jaxformer side not finish
    if "jaxformer" in args.servers:
        jaxformer_side(cfg, load, rates, args, offline, out)
        write(args.json, out)
    return 0


def write(path: str | None, out: dict) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(path + ".tmp", path)


def jaxformer_side(cfg, load: Load, rates, args, offline, out: dict) -> None:
    """jaxformer serve over the rates, then the offline engine and batch 1 (module doc)."""
    tok = HFJsonTokenizer.from_tokenizer(word_tokenizer(cfg.vocab_size))
    model = jf.Model.random(cfg, dtype=args.dtype, seed=0, tokenizer=tok)
    print(f"# {jax_device()}, jaxformer serve: {load.preset}, {args.dtype}, "
          f"{load.slots} slots", flush=True)
    out["jaxformer"] = jaxformer_rows(model, load, rates, args)
    gc.collect()  # the server's scheduler and page pool, before the offline engine's
    # the offline engine on the requests of the sustained rate (else the highest), all at once
    rows = out["jaxformer"]["rates"]
    at = sustained(rows) or rates[-1]
    row = next(r for r in rows if r["rate"] == at)
    reqs = requests(load, row["sent"], cfg.vocab_size)
    w = offline.Workload(load.preset, len(reqs), load.prompt, load.new[1], slots=load.slots)
    # the server's scheduler sizes, so the programs compiled for the server are reused
    eng = offline.run_engine(model, w, [p for p, _ in reqs], args, news=[n for _, n in reqs],
                             max_length=load.prompt[1] + load.new[1])
    out["offline"] = {"rate": at, **eng}
    if row.get("tok_s"):
        out["offline"]["http_share"] = row["tok_s"] / eng["tok_s"]
    single = offline.run_single(model, w, args, *args.single,
                                max_length=load.prompt[1] + load.new[1])
    out["engine_single"] = single
    report("jaxformer serve", out["jaxformer"], out)


def jax_device() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind}, jax {jax.__version__}"


def report(name: str, r: dict, whole: dict | None = None) -> None:
    print(f"\n## {name}")
    if "error" in r:
        print(f"not run: {r['error']}", flush=True)
        return
    print(f"ready in {r['ready_s']:.0f} s")
    head = ["rate/s", "sent", "failed", "tok/s", "TTFT p50", "p99", "ITL p50", "p99",
            "E2E p50", "p99", "SLO", "offered"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for x in r["rates"]:
        if not x["ok"]:
            print(f"| {x['rate']:g} | {x['sent']} | {x['failed']} | - | " + "- | " * 6
                  + f"{x['errors']} |")
            continue
        print(f"| {x['rate']:g} | {x['sent']} | {x['failed']} | {x['tok_s']:.1f} | "
              f"{x['ttft_p50_s'] * 1e3:.0f} ms | {x['ttft_p99_s'] * 1e3:.0f} ms | "
              f"{x['itl_p50_s'] * 1e3:.1f} ms | {x['itl_p99_s'] * 1e3:.1f} ms | "
              f"{x['e2e_p50_s']:.2f} s | {x['e2e_p99_s']:.2f} s | "
              f"{'yes' if x['sustains'] else 'no'} | {x['offered_tok_s']:.1f} |")
    s = sustained(r["rates"])
    print(f"sustained (p99 TTFT < {SLO_TTFT_S:g} s, p99 ITL < {SLO_ITL_S * 1e3:g} ms): "
          f"{'none' if s is None else f'{s:g} requests/s'}")
    if whole is not None:
        o = whole["offline"]
        print(f"offline engine on the {o['rate']:g}/s requests: {o['tok_s']:.1f} tokens/s; "
              f"HTTP at that rate: {o.get('http_share', float('nan')):.0%} of it (target 80%)")
        sg, eng = r["single"], whole["engine_single"]
        if "error" in sg:
            print(f"single request: {sg['error']}")
        else:
            print(f"single request streamed: {sg['tok_s']:.1f} tokens/s, decode "
                  f"{sg['decode_ms']:.2f} ms/token; engine batch 1: decode "
                  f"{eng['sched_decode_ms']:.2f} ms/token "
                  f"({eng['sched_decode_ms'] / sg['decode_ms']:.0%}), generate() "
                  f"{eng['generate_ms_per_token']:.2f} ms/token")
        guidellm_run.report(r["rates"], r["guidellm"])
        peer = whole.get("transformers")
        if peer and "rates" in peer:
            p = sustained(peer["rates"])
            print(f"sustained rate: jaxformer {s}, transformers {p} "
                  f"(target: jaxformer >= 3x)")
    sys.stdout.flush()
