"""Where a serving tick's time goes: device kernels against host work, for one of
benchmarks/serving.py's workloads through continuous batching (serving.PagedScheduler).

    python benchmarks/profile_serving.py --workload w2                  # llama3-8b, W2
    python benchmarks/profile_serving.py --workload w1 --ticks 6 --compile-workers 8
    python benchmarks/profile_serving.py --workload w2 --tiny           # CPU smoke run

It builds the workload's model (random weights) and scheduler as serving.py does (the page
pool from the memory plan, every shape compiled first), submits all the workload's
requests, and ticks the scheduler on this thread, the whole run under one
jax.profiler.trace (a temp dir, read back at the end); `--ticks` ticks of three phases are
annotated (each tick inside a TraceAnnotation, and every engine call inside one too).
--trace-per-phase instead traces only those ticks, each phase followed by as many untraced
ticks (the profiler's own cost):
  (a) prefill + decode: the first ticks that run a prefill call while rows decode;
  (b) steady decode: from the first tick without a prefill call (every slot the pool and the
      queue could fill is decoding: the largest running batch), or after --max-ticks;
  (c) drain: nothing waiting or prefilling and at most half that batch left (--no-drain:
      skipped).
For each phase it prints:
  ticks          traced ticks, of which ran a prefill call / a decode call
  live rows      decoding rows per decode call (mean; `computed`: the rows the compiled
                 call ran, PagedEngine.decode_rows), their mean length in tokens
  wall           ms per tick on the host clock, traced and untraced
  device busy    ms per tick of the union of kernel time (`kernels`: their summed durations,
                 more than busy where streams overlap)
  device idle    ms per tick the device ran nothing between the tick's start and the next
                 tick's: time it waited on the host
  first kernel   ms from a tick's start to its first kernel (host work before any dispatch)
  by kind        kernel ms per tick: paged decode attention and prefill (flash) attention
                 told apart by the call they ran in (with overlap off the host reads the
                 prefill call's tokens before it queues the decode call, so kernels that
                 start before the prefill call returns are its own), matmuls, reductions /
                 softmax / sampling (by name: the vocab's and the norms' alike), gathers /
                 scatters / dynamic-update-slices (page writes and reads), copies / memcpy /
                 memset, other
  top kernels    the 15 kernels with the most time: us per tick, launches per tick, kind
  roofline       serving.step_roofline of one decode step at the phase's live rows and mean
                 length, against the measured device time per decode step (the decode
                 call's busy time / steps per tick)
  host           ms per tick on perf_counter, exclusive: `dispatch` inside each engine call
                 (step, window, prefill_chunks, set_pages, free, ...), `wait` blocked reading
                 a call's results to the host (the device still running), and the scheduler's
                 own bookkeeping split by method (_admit, _grow, _read_window, _computed,
                 ...; `other` the rest of tick()). Timed by wrapping the engine's and the
                 scheduler's methods on their instances in this script, not in jaxformer/.
On a CPU there are no device kernels: the device columns say so, the host ones still print.
--tiny runs serving.py's tiny workload (the demo preset) with 16 new tokens a request.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
import serving  # noqa: E402
import jaxformer as jf  # noqa: E402
from harness import gpu_kernel_events, host_spans, timeline  # noqa: E402
from jaxformer import paged_engine  # noqa: E402
from jaxformer.cli_args import fraction  # noqa: E402
from jaxformer.serving import paged_scheduler  # noqa: E402

KINDS = (  # (kind, pattern of a kernel's name), first match wins; attention split by call
    ("attention", re.compile(r"mosaic|flash|fmha|cudnn|attention", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cublas|cutlass|xmma|matmul|\bdot", re.I)),
    ("gather/scatter", re.compile(r"gather|scatter|dynamic[_-]?update[_-]?slice|"
                                  r"dynamic[_-]?slice", re.I)),
    ("reduce/softmax/sample", re.compile(r"reduc|softmax|argmax|arg_max|sort|top_?k|cub::|"
                                         r"radix|rng|random|threefry|sampl|logprob|"
                                         r"(?:^|_)log(?:_|$)", re.I)),
    ("copy/memcpy/memset", re.compile(r"memcpy|memset|copy|transpose", re.I)),
)
KIND_ORDER = ("decode attention", "prefill attention", "matmul", "reduce/softmax/sample",
              "gather/scatter", "copy/memcpy/memset", "other")
ENGINE_CALLS = ("prefill_chunks", "step", "window", "set_pages", "set_history", "free",
                "init_state")
SCHED_METHODS = ("_take_inbox", "_admit", "_decode", "_grow", "_read_window", "_read_chunks",
                 "_read_unread", "_computed", "_finish", "_place")
TICK = "profile_serving.tick"  # host annotations: "TICK <phase> <i>", "engine.<call>"


def kind(name: str, in_prefill: bool) -> str:
    k = next((k for k, pat in KINDS if pat.search(name)), "other")
    if k == "attention":
        return "prefill attention" if in_prefill else "decode attention"
    return k


class Clock:
    """Exclusive perf_counter seconds per label of wrapped callables (nested wrapped calls
    are subtracted from their caller's), and call counts; one thread."""

    def __init__(self):
        self.secs, self.calls = collections.Counter(), collections.Counter()
        self._stack: list[float] = []
        self.on_step = None  # instrument()'s engine.step hands it each call's arguments

    def wrap(self, label: str, fn, annotate: str | None = None):
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t = time.perf_counter()
            try:
                if annotate:
                    with jax.profiler.TraceAnnotation(annotate):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                inner = self._stack.pop()
                self.secs[label] += dt - inner
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1] += dt
        return timed


