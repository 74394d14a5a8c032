"""Offline serving throughput: issue 22's workloads through continuous batching over a paged
KV cache (serving.PagedScheduler), against the chunked generate() and transformers in the
same run, and against each workload's roofline.

    python benchmarks/serving.py                       # W1-W4, steady state, single request
    python benchmarks/serving.py --workloads w2 --hf   # one workload (+ transformers rows)
    python benchmarks/serving.py --tiny                # a CPU smoke run of the same code
    python benchmarks/serving.py --server              # the HTTP load run (serving_load.py)

Workloads (random weights, bf16, greedy, no EOS: every request generates its new tokens):
  W1  llama-7b    256 requests, prompts uniform in 32..1024 (seed 0), 128 new tokens
  W2  llama3-8b  1024 requests, prompt 128, 512 new tokens (output-heavy, GQA)
  W3  gpt3-6.7b   256 requests, prompt 128, 128 new tokens (transformers' static batch 256
                  with --hf)
  W4  llama-7b    256 requests sharing a 512-token prefix plus 64 tokens of their own,
                  64 new tokens: prefix caching on, then off

Each engine run first compiles every shape the loop calls (PagedScheduler.warmup, timed
apart), then submits all requests at once and runs until idle; `compiles` counts the XLA
compiles inside that timed run (0: warmup left nothing to compile). The page pool is sized by the
memory plan (memory.pool_plan), capped by what the device has free in one block once the
model is loaded (memory.fit_pool). The roofline of a workload: prefill FLOPs (2 x params per
token plus causal attention; a shared prefix counted once) at the measured bf16 matmul rate,
plus, per decode step with every request running, the larger of (weights + live KV bytes) at
the measured copy bandwidth and the step's FLOPs at the matmul rate. `steady` runs the largest
batch of requests of the workload's mean length the pool holds through the run (the slots,
or fewer: the row says so), each with new tokens enough to outlive the ticks that prefill
the later prompts, and times decode ticks only against the roofline of a step at the batch
and mean length actually timed, and the same windows as bare engine calls of the same rows
(the scheduler's host time per step is the difference); `single` is one request through the
scheduler against batch-1 generate().
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time

import jax
import numpy as np

import harness
import serving_load
from serving_report import report, row_note
import jaxformer as jf
from jaxformer import memory
from jaxformer.cli_args import SERVE_GPU_MEMORY, fraction, set_gpu_memory
from jaxformer.models import num_params
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.request import FINISHED
from jaxformer.serving.scheduler import SchedulerConfig


@dataclasses.dataclass(frozen=True)
class Workload:
    preset: str
    requests: int
    prompt: tuple[int, int]  # own tokens per request, uniform in [lo, hi]
    new: int
    prefix: int = 0  # tokens every request shares ahead of its own
    slots: int = 256
    chunked: int = 0  # generate() over consecutive chunks of this many prompts (0: not run)
    hf: int = 0  # transformers' static batch of this many (with --hf)


WORKLOADS = {
    "w1": Workload("llama-7b", 256, (32, 1024), 128, slots=256, chunked=64),
    "w2": Workload("llama3-8b", 1024, (128, 128), 512, slots=512),
    "w3": Workload("gpt3-6.7b", 256, (128, 128), 128, slots=256, hf=256),
    "w4": Workload("llama-7b", 256, (64, 64), 64, prefix=512, slots=256),
}
TINY = {k: dataclasses.replace(w, preset="demo", requests=12, prompt=(4, 40) if k == "w1" else
                               (8, 8), new=6, prefix=16 if w.prefix else 0, slots=8,
                               chunked=4 if w.chunked else 0)
        for k, w in WORKLOADS.items()}


def prompts(w: Workload, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(w.prompt[0], w.prompt[1] + 1, w.requests)
    prefix = rng.integers(0, vocab, w.prefix).tolist()
    return [prefix + rng.integers(0, vocab, int(n)).tolist() for n in lens]


def roofline(cfg, dtype, lengths, new: int, prefix: int, ceil: dict) -> dict:
    """Seconds the workload needs at the card's measured ceilings (module docstring)."""
    P, L, N, H = num_params(cfg), cfg.num_layers, cfg.num_heads, cfg.dims_per_head
    mm, bw = ceil["matmul_TFLOPs"] * 1e12, ceil["copy_GBps"] * 1e9
    own = np.asarray(lengths) - prefix
    attn = lambda q, k0: 4 * L * N * H * (q * k0 + q * (q + 1) / 2)  # noqa: E731  q after k0
    flops = 2 * P * (prefix + own.sum()) + attn(prefix, 0) + sum(attn(q, prefix) for q in own)
    weights = memory.weights_bytes(cfg, None, dtype)
    per_tok = memory.kv_cache_bytes(cfg, None, dtype, 1, 1)
    n, live0 = len(lengths), float(np.sum(lengths))
    decode = 0.0
    for s in range(new - 1):  # the first token comes with prefill
        live = live0 + n * s
        decode += max((weights + per_tok * live) / bw, (2 * P * n + 4 * L * N * H * live) / mm)
    return {"prefill_s": flops / mm, "decode_s": decode, "total_s": flops / mm + decode}


