"""guidellm (a third-party load generator, https://github.com/vllm-project/guidellm, 0.8.x)
against a running server over the load benchmark's own requests: a second client's view of
the same throughput and latencies (serving_load.py calls it with --guidellm).

guidellm runs as a separate program (its own virtual environment: its pins of click, httpx
and pydantic are not this project's), offline: the prompts are a JSON-lines file of the load
benchmark's requests (prompt text "t<i> t<j> ...", prompt_tokens_count, output_tokens_count;
guidellm sends max_tokens = output_tokens_count with ignore_eos, so each request generates
exactly its output length) and its tokenizer a local directory holding the server's word
tokenizer (tokenizer.json; AutoTokenizer loads it). Per rate, one `guidellm run` with a
Poisson profile at that rate, the same number of requests as the benchmark's own client
(max_requests), bounded by max_duration = requests / rate + drain, and the results read from
its JSON output. guidellm's synthetic_text data can draw the same shape (prompt_tokens and
output_tokens with _min/_max and no _stdev are uniform in [min, max]), but its prompts are
Faker words, which the word tokenizer maps to its unknown token, a special token guidellm's
decode drops (empty prompts), so the file of the benchmark's own requests is used instead.

Definitions: tok/s is output tokens over first send to last answer, as the load client counts
it, from guidellm's per-request timings (guidellm's own output tokens/s, over its whole
benchmark, is kept as guidellm_tok_s); "offered" is output tokens over first to last send
(each client draws its own Poisson arrivals, so with few requests their spans differ). TTFT is
request start to the first chunk with text. ITL is per request (last token time - first token
time) / (output tokens - 1), its percentiles over requests weighted by tokens, where the load
client's are over every gap between chunks: the p50s should agree, and guidellm's p99, of
per-request means, sits below the client's per-gap p99.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile

# guidellm runs offline; CUDA hidden: its torch must not take the GPU the server holds
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
START_S = 180.0  # seconds guidellm may take to start (imports torch, transformers, datasets)


def find(exe: str | None) -> tuple[str | None, str | None]:
    """(the guidellm program, None) or (None, why it cannot run)."""
    if not exe or exe == "none":
        return None, "not asked for (--guidellm none)"
    path = exe if os.sep in exe else shutil.which(exe)
    if path is None or not os.access(path, os.X_OK):
        return None, (f"no guidellm program at {exe!r} (pip install guidellm into a venv of "
                      "its own and pass --guidellm VENV/bin/guidellm)")
    try:
        v = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **ENV})
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} --version failed: {e}"
    if v.returncode != 0:
        return None, f"{path} --version failed: {(v.stderr or v.stdout)[-300:]}"
    return path, None


def write_inputs(folder: str, tokenizer, reqs: list[tuple[list[int], int]]) -> tuple[str, str]:
    """The tokenizer directory and the requests' JSON-lines file guidellm reads."""
    tok = os.path.join(folder, "tokenizer")
    os.makedirs(tok)
    tokenizer.save(os.path.join(tok, "tokenizer.json"))
    with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30},
                  f)
    data = os.path.join(folder, "requests.jsonl")
    with open(data, "w") as f:
        for prompt, new in reqs:
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in prompt),
                                "prompt_tokens_count": len(prompt),
                                "output_tokens_count": new}) + "\n")
    return tok, data


def command(exe: str, url: str, model: str, tok: str, data: str, rate: float, n: int,
            seconds: float, out: str) -> list[str]:
    """`guidellm run` (0.8.x's CLI) of n requests at a Poisson rate over /v1/completions."""
    return [exe, "run",
            "--backend", f"kind=openai_http,target={url},model={model},"
                         "request_format=/v1/completions",
            "--profile", f"kind=poisson,rate={rate:g}",
            "--constraint", f"kind=max_requests,count={n}",
            "--constraint", f"kind=max_duration,seconds={math.ceil(seconds)}",
            "--tokenizer", f"kind=huggingface_auto,model={tok}",
            "--data", f"kind=json_file,path={data}",
            "--seed", "kind=static,value=0",
            "--output", f"kind=json,path={out}",
            "--disable-console-interactive"]