def instrument(sched) -> tuple[Clock, callable]:
    """Wrap the scheduler's engine calls, its bookkeeping methods (on the instances) and the
    host reads (the modules' to_host) with one Clock; returns it and what undoes the
    modules' wrapping."""
    clock = Clock()
    eng = sched.engine
    for name in ENGINE_CALLS:
        setattr(eng, name, clock.wrap(f"dispatch {name}", getattr(eng, name),
                                      annotate=f"engine.{name}"))
    timed_step = eng.step

    def step(*args, **kwargs):
        if clock.on_step:
            clock.on_step(kwargs)
        return timed_step(*args, **kwargs)
    eng.step = step
    for name in SCHED_METHODS:
        if hasattr(sched, name):
            setattr(sched, name, clock.wrap(f"sched {name}", getattr(sched, name)))
    saved = [(mod, mod.to_host) for mod in (paged_engine, paged_scheduler)]
    for mod, fn in saved:  # the blocking device -> host reads
        mod.to_host = clock.wrap("wait to_host", fn)

    def restore():
        for mod, fn in saved:
            mod.to_host = fn
    return clock, restore


def union_ns(intervals, lo: int, hi: int) -> int:
    """Length of the union of [s, s + d) clipped to [lo, hi)."""
    total, end = 0, lo
    for s, d in sorted(intervals):
        s, e = max(s, end), min(s + d, hi)
        if e > s:
            total += e - s
            end = e
    return total


def split_ticks(events, ticks, prefill_ends, bounds=None) -> list[dict]:
    """Per traced tick (ticks: (start ns, duration ns) of each, in order): its kernels
    (events: (start, duration, name), assigned by start to [tick start, next tick's start),
    bounds[i] the next tick's start where given (a trace that goes on past the phase: the
    run's one trace), else the next traced tick's; the last tick without a bound to its
    end or its last kernel's), their busy union and summed time, the
    idle time in that window (busy: any kernel's time inside it, one queued by an earlier
    tick too), the first kernel's delay (ms), and ns by kind (attention in a
    kernel that starts before the tick's prefill call returned, prefill_ends: end ns of
    each engine.prefill_chunks annotation, is prefill attention)."""
    events = sorted(events)
    out = []
    for i, (t0, dur) in enumerate(ticks):
        hi = bounds[i] if bounds and bounds[i] is not None else \
            ticks[i + 1][0] if i + 1 < len(ticks) else None
        mine = [e for e in events if e[0] >= t0 and (hi is None or e[0] < hi)]
        if hi is None:
            hi = max([t0 + dur] + [s + d for s, d, _ in mine])
        cut = max([p for p in prefill_ends if t0 <= p < hi], default=None)
        by_kind, by_name = collections.Counter(), collections.Counter()
        decode_busy = []
        for s, d, name in mine:
            pre = cut is not None and s < cut
            by_kind[kind(name, pre)] += d
            by_name[name] += d
            if not pre:
                decode_busy.append((s, d))
        # every kernel's time inside the window: one queued by the tick before counts too
        busy = union_ns([(s, d) for s, d, _ in events], t0, hi)
        tl = timeline(mine, (t0, dur))
        out.append(dict(window=hi - t0, busy=busy, kernels=sum(d for _, d, _ in mine),
                        idle=hi - t0 - busy, first_ms=tl.get("before"), by_kind=by_kind,
                        by_name=by_name, count=collections.Counter(n for _, _, n in mine),
                        decode_busy=union_ns(decode_busy, t0, hi)))
    return out