def step_roofline(cfg, dtype, batch: int, length: float, ceil: dict) -> float:
    """Seconds of one decode step of `batch` rows holding `length` tokens each."""
    P, L, N, H = num_params(cfg), cfg.num_layers, cfg.num_heads, cfg.dims_per_head
    bytes_ = memory.weights_bytes(cfg, None, dtype) \
        + memory.kv_cache_bytes(cfg, None, dtype, 1, 1) * batch * length
    flops = 2 * P * batch + 4 * L * N * H * batch * length
    return max(bytes_ / (ceil["copy_GBps"] * 1e9), flops / (ceil["matmul_TFLOPs"] * 1e12))


def pool_pages(model, w: Workload, args) -> int:
    """The workload's pool: --num-pages, else the memory plan's pages capped by what the
    devices have free now (in one block). Planned once per workload, before its first row,
    so every row runs the same pool: a row planned after another would see the allocator's
    state that row left (its freed blocks split by later allocations)."""
    if args.num_pages:
        return args.num_pages
    pool = memory.pool_plan(model.config, None, args.dtype, page_size=args.page_size,
                            slots=w.slots, prefill_tokens=args.prefill_tokens,
                            device_memory=args.device_memory)
    if args.device_memory is None:  # what the devices have free now, in one block
        pool = memory.fit_pool(pool, model.mesh.devices.flat)
    return pool.num_pages


def scheduler(model, w: Workload, args, max_length: int, prefix_caching=True,
              overlap: bool | None = None, warm: bool = True, plain: bool | None = None,
              pages: int | None = None):
    """A PagedScheduler for the workload (its pool `pages`, default pool_pages), every
    shape compiled first unless not warm: (scheduler, {warmup_s, pages, shapes})."""
    pages = pages or pool_pages(model, w, args)
    sched = PagedScheduler(
        model, SchedulerConfig(slots=w.slots, max_length=max_length,
                               steps_per_tick=args.steps_per_tick, max_queue=1 << 20),
        PagedConfig(page_size=args.page_size, num_pages=pages,
                    prefill_tokens=args.prefill_tokens, chunk=args.chunk,
                    min_chunk=args.min_chunk, prefix_caching=prefix_caching,
                    overlap=args.overlap == "on" if overlap is None else overlap,
                    plain_windows=args.plain_windows != "off" if plain is None else plain))
    if not warm:
        return sched, {"warmup_s": 0.0, "pages": pages, "shapes": 0}
    t = time.perf_counter()
    shapes = sched.warmup(args.compile_workers)
    return sched, {"warmup_s": time.perf_counter() - t, "pages": pages,
                   "shapes": sum(len(v) for v in shapes.values())}