def row(result: dict, rate: float, n: int) -> dict:
    """The load client's row keys from guidellm's JSON output (its first benchmark)."""
    b = result["benchmarks"][0]
    m = b["metrics"]
    totals = m["request_totals"]
    out = {"rate": rate, "sent": n, "ok": totals["successful"],
           "failed": n - totals["successful"], "errors": []}
    if out["failed"]:
        out["errors"] = [f"{totals['errored']} errored, {totals['incomplete']} incomplete, "
                         f"{n - totals['total']} not sent"]
    if not totals["successful"]:
        return out

    def pct(name, p, scale):
        return m[name]["successful"]["percentiles"][p] * scale

    # tokens/s as the load client counts it: over first send to last answer, from each
    # request's timings (guidellm's own figure, over its whole benchmark, kept beside it);
    # offered: over first to last send, what the Poisson arrivals asked for
    t = [q["info"]["timings"] for q in b["requests"]["successful"]]
    start, sent, end = (min(x["request_start"] for x in t), max(x["request_start"] for x in t),
                        max(x["request_end"] for x in t))
    tokens = int(m["output_token_count"]["successful"]["total_sum"])
    out.update(tokens=tokens, seconds=end - start, tok_s=tokens / (end - start),
               offered_tok_s=tokens / max(sent - start, 1e-9),
               guidellm_tok_s=m["output_tokens_per_second"]["successful"]["mean"])
    for key, name, scale in (("ttft", "time_to_first_token_ms", 1e-3),
                             ("itl", "inter_token_latency_ms", 1e-3),
                             ("e2e", "request_latency", 1.0)):
        out[f"{key}_p50_s"] = pct(name, "p50", scale)
        out[f"{key}_p99_s"] = pct(name, "p99", scale)
    return out


def rows(exe: str, url: str, model: str, tokenizer, reqs, rates, counts, drain: float) -> dict:
    """guidellm at each rate (counts[i] requests, the first of reqs) against the server at url:
    {"rates": [a row per rate], "command": the last rate's}; a rate guidellm fails on gets a
    row of failures with its error."""
    folder = tempfile.mkdtemp(prefix="guidellm-")
    try:
        tok, data = write_inputs(folder, tokenizer, reqs[: max(counts)])
        out = []
        for rate, n in zip(rates, counts):
            seconds = n / rate + drain
            path = os.path.join(folder, f"rate-{rate:g}.json")
            cmd = command(exe, url, model, tok, data, rate, n, seconds, path)
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=folder,
                                   timeout=seconds + START_S, env={**os.environ, **ENV})
                if p.returncode != 0 or not os.path.exists(path):
                    raise RuntimeError(f"exit {p.returncode}: {(p.stderr or p.stdout)[-400:]}")
                with open(path) as f:
                    out.append(row(json.load(f), rate, n))
            except (subprocess.TimeoutExpired, RuntimeError, KeyError, IndexError,
                    json.JSONDecodeError) as e:
                out.append({"rate": rate, "sent": n, "ok": 0, "failed": n,
                            "errors": [f"guidellm: {type(e).__name__}: {e}"[:400]]})
        return {"rates": out, "command": " ".join(cmd)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(client: list[dict], gl: dict) -> None:
    """guidellm's numbers beside the load client's, a line per rate."""
    print("\n## guidellm against jaxformer serve (the same requests; module docstring)")
    if "error" in gl:
        print(f"not run: {gl['error']}", flush=True)
        return
    head = ["rate/s", "failed (client/gl)", "tok/s client", "guidellm", "offered client",
            "guidellm", "TTFT p50 client",
            "guidellm", "TTFT p99 client", "guidellm", "ITL p50 client", "guidellm",
            "ITL p99 client", "guidellm"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c, g in zip(client, gl["rates"]):
        cells = [f"{c['rate']:g}", f"{c['failed']}/{g['failed']}", _tok(c), _tok(g),
                 _tok(c, "offered_tok_s"), _tok(g, "offered_tok_s")]
        for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
            cells += [_ms(c, k), _ms(g, k)]
        print("| " + " | ".join(cells) + " |")
        if g["errors"]:
            print(f"  guidellm at {g['rate']:g}/s: {g['errors'][0]}")
    print("(ITL: the client's per gap, guidellm's a mean per request; see guidellm_run.py)",
          flush=True)


def _tok(x: dict, k: str = "tok_s") -> str:
    return f"{x[k]:.1f}" if k in x else "-"


def _ms(x: dict, k: str) -> str:
    return f"{x[k] * 1e3:.1f} ms" if k in x else "-"