def read_trace(trace: str, ph: dict) -> None:
    """Fill phase ph's `device` (split_ticks of its annotated ticks) and `annotated` from
    the trace directory (the device columns stay empty where the trace can't be read)."""
    name, ticks, device = ph["name"], [], []
    try:  # a trace this script cannot read still leaves the host columns
        events = gpu_kernel_events(trace)
        # every tick of the run is annotated (Driver.tick): each traced tick ends where
        # the run's next tick starts, not where the next traced one does
        spans = host_spans(trace, TICK)
        ticks = [(s, d) for s, d, n in spans if n.startswith(f"{TICK} {name} ")]
        starts = [s for s, _, _ in spans]
        ends = [s + d for s, d, _ in host_spans(trace, "engine.prefill_chunks")]
        bounds = [next((x for x in starts if x > s), None) for s, _ in ticks]
        device = split_ticks(events, ticks, ends, bounds) if events and ticks else []
        if events and not ticks:
            print(f"# phase {name}: {len(events)} kernels but no tick annotations in the "
                  f"trace: device columns empty", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"# phase {name}: trace unreadable ({type(e).__name__}: {e}): device columns "
              f"empty", file=sys.stderr)
    ph.update(device=device, annotated=len(ticks))


class Driver:
    """Ticks a scheduler on this thread, one record per tick (host split, live rows), and
    traces the phases (module docstring)."""

    def __init__(self, sched, clock: Clock, args):
        self.sched, self.clock, self.args = sched, clock, args
        self.n = 0  # ticks run
        self.peak = 0  # the most rows one decode call ran
        self.last: dict | None = None

    def busy(self) -> bool:
        return bool(self.sched.running or self.sched.waiting)

    def tick(self, tag: str | None = None) -> dict:
        s, clock = self.sched, self.clock
        live = [s._slots[i] for i in s._live]
        length = np.mean([len(h.prompt) + len(h.tokens) for h in live]) if live else 0.0
        secs, calls = collections.Counter(clock.secs), collections.Counter(clock.calls)
        steps = []
        clock.on_step = lambda kw: steps.append((kw.get("rows"), len(s._live)))
        t = time.perf_counter()
        with jax.profiler.TraceAnnotation(tag or f"{TICK} - {self.n}"):  # "-": untraced
            s.tick()
        wall = time.perf_counter() - t
        clock.on_step = None
        self.n += 1
        rec = dict(tick=self.n, wall=wall, host={k: v - secs[k] for k, v in clock.secs.items()
                                                 if v > secs[k]},
                   prefill=clock.calls["dispatch prefill_chunks"]
                   > calls["dispatch prefill_chunks"],
                   decode=bool(steps), rows=steps[0][0] if steps else 0,
                   live=steps[0][1] if steps else 0,
                   length=length + s.config.steps_per_tick / 2 if steps else 0.0)
        self.peak = max(self.peak, rec["live"])
        self.last = rec
        return rec

    def until(self, ready) -> None:
        """Untraced ticks until ready() (or --max-ticks ticks in all, or no work left)."""
        while self.busy() and self.n < self.args.max_ticks and not ready():
            self.tick()

    def options(self):
        """The profiler's options: no Python function tracing unless --python-tracer (it
        records every call of the scheduler's bookkeeping, slowing the traced ticks)."""
        if not hasattr(jax.profiler, "ProfileOptions"):  # jax's defaults, then
            return None
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 1 if self.args.python_tracer else 0
        return opts

    def phase(self, name: str) -> dict:
        """--ticks traced ticks. With a trace per phase (--trace-per-phase) the trace is
        read back at once and as many untraced ticks follow; in the run's one trace
        (read_trace fills the device columns after it ends) no untraced ticks."""
        n = self.args.ticks
        if self.sched._state is not None:
            jax.block_until_ready(self.sched._state.last)
        if not self.args.trace_per_phase:
            traced = [self.tick(f"{TICK} {name} {i}") for i in range(n) if self.busy()]
            return dict(name=name, traced=traced, untraced=[], device=[], annotated=0)
        trace = tempfile.mkdtemp(prefix="profile_serving_")
        traced = []
        try:
            with jax.profiler.trace(trace, profiler_options=self.options()):
                for i in range(n):
                    if not self.busy():
                        break
                    traced.append(self.tick(f"{TICK} {name} {i}"))
                if self.sched._state is not None:
                    jax.block_until_ready(self.sched._state.last)
            untraced = []
            for _ in range(n):
                if not self.busy():
                    break
                untraced.append(self.tick())
            ph = dict(name=name, traced=traced, untraced=untraced)
            read_trace(trace, ph)
        finally:
            shutil.rmtree(trace, ignore_errors=True)
        return ph

    def run(self):
        """Yields each phase's records as it ends (printed at once: a run cut short by a
        time limit still shows the phases before)."""
        s = self.sched
        # (a) a tick that prefilled and decoded is behind us, prompts still to prefill
        # (before the first tick the prompts are still in the inbox)
        pending = lambda: s._prefilling or s._waiting or not s._inbox.empty()  # noqa: E731
        self.until(lambda: not pending() or self.last and self.last["prefill"]
                   and self.last["decode"] and pending())
        if self.busy() and pending():  # (a few requests may prefill in one tick: no (a))
            yield self.phase("a")
        # (b) the first tick without a prefill call that decoded
        self.until(lambda: self.last and not self.last["prefill"] and self.last["decode"])
        if self.busy():
            yield self.phase("b")
        if self.args.drain:  # (c) nothing left to admit, the batch at most half its peak
            self.until(lambda: not s._waiting and not s._prefilling
                       and 0 < len(s._live) <= self.peak // 2)
            if self.busy():
                yield self.phase("c")


PHASES = {"a": "prefill + decode", "b": "steady decode", "c": "drain"}


def summarize(ph: dict, W: int, cfg, dtype: str, ceil: dict, top: int) -> dict:
    """A phase's per-tick means (ms) from its records and its trace."""
    recs, dev = ph["traced"], ph["device"]
    n = len(recs)
    dec = [r for r in recs if r["decode"]]
    host = collections.Counter()
    for r in recs:
        host.update({k: v * 1e3 / n for k, v in r["host"].items()})
    host["sched other"] = max(0.0, np.mean([r["wall"] for r in recs]) * 1e3 - sum(host.values()))
    out = dict(phase=ph["name"], what=PHASES[ph["name"]], ticks=n, annotated=ph["annotated"],
               first_tick=recs[0]["tick"], prefill_ticks=sum(r["prefill"] for r in recs),
               decode_ticks=len(dec), wall_ms=np.mean([r["wall"] for r in recs]) * 1e3,
               untraced_wall_ms=np.mean([r["wall"] for r in ph["untraced"]]) * 1e3
               if ph["untraced"] else None,
               live=float(np.mean([r["live"] for r in dec])) if dec else 0.0,
               rows=float(np.mean([r["rows"] for r in dec])) if dec else 0.0,
               length=float(np.mean([r["length"] for r in dec])) if dec else 0.0,
               host_ms=dict(host), device=None)
    if dec:
        out["roofline_ms"] = serving.step_roofline(cfg, dtype, round(out["live"]),
                                                   out["length"], ceil) * 1e3
    if dev:
        ms = lambda key: float(np.mean([d[key] for d in dev])) / 1e6  # noqa: E731
        by_kind, by_name, count = (collections.Counter() for _ in range(3))
        for d in dev:
            by_kind.update(d["by_kind"])
            by_name.update(d["by_name"])
            count.update(d["count"])
        out["device"] = dict(
            busy_ms=ms("busy"), kernels_ms=ms("kernels"), idle_ms=ms("idle"),
            first_kernel_ms=float(np.mean([d["first_ms"] for d in dev
                                           if d["first_ms"] is not None] or [np.nan])),
            by_kind_ms={k: by_kind[k] / n / 1e6 for k in KIND_ORDER},
            top=[(name, ns / n / 1e3, count[name] / n, kind(name, False))
                 for name, ns in by_name.most_common(top)])
        if dec:  # the decode call's busy time per step (with overlap off: after prefill)
            out["device"]["step_ms"] = float(np.mean([d["decode_busy"] for d, r in
                                                      zip(dev, recs) if r["decode"]])) / 1e6 / W
    return out


def report(s: dict, steps: int) -> None:
    print(f"\n## ({s['phase']}) {s['what']}: ticks {s['first_tick']}.."
          f"{s['first_tick'] + s['ticks'] - 1} traced ({s['prefill_ticks']} ran a prefill "
          f"call, {s['decode_ticks']} a decode call of {steps} steps)")
    un = s["untraced_wall_ms"]
    print(f"  live rows {s['live']:.1f} (computed {s['rows']:.0f}), mean length "
          f"{s['length']:.0f} tokens; wall {s['wall_ms']:.2f} ms/tick traced, "
          + (f"{un:.2f} untraced" if un is not None else "no untraced ticks left"))
    d = s["device"]
    if d is None:
        print("  device: no kernels in the trace (not a GPU): device columns empty")
    else:
        print(f"  device busy {d['busy_ms']:.2f} ms/tick (kernels summed {d['kernels_ms']:.2f}),"
              f" idle {d['idle_ms']:.2f} ms/tick (waiting on the host), first kernel "
              f"{d['first_kernel_ms']:.2f} ms after the tick starts")
        busy = max(d["kernels_ms"], 1e-9)
        print("  by kind (ms/tick): " + ", ".join(
            f"{k} {v:.2f} ({v / busy:.0%})" for k, v in d["by_kind_ms"].items()))
    if "roofline_ms" in s:
        got = f"{d['step_ms']:.2f} ms device" if d and "step_ms" in d else "no device time"
        ratio = f" ({s['roofline_ms'] / d['step_ms']:.0%} of roofline)" \
            if d and d.get("step_ms") else ""
        print(f"  decode step: roofline {s['roofline_ms']:.2f} ms at {s['live']:.0f} rows x "
              f"{s['length']:.0f} tokens; measured {got}{ratio}, wall "
              f"{s['wall_ms'] / steps:.2f} ms per step")
    h = s["host_ms"]
    groups = {g: {k.split(" ", 1)[1]: v for k, v in h.items() if k.startswith(g)}
              for g in ("dispatch", "wait", "sched")}
    for g, label in (("dispatch", "engine dispatch"), ("wait", "waiting on reads"),
                     ("sched", "scheduler bookkeeping")):
        parts = sorted(groups[g].items(), key=lambda kv: -kv[1])
        print(f"  host {label} {sum(groups[g].values()):.2f} ms/tick"
              + (": " + ", ".join(f"{k} {v:.2f}" for k, v in parts) if parts else ""))
    if d is not None:
        print("  top kernels (us/tick, launches/tick):")
        for name, us, c, k in d["top"]:
            print(f"    {us:9.1f} us  x{c:<6.1f} {k:<22} {name[:90]}")
    sys.stdout.flush()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="w2", choices=sorted(serving.WORKLOADS))
    ap.add_argument("--ticks", type=int, default=None,
                    help="traced ticks per phase (default 6; --tiny: 2)")
    ap.add_argument("--max-ticks", type=int, default=2000,
                    help="untraced ticks in all at most before a phase starts anyway")
    ap.add_argument("--no-drain", dest="drain", action="store_false",
                    help="skip phase (c), the drain")
    ap.add_argument("--trace-per-phase", action="store_true",
                    help="a trace per phase, each followed by as many untraced ticks (the "
                         "profiler's cost); default one trace over the whole run, because on "
                         "an H100 the first device sync after a trace stopped while the "
                         "scheduler ran failed (CUDA_ERROR_LAUNCH_FAILED)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the demo preset")
    ap.add_argument("--python-tracer", action="store_true",
                    help="also trace Python calls (jax's default; slows the traced ticks)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed by name")
    ap.add_argument("--compile-workers", type=int, default=8,
                    help="threads that compile the warm-up shapes (PagedEngine.precompile)")
    ap.add_argument("--graph-control-flow", action="store_true",
                    help="RunConfig.graph_control_flow (as benchmarks/serving.py)")
    ap.add_argument("--plain-windows", default="on", choices=["off", "on"],
                    help="PagedConfig.plain_windows (as benchmarks/serving.py)")
    ap.add_argument("--overlap", default="off", choices=["off", "on"],
                    help="PagedConfig.overlap (on: prefill and decode attention are not "
                         "told apart)")
    for flag in ("--dtype", "--device-memory"):
        ap.add_argument(flag, default=None)
    for flag in ("--page-size", "--num-pages", "--prefill-tokens", "--chunk", "--min-chunk",
                 "--steps-per-tick"):
        ap.add_argument(flag, type=int, default=None)
    ap.add_argument("--requests", type=int, default=None,
                    help="the workload's first N requests only (1: a single request's ticks)")
    ap.add_argument("--gpu-memory", type=fraction, default=None, metavar="FRACTION",
                    help="share of the GPU jax takes (as benchmarks/serving.py)")
    ap.add_argument("--trace-dir", default=None,
                    help="keep the whole-run trace in this directory (for XProf or "
                         "TensorBoard; default: a temporary one, removed after reading)")
    ap.add_argument("--json", help="also write the phases' summaries here")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    serving.set_gpu_memory(args.gpu_memory)  # before anything touches a device
    args.ticks = args.ticks or (2 if args.tiny else 6)
    if args.ticks < 1:
        parser().error(f"--ticks: must be at least 1, got {args.ticks}")
    for k, v in (serving.TINY_ARGS if args.tiny else serving.FULL_ARGS).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    w = (serving.TINY if args.tiny else serving.WORKLOADS)[args.workload]
    if args.tiny:  # requests that live 8 ticks, so each phase finds ticks of its own
        w = dataclasses.replace(w, new=16)
    if args.requests is not None:
        if not 1 <= args.requests <= w.requests:
            parser().error(f"--requests: must be in 1..{w.requests}, got {args.requests}")
        w = dataclasses.replace(w, requests=args.requests)
    ceil = harness.ceilings(args.tiny)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; measured ceilings: "
          f"copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    model = jf.Model.random(jf.ModelConfig.from_preset(w.preset), dtype=args.dtype,
                            seed=0).with_run(graph_control_flow=args.graph_control_flow)
    ps = serving.prompts(w, model.config.vocab_size)
    print(f"# {w.preset} loaded; warming up", file=sys.stderr, flush=True)
    sched, info = serving.scheduler(model, w, args, max(map(len, ps)) + w.new)
    print(f"# {args.workload}: {w.preset}, {w.requests} requests x ({w.prompt[0]}..{w.prompt[1]}"
          f" prompt + {w.new} new), {w.slots} slots, {info['pages']} pages of "
          f"{args.page_size}, {args.steps_per_tick} steps/tick, overlap {args.overlap}; "
          f"warmup {info['warmup_s']:.0f} s ({info['shapes']} shapes)")
    clock, restore = instrument(sched)
    out, t0 = [], time.perf_counter()
    try:
        for p in ps:
            sched.submit(p, None, max_new_tokens=w.new, ignore_eos=True)
        drv = Driver(sched, clock, args)

        def done(ph):
            out.append(summarize(ph, args.steps_per_tick, model.config, args.dtype, ceil,
                                 args.top))
            report(out[-1], args.steps_per_tick)

        if args.trace_per_phase:
            for ph in drv.run():  # each printed as it ends
                if ph["traced"]:
                    done(ph)
        else:  # one trace over the whole run, read back after it stops
            trace = args.trace_dir or tempfile.mkdtemp(prefix="profile_serving_")
            try:
                with jax.profiler.trace(trace, profiler_options=drv.options()):
                    phases = []
                    for ph in drv.run():
                        phases.append(ph)
                        print(f"[{time.perf_counter() - t0:6.0f} s] phase {ph['name']} "
                              f"traced, {drv.n} ticks run", file=sys.stderr, flush=True)
                    if sched._state is not None:
                        jax.block_until_ready(sched._state.last)
                for ph in phases:
                    if ph["traced"]:
                        read_trace(trace, ph)
                        done(ph)
            finally:
                if not args.trace_dir:
                    shutil.rmtree(trace, ignore_errors=True)
    finally:
        restore()
        sched.stop()
    print(f"\n# {drv.n} ticks run; the largest decode call ran {drv.peak} live rows")
    if not out:
        print("(no phase ran: the workload ended first)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceil, "phases": out}, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