def run_engine(model, w: Workload, ps, args, prefix_caching=True, news=None,
               max_length=None, overlap: bool | None = None, plain: bool | None = None,
               pages: int | None = None) -> dict:
    """All of ps at once until idle; news: each request's new tokens (default w.new);
    max_length: the scheduler's (default the longest request's); pages: the pool's."""
    news = news or [w.new] * len(ps)
    sched, info = scheduler(model, w, args, max_length or max(map(len, ps)) + max(news),
                            prefix_caching, overlap, plain=plain, pages=pages)
    compiles = []
    listen = lambda event, secs, **kw: compiles.append(event) \
        if event == "/jax/core/compile/backend_compile_duration" else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        t0 = time.perf_counter()
        hs = [sched.submit(p, None, max_new_tokens=n, ignore_eos=True)
              for p, n in zip(ps, news)]
        ticks = run_ticks(sched)
        dt = time.perf_counter() - t0
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    outs = [h.result(timeout=0) for h in hs]
    bad = [o for o, n in zip(outs, news) if o.status != FINISHED or len(o.tokens) != n]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not finish: {bad[0].reason}")
    ttft = np.asarray([o.times["first_token"] - t0 for o in outs])
    row = dict(seconds=dt, tok_s=sum(news) / dt, ttft_p50_s=float(np.median(ttft)),
               preemptions=sched.preemptions, prefix_hit_tokens=sched.pool.prefix_hit_tokens,
               prefill_fill=sched.prefill_real / max(1, sched.prefill_computed),
               compiles=len(compiles), ticks=ticks, **info)
    sched.stop()
    del sched
    gc.collect()
    return row


def run_ticks(sched) -> dict:
    """sched.run_until_idle(), each tick timed: where a run's time goes, split into the
    ticks that ran a prefill call (with or without a decode window) and those that only
    decoded, each kind's count, seconds and mean decoding rows."""
    kinds = {k: dict(n=0, seconds=0.0, rows=0) for k in ("prefill", "decode")}
    more = True
    while more:
        rows, computed = len(sched._live), sched.prefill_computed
        t = time.perf_counter()
        more = sched.tick()
        k = kinds["prefill" if sched.prefill_computed > computed else "decode"]
        k["n"] += 1
        k["seconds"] += time.perf_counter() - t
        k["rows"] += rows
    for k in kinds.values():
        k["rows"] = k["rows"] / max(1, k["n"])
    return kinds


def run_chunked(model, w: Workload, ps) -> dict:
    """The public generate() over consecutive chunks of w.chunked prompts (the first chunk
    run once before timing, for its compile)."""
    model.generate(ps[: w.chunked], max_new_tokens=w.new, ignore_eos=True)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(ps), w.chunked):
        out = model.generate(ps[i: i + w.chunked], max_new_tokens=w.new, ignore_eos=True)
        n += sum(len(t) for t in out.tokens)
    dt = time.perf_counter() - t0
    if n != len(ps) * w.new:
        raise RuntimeError(f"chunked generate() gave {n} tokens, not {len(ps) * w.new}")
    return dict(seconds=dt, tok_s=n / dt)


def prefill_ticks(sched, n: int, length: int) -> list[int]:
    """The tick (from 1) in which each of n prompts of `length` tokens, submitted at once
    into free slots, is prefilled: the scheduler's call shapes (PagedScheduler._call_shape),
    the prompts being prefilled first, then the next ones in order."""
    rest, done, order, tick = [length] * n, [0] * n, list(range(n)), 0
    while order:
        tick += 1
        b, C = sched._call_shape([rest[i] for i in order])
        for i in order[:b]:
            rest[i] -= min(rest[i], C)
            done[i] = tick if not rest[i] else 0
        order = [i for i in order[:b] if rest[i]] + order[b:]
    return done


