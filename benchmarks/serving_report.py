"""The tables benchmarks/serving.py prints: a workload's rows side by side, the steady and
single-request rows with what they must say beside their numbers."""
from __future__ import annotations

import sys


def row_note(r: dict) -> str:
    """An engine row in one line, as soon as it ends."""
    return (f"{r['tok_s']:.0f} tok/s, {r['seconds']:.2f} s, warm-up {r['warmup_s']:.0f} s, "
            f"{r['pages']} pages, {r['preemptions']} preemptions, TTFT p50 "
            f"{r['ttft_p50_s']:.2f} s, prefill {r['prefill_fill']:.0%} real, "
            f"{r['compiles']} compiles; ticks: " + ", ".join(
                f"{t['n']} {k} ({t['seconds']:.2f} s, {t['rows']:.0f} rows decoding)"
                for k, t in r["ticks"].items()))


def steady_notes(s: dict) -> str:
    """What the steady row must say beside its numbers: a batch the pool cut below the
    slots, rows the compiled call ran past the live ones, rows that ended or were
    preempted (the timed batch then shrank or changed)."""
    notes = []
    if s["planned"] < s["slots"]:
        notes.append(f"the pool holds {s['planned']} of {s['slots']} slots' rows")
    if s["rows"] != s["batch"]:
        notes.append(f"{s['rows']} rows computed")
    notes.append(f"{s['prefill_ticks']} prefill ticks (planned {s['planned_prefill_ticks']})")
    if s["batch"] < s["planned"] or s["ended_in_bare_steps"] > 0:
        notes.append(f"WARNING {s['planned'] - s['batch']} rows ended before or during the "
                     f"timed ticks, {s['ended_in_bare_steps']} in the bare steps")
    if s["preemptions"]:
        notes.append(f"WARNING {s['preemptions']} preemptions")
    return "; " + "; ".join(notes)


def report(r: dict) -> None:
    e = r["engine"]
    print(f"\n## {r['workload']}: {r['preset']}, {r['requests']} requests; roofline "
          f"{r['roofline_s']:.2f} s (prefill {r['roof_prefill_s']:.2f} s)")
    print(f"{'run':<28}{'seconds':>9}{'tokens/s':>10}{'ratio':>8}")
    print(f"{'continuous (paged)':<28}{e['seconds']:>9.2f}{e['tok_s']:>10.0f}{'1.00':>8}"
          f"   {e['of_roofline']:.0%} of roofline; warmup {e['warmup_s']:.0f} s "
          f"({e['shapes']} shapes, {e['compiles']} compiles after), {e['pages']} pages, "
          f"{e['preemptions']} preemptions, prefill calls {e['prefill_fill']:.0%} real tokens, "
          f"TTFT p50 {e['ttft_p50_s']:.2f} s")
    for name, label in (("overlap", "continuous, overlapped"),
                        ("plain_off", "no plain windows"),
                        ("prefix_off", "prefix caching off"), ("chunked", "generate() chunks"),
                        ("hf", "transformers static")):
        if name in r and "tok_s" in r[name]:
            x = r[name]
            print(f"{label:<28}{x.get('seconds', float('nan')):>9.2f}{x['tok_s']:>10.0f}"
                  f"{e['tok_s'] / x['tok_s']:>8.2f}x  (continuous over this)")
        elif name in r:
            print(f"{label:<28} {r[name]}")
    if "steady" in r:
        s = r["steady"]
        print(f"steady decode: batch {s['batch']} x {s['length']:.0f} tokens: "
              f"{s['step_ms']:.2f} ms/step, roofline {s['roofline_ms']:.2f} ms "
              f"({s['roofline_ms'] / s['step_ms']:.0%}); bare engine steps "
              f"{s['device_step_ms']:.2f} ms (host {s['step_ms'] - s['device_step_ms']:.2f})"
              + steady_notes(s))
    if "single" in r:
        s = r["single"]
        print(f"single request: scheduler {s['sched_ms_per_token']:.2f} ms/token "
              f"(decode {s['sched_decode_ms']:.2f}), generate() batch 1 "
              f"{s['generate_ms_per_token']:.2f} ms/token "
              f"({s['generate_ms_per_token'] / s['sched_ms_per_token']:.0%})")
    sys.stdout.flush()
