"""The tick structure of a serving workload, on any machine: the workload's requests through
the scheduler with serving.py's settings (page size, prefill budget, chunks, steps a tick),
over a tiny stand-in model of the same context length, counting what does not depend on the
hardware: ticks with a prefill call and without, prompt tokens each prefilled, and the
decoding rows of every tick. With the per-step costs measured on a card (`--step-ms FIXED
PER_ROW`: a decode step of r rows takes FIXED + PER_ROW x r ms) and its matmul rate, it
prints the device seconds that structure implies, to set against serving.py's measured run
(its rows' "ticks" split), so the difference is the time the ticks lose outside their
kernels.

    python benchmarks/serving_ticks.py --workload w2
    python benchmarks/serving_ticks.py --workload w2 --steps-per-tick 16 --prefill-tokens 8192

Defaults of --step-ms are W2's on an H100 (docs/benchmarks.md, session 16: 20.2 ms a step at
512 rows, of which ~6.7 ms read the weights whatever the rows).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import numpy as np

import jaxformer as jf
import serving
from jaxformer.models import num_params
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.scheduler import SchedulerConfig

# a stand-in small enough that the CPU runs W2's 1024 x 512 tokens in seconds
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_size=64)


def run(w: serving.Workload, a) -> list[tuple[int, int]]:
    """(decoding rows, prompt tokens prefilled) of every tick until idle."""
    max_len = w.prefix + w.prompt[1] + w.new
    cfg = jf.ModelConfig.from_preset("demo").replace(
        max_position_embeddings=max(512, 1 << (max_len - 1).bit_length()), **TINY)
    model = jf.Model.random(cfg, dtype="float32")
    ps = a.page_size
    pages = w.slots * -(-(max_len + 1) // ps) + 64 if a.num_pages is None else a.num_pages
    sched = PagedScheduler(
        model, SchedulerConfig(slots=w.slots, max_length=max_len,
                               steps_per_tick=a.steps_per_tick, max_queue=1 << 20),
        PagedConfig(page_size=ps, num_pages=pages, prefill_tokens=a.prefill_tokens,
                    chunk=a.chunk, min_chunk=a.min_chunk, plain_windows=True))
    for p in serving.prompts(w, cfg.vocab_size - 3):
        sched.submit(p, None, max_new_tokens=w.new, ignore_eos=True)
    rows = []
    decode = sched._decode

    def counted():  # the rows of this tick's decode window, as the scheduler runs it
        rows.append(len(sched._live))
        decode()

    sched._decode = counted
    ticks, more = [], True
    while more:
        rows.clear()
        computed = sched.prefill_real
        more = sched.tick()
        ticks.append((sum(rows), sched.prefill_real - computed))
    sched.stop()
    print(f"# preemptions {sched.preemptions}, pool {pages} pages of {ps}")
    return ticks


def main(argv=None) -> list[tuple[int, int]]:
    """Prints the table; returns every tick's (decoding rows, prompt tokens prefilled)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="w2", choices=sorted(serving.WORKLOADS))
    ap.add_argument("--requests", type=int, default=None, help="default: the workload's")
    for k, v in serving.FULL_ARGS.items():
        if k != "dtype":
            ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--num-pages", type=int, default=None, help="default: every slot's whole "
                    "sequence (no preemption)")
    ap.add_argument("--step-ms", nargs=2, type=float, default=[6.7, 13.5 / 512],
                    metavar=("FIXED", "PER_ROW"))
    ap.add_argument("--matmul-tflops", type=float, default=650.0)
    a = ap.parse_args(argv)
    w = serving.WORKLOADS[a.workload]
    if a.requests is not None:
        if a.requests < 1:
            ap.error(f"--requests: must be positive, got {a.requests}")
        w = dataclasses.replace(w, requests=a.requests)
    t = time.perf_counter()
    ticks = run(w, a)
    print(f"# {a.workload}: {w.requests} x ({w.prefix} + {w.prompt[0]}..{w.prompt[1]} + "
          f"{w.new}), {w.slots} slots; {time.perf_counter() - t:.0f} s on this machine")
    pre = [(r, c) for r, c in ticks if c]
    dec = [r for r, c in ticks if not c]
    fixed, per_row = a.step_ms
    cfg = jf.ModelConfig.from_preset(w.preset)
    step_s = sum(a.steps_per_tick * (fixed + per_row * r) for r, _ in ticks) / 1e3
    prefill_s = sum(c for _, c in pre) * 2 * num_params(cfg) / (a.matmul_tflops * 1e12)
    print("| ticks | with a prefill (prompt tokens) | decode only | mean rows (prefill / "
          "decode ticks) | decode steps x rows | device s implied (steps + prefill) |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(ticks)} | {len(pre)} ({sum(c for _, c in pre)}) | {len(dec)} | "
          f"{np.mean([r for r, _ in pre]) if pre else 0:.0f} / "
          f"{np.mean(dec) if dec else 0:.0f} | "
          f"{a.steps_per_tick * sum(r for r, _ in ticks)} | "
          f"{step_s + prefill_s:.1f} ({step_s:.1f} + {prefill_s:.1f}) |")
    bins = collections.Counter(min(r // 64 * 64, w.slots) for r, _ in ticks)
    print("# ticks by decoding rows (64s):",
          ", ".join(f"{k}: {v}" for k, v in sorted(bins.items())))
    return ticks


if __name__ == "__main__":
    main()