def steady_plan(sched, slots: int, length: int, ticks: int) -> dict:
    """The largest batch of prompts of `length` tokens whose pages the pool holds through
    the steady run (every row decodes while the later prompts are prefilled, one more tick,
    then `ticks` timed ticks; the bare engine steps after them write the null page), and
    new tokens enough that no row finishes before the bare steps end (the prefill ticks
    counted, a quarter more as margin): {batch, prefill_ticks, max_new}."""
    W, ps = sched.config.steps_per_tick, sched.paged.page_size

    def plan(n):
        done = prefill_ticks(sched, n, length)
        P = max(done)
        # tokens row i made by the last timed tick: its first, then W per tick from its own
        made = [1 + W * (P - t + 2 + ticks) for t in done]
        pages = sum(-(-(length + m + W) // ps) for m in made)  # _grow's pages: W ahead
        return dict(batch=n, prefill_ticks=P, pages=pages,
                    max_new=1 + W * (P + P // 4 + 4 + 2 * ticks))

    lo, hi = 1, slots  # the largest batch whose pages fit the pool (page 0 is the null page)
    if plan(1)["pages"] > sched.paged.num_pages - 1:
        raise ValueError(f"steady: one row of {length} tokens needs more than the pool's "
                         f"{sched.paged.num_pages - 1} pages")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan(mid)["pages"] <= sched.paged.num_pages - 1 else (lo, mid - 1)
    return plan(lo)


def run_steady(model, w: Workload, args, length: int, ticks: int) -> dict:
    """The largest batch the pool holds (steady_plan) of requests of `length` prompt tokens,
    then decode ticks alone, timed; `batch` is the rows that decoded in them, `length` their
    mean length over the timed ticks."""
    probe, _ = scheduler(model, w, args, length + 1, warm=False)
    p = steady_plan(probe, w.slots, length, ticks)
    del probe
    sched, _ = scheduler(model, w, args, length + p["max_new"])
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    hs = [sched.submit(rng.integers(0, vocab, length).tolist(), None,
                       max_new_tokens=p["max_new"], ignore_eos=True)
          for _ in range(p["batch"])]
    prefill = 0
    while any(not h.tokens for h in hs) and sched.tick():  # every prompt prefilled
        prefill += 1
    sched.tick()
    jax.block_until_ready(sched._state.last)
    live = lambda: [h for h in hs if h.status == "running"]  # noqa: E731
    before = [len(h.prompt) + len(h.tokens) for h in live()]
    t0 = time.perf_counter()
    for _ in range(ticks):
        sched.tick()
    jax.block_until_ready(sched._state.last)
    step = (time.perf_counter() - t0) / (ticks * args.steps_per_tick)
    after = [len(h.prompt) + len(h.tokens) for h in live()]
    # the same windows as bare engine calls (no host work between them): the step's device
    # time, so step_ms - device_step_ms is the scheduler's host time per step. Past the
    # pages the scheduler gave, rows write the null page: the same work, nothing read back.
    rows = next(r for r in sched.engine.decode_rows() if r > max(sched._live))
    state = sched._state
    t0 = time.perf_counter()
    for _ in range(ticks):
        state = sched.engine.step(state, args.steps_per_tick, rows=rows)
    jax.block_until_ready(state.last)
    device = (time.perf_counter() - t0) / (ticks * args.steps_per_tick)
    ended = int(np.sum(np.asarray(state.done)[: rows]) - (rows - len(after)))
    sched._state = state
    preempted = sched.preemptions
    sched.stop()
    return dict(batch=min(len(before), len(after)), planned=p["batch"], slots=w.slots,
                rows=rows, length=(np.mean(before) + np.mean(after)) / 2,
                prefill_ticks=prefill, planned_prefill_ticks=p["prefill_ticks"],
                preemptions=preempted, ended_in_bare_steps=ended,
                step_ms=step * 1e3, device_step_ms=device * 1e3)


def run_single(model, w: Workload, args, prompt: int, new: int, max_length=None) -> dict:
    rng = np.random.default_rng(2)
    p = rng.integers(0, model.config.vocab_size, prompt).tolist()
    model.generate([p], max_new_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    model.generate([p], max_new_tokens=new, ignore_eos=True)
    gen = time.perf_counter() - t
    sched, _ = scheduler(model, w, args,
                         max_length or prompt + new)
    for _ in range(2):  # the second run is timed
        t = time.perf_counter()
        h = sched.submit(p, None, max_new_tokens=new, ignore_eos=True)
        sched.run_until_idle()
        out = h.result(timeout=0)
        dt = time.perf_counter() - t
    sched.stop()
    first = out.times["first_token"] - out.times["submitted"]
    return dict(generate_ms_per_token=gen / new * 1e3, sched_ms_per_token=dt / new * 1e3,
                sched_decode_ms=(dt - first) / (new - 1) * 1e3)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["w1", "w2", "w3", "w4"],
                    choices=sorted(WORKLOADS))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the demo preset")
    ap.add_argument("--hf", action="store_true", help="transformers rows (a CUDA torch)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--page-size", type=int, default=None)
    ap.add_argument("--num-pages", type=int, default=None, help="default: the memory plan")
    ap.add_argument("--device-memory", default=None, help="default: what jax reports")
    ap.add_argument("--gpu-memory", type=fraction, default=None, metavar="FRACTION",
                    help=f"share of the GPU jax takes (default: $XLA_PYTHON_CLIENT_MEM_FRACTION "
                         f"where set, else {SERVE_GPU_MEMORY}, as jaxformer serve)")
    ap.add_argument("--prefill-tokens", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--min-chunk", type=int, default=None)
    ap.add_argument("--steps-per-tick", type=int, default=None)
    ap.add_argument("--graph-control-flow", action="store_true",
                    help="RunConfig.graph_control_flow: conds and while loops as CUDA-graph "
                         "nodes (no host wait at each)")
    ap.add_argument("--plain-windows", default="on", choices=["off", "on", "both"],
                    help="PagedConfig.plain_windows (the fixed decode window and the plain "
                         "chunk prefill for greedy batches, no host syncs); both: also an "
                         "engine row without them")
    ap.add_argument("--overlap", default="on", choices=["off", "on", "both"],
                    help="the host reads each plain call's tokens while the next runs "
                         "(PagedConfig.overlap, on by default on GPUs); both: an engine row "
                         "without it and one with it")
    ap.add_argument("--compile-workers", type=int, default=1,
                    help="threads that compile the warm-up shapes (PagedEngine.precompile)")
    ap.add_argument("--no-steady", action="store_true")
    ap.add_argument("--no-single", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    g = ap.add_argument_group("--server: the HTTP load run (benchmarks/serving_load.py)")
    g.add_argument("--server", action="store_true", help="the load run instead of W1-W4")
    g.add_argument("--rates", nargs="+", type=float, help="requests/s (default 1 2 4 8 16)")
    g.add_argument("--requests", type=int, help="requests per rate at most (default 512)")
    g.add_argument("--duration", type=float, help="seconds of arrivals per rate at most")
    g.add_argument("--slots", type=int, help="the server's running batch (default 256)")
    g.add_argument("--servers", nargs="+", default=["transformers", "jaxformer"],
                   choices=["transformers", "jaxformer"],
                   help="which servers to load (transformers: serve --continuous-batching; "
                        "not with --tiny)")
    g.add_argument("--server-timeout", type=float, default=1800.0,
                   help="seconds a server may take to load and compile")
    g.add_argument("--guidellm", default="guidellm", metavar="EXE",
                   help="also load jaxformer's server with guidellm (benchmarks/guidellm_run"
                        ".py): its program, from a venv of its own (default: on PATH; "
                        "none: skip)")
    g.add_argument("--single", nargs=2, type=int, default=None, metavar=("PROMPT", "NEW"),
                   help="the lone request's lengths (default 128 128)")
    return ap


FULL_ARGS = dict(dtype="bfloat16", page_size=16, prefill_tokens=4096, chunk=512, min_chunk=128,
                 steps_per_tick=8)
TINY_ARGS = dict(dtype="float32", page_size=4, prefill_tokens=64, chunk=32, min_chunk=16,
                 steps_per_tick=2, num_pages=160, device_memory="1GiB")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    set_gpu_memory(args.gpu_memory)  # before anything touches a device
    base = TINY_ARGS if args.tiny else FULL_ARGS
    if args.server and args.tiny:
        base = {**base, **serving_load.TINY_ARGS}
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.server:
        args.single = args.single or ([8, 6] if args.tiny else [128, 128])
        return serving_load.main(args, sys.modules[__name__])
    table = TINY if args.tiny else WORKLOADS
    hf = {}
    if args.hf and not args.tiny:  # before this process's jax takes the GPU
        shapes = [(table[k].preset, table[k].hf, table[k].prompt[0], False)
                  for k in args.workloads if table[k].hf]
        rows = harness.hf_rows(shapes, table["w3"].new) if shapes else {}
        hf = {(p, b): r for (p, _, b), r in rows.items()}
    ceil = harness.ceilings(args.tiny)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; measured ceilings: "
          f"copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    rows, models, t0 = [], {}, time.perf_counter()

    def note(what):  # progress on stderr: a run cut short by a time limit still shows where
        print(f"[{time.perf_counter() - t0:6.0f} s] {what}", file=sys.stderr, flush=True)

    for k in args.workloads:
        w = table[k]
        if w.preset not in models:
            models.clear()
            gc.collect()
            models[w.preset] = jf.Model.random(jf.ModelConfig.from_preset(w.preset),
                                               dtype=args.dtype, seed=0).with_run(
                graph_control_flow=args.graph_control_flow)
            note(f"{k}: {w.preset} loaded")
        model = models[w.preset]
        ps = prompts(w, model.config.vocab_size)
        roof = roofline(model.config, args.dtype, [len(p) for p in ps], w.new,
                        w.prefix, ceil)
        out = {"workload": k, "preset": w.preset, "requests": w.requests,
               "roofline_s": roof["total_s"], "roof_prefill_s": roof["prefill_s"]}
        pages = pool_pages(model, w, args)
        if w.chunked:  # first: its contiguous caches want blocks the pool rows would split
            out["chunked"] = run_chunked(model, w, ps)
            note(f"{k}: chunked generate() {out['chunked']['tok_s']:.0f} tok/s")
        runs = [("engine", {})]
        if args.overlap == "both":
            runs.append(("overlap", dict(overlap=True)))
        if args.plain_windows == "both":
            runs.append(("plain_off", dict(plain=False)))
        if w.prefix:
            runs.append(("prefix_off", dict(prefix_caching=False)))
        for name, kw in runs:
            in_use = memory_in_use(model)
            out[name] = run_engine(model, w, ps, args, pages=pages, **kw)
            note(f"{k}: {name} {row_note(out[name])}")
            left = memory_in_use(model) - in_use
            if left > 1 << 30:  # the next row's pool would not fit: say so
                note(f"WARNING {k}: {left / 2**30:.1f} GiB still in use after the {name} row")
            # a run cut short keeps its rows
            serving_load.write(args.json, {"ceilings": ceil, "rows": rows + [out]})
        out["engine"]["of_roofline"] = roof["total_s"] / out["engine"]["seconds"]
        if w.hf and (w.preset, w.hf) in hf:
            out["hf"] = hf[(w.preset, w.hf)]
        if not args.no_steady and k in ("w2", "w3") or args.tiny and k == "w2":
            mean = int(np.mean([len(p) for p in ps]) + w.new / 2)
            st = run_steady(model, w, args, mean, 4 if args.tiny else 16)
            st["roofline_ms"] = step_roofline(model.config, args.dtype, st["batch"],
                                              st["length"], ceil) * 1e3
            out["steady"] = st
        if not args.no_single and k in ("w1", "w2"):
            out["single"] = run_single(model, w, args, *((8, 6) if args.tiny else (128, 128)))
        rows.append(out)
        serving_load.write(args.json, {"ceilings": ceil, "rows": rows})
        report(out)
    return 0


def memory_in_use(model) -> int:
    """Bytes the model's devices hold now (0 where they report no stats: CPU)."""
    return sum(int(s.get("bytes_in_use", 0))
               for s in filter(None, map(memory.device_stats, model.mesh.devices.flat)))


if __name__ == "__main__":
    sys.exit(main())
