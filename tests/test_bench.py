"""`jaxformer bench` (benchmarks/harness.py, also benchmarks/generate.py): its CPU smoke run
prints a row per shape and mode whose numbers are consistent with each other."""
import json
import re

import numpy as np
import pytest

from jaxformer import cli


def test_bench_tiny_prints_consistent_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert cli.main(["bench", "--tiny", "--batches", "1", "2", "--prompts", "16", "--new", "4",
                     "--quantize", "none,int8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "measured ceilings" in text and "demo" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["quant"]) for r in rows] == [(1, "none"), (1, "int8"), (2, "none"),
                                                         (2, "int8")]
    for r in rows:
        # tokens/s is batch x new tokens over TTFT + the remaining steps
        total_s = (r["ttft_ms"] + r["step_ms"] * 3) / 1e3
        assert abs(r["tok_s"] - r["batch"] * 4 / total_s) < 1e-6 * r["tok_s"]
        assert r["step_bytes"] > r["weight_GB"] * 1e9 > 0
    int8 = next(r for r in rows if r["quant"] == "int8")
    none = next(r for r in rows if r["quant"] == "none")
    assert int8["weight_GB"] < none["weight_GB"]  # the quantized rows count quantized bytes


def test_plan_shapes_skips_what_the_plan_rejects_and_finds_the_largest(monkeypatch):
    """Rows the memory plan says cannot fit are skipped with its numbers; --largest adds the
    largest multiple of 8 that fits (the next multiple does not); a prompt past the context
    is clipped to leave room for the new tokens."""
    import jaxformer as jf
    import harness as bench
    from jaxformer import memory
    monkeypatch.setenv("JAXFORMER_DEVICE_MEMORY", "64GB")
    shapes = bench.plan_shapes(["gpt3-1.3b"], [128, 4096], [1, 4096], 128, "bfloat16", True,
                               [None])
    cfg = jf.ModelConfig.from_preset("gpt3-1.3b")
    assert {s["prompt"] for s in shapes} == {128, cfg.max_position_embeddings - 128}
    by = {(s["prompt"], s["batch"], s["largest"]): s for s in shapes}
    assert by[(128, 1, False)]["skip"] is None
    assert "plan" in by[(128, 4096, False)]["skip"]
    big = [s for s in bench.plan_shapes(["gpt3-1.3b"], [128], [1], 128, "bfloat16", True,
                                        [None]) if s["largest"]]
    assert len(big) == 1
    for s in big:
        def fits(b):
            return memory.plan(cfg, None, "bfloat16", batch=b, max_length=s["prompt"] + 128,
                               prompt_length=s["prompt"]).fits
        assert s["batch"] % 8 == 0 and fits(s["batch"]) and not fits(s["batch"] + 8)


def test_parallel_benchmark_isolated_layouts_print_consistent_rows():
    """benchmarks/parallel.py --isolate: one child process per layout, a row per layout and
    batch, tokens/s = batch / step time, "vs 1 device" = the tokens/s ratio, and the
    tensor ratio line of the summary."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "parallel.py"),
                           "--tiny", "--isolate", "--layouts", "1", "tensor=2", "--batch",
                           "1", "4", "--no-largest"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.strip("| ").split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| tiny")]
    assert [(r[1], r[3]) for r in rows] == [("1 device", "1"), ("1 device", "4"),
                                            ("tensor=2", "1"), ("tensor=2", "4")]
    tok_s = {(r[1], int(r[3])): float(r[4]) for r in rows}
    for r in rows:
        batch, ms = int(r[3]), float(r[5])
        assert abs(ms - batch * 1e3 / float(r[4])) <= 0.0051  # ms/step printed to 0.01
        assert 0 < float(r[7])  # bandwidth utilisation
        a, b = tok_s[(r[1], batch)], tok_s[("1 device", batch)]
        # the script divides unrounded tokens/s and prints to 0.01; from the printed ones
        # (to 0.1) the ratio is known within their rounding
        assert r[9].endswith("x") and abs(float(r[9][:-1]) - a / b) <= \
            0.005 + a / b * (0.05 / a + 0.05 / b) + 1e-9, (r[9], a, b)
    assert "tensor=2 / 1 device step time at batch 1" in proc.stdout


def test_allreduce_benchmark_chain_is_the_unsharded_mlp_chain():
    """benchmarks/allreduce.py: its tensor-parallel chain (column- then row-parallel MLP, the
    all-reduce + residual add, an RMS norm) on 2 devices equals the same layers computed
    unsharded in numpy; off GPUs the script says it needs two and exits 2."""
    import importlib.util
    import os

    import jax
    import numpy as np
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "allreduce_bench", os.path.join(root, "benchmarks", "allreduce.py"))
    ar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ar)
    mesh = jax.make_mesh((2,), ("t",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Explicit,))
    layers = 5  # cycles past the SETS weight sets
    wi, wo, x = ar.inputs(mesh, rows=2, dim=64, hidden=256)
    got = np.asarray(ar.make_chain(mesh, ar.xla_all_reduce_add, layers)(x, wi, wo),
                     np.float32)
    f32 = [np.asarray(a, np.float32) for a in (wi, wo, x)]
    wi, wo, h = f32
    for layer in range(layers):
        a = h @ wi[layer % ar.SETS]
        g = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
        h = h + g @ wo[layer % ar.SETS]
        h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True))
    np.testing.assert_allclose(got, h, atol=0.08)  # bf16 activations between the products
    assert ar.main([]) == 2


def test_timeline_splits_a_call_into_dispatch_span_idle_and_tail(tmp_path):
    """bench.timeline on kernels whose overlap and gaps are worked out by hand, and
    bench.host_event finding a TraceAnnotation in a real (CPU) trace."""
    import time

    import jax

    import harness as bench
    # ns: a [100, 150), b [200, 230), c [220, 260) overlaps b; idle 150..200; call [0, 400)
    events = [(200, 30, "b"), (100, 50, "a"), (220, 40, "c")]
    tl = bench.timeline(events, (0, 400))
    assert tl == {"span": 160e-6, "kernels": 120e-6, "idle": 50e-6, "before": 100e-6,
                  "after": 140e-6}
    assert "before" not in bench.timeline(events, None)
    assert bench.timeline([], (0, 1)) == {}

    with jax.profiler.trace(str(tmp_path)), jax.profiler.TraceAnnotation("tl-test-call"):
        time.sleep(0.02)
    start, duration = bench.host_event(str(tmp_path), "tl-test-call")
    assert duration >= 20e6
    assert bench.host_event(str(tmp_path), "no-such-event") is None


def test_serving_benchmark_tiny_rows_are_consistent(tmp_path, capsys):
    """benchmarks/serving.py's CPU smoke run of W4: every request finishes (the run raises
    otherwise), tokens/s is requests x new tokens over the run's seconds, the share of the
    roofline is roofline / seconds, and the shared prefix is found in the cache (by most
    requests: those prefilled in the first call find nothing yet) only when prefix caching
    is on; after warmup the timed runs (the overlapped one too) compile nothing; every row
    runs the workload's one pool, and its timed ticks (a prefill call in some) fall within
    its seconds."""
    import serving
    out = tmp_path / "rows.json"
    # prefill calls of 2 x 16 tokens at most: 4 warm-up shapes, not 7
    assert serving.main(["--tiny", "--workloads", "w4", "--overlap", "both", "--prefill-tokens",
                         "32", "--chunk", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefix caching off" in text and "continuous, overlapped" in text
    (row,) = json.loads(out.read_text())["rows"]
    w = serving.TINY["w4"]
    for run in ("engine", "overlap", "prefix_off"):
        r = row[run]
        assert abs(r["tok_s"] - w.requests * w.new / r["seconds"]) < 1e-6 * r["tok_s"]
        t = r["ticks"]
        assert t["prefill"]["n"] >= 1 and t["decode"]["rows"] >= 1
        assert t["prefill"]["seconds"] + t["decode"]["seconds"] <= r["seconds"]
    assert row["engine"]["pages"] == row["overlap"]["pages"] == row["prefix_off"]["pages"]
    assert abs(row["engine"]["of_roofline"] - row["roofline_s"] / row["engine"]["seconds"]) \
        < 1e-9
    # every request after the first prefill call finds the 16-token prefix cached
    assert row["engine"]["prefix_hit_tokens"] >= (w.requests // 2) * 16
    assert row["prefix_off"]["prefix_hit_tokens"] == 0
    assert row["engine"]["compiles"] == row["prefix_off"]["compiles"] == 0  # warmup did all
    assert row["overlap"]["compiles"] == 0


def test_profile_serving_splits_ticks_and_times_exclusively(monkeypatch):
    """profile_serving.split_ticks on kernels worked out by hand (busy union clipped to each
    tick's window, kernels by kind, attention before the prefill call returned counted as
    prefill), and Clock's exclusive times on a fake clock (a nested call's time leaves its
    caller's)."""
    import profile_serving as ps
    # ns: tick 0 [0, 1000) (its prefill call returned at 400), tick 1 [1000, 1500)
    events = [(100, 200, "kernel_mosaic_gpu"), (150, 100, "sm90_xmma_gemm_bf16"),
              (500, 100, "entry_mosaic_gpu"), (650, 50, "input_reduce_fusion"),
              (950, 100, "dynamic_update_slice_fusion"), (1100, 100, "MemcpyDtoH"),
              (1300, 400, "entry_mosaic_gpu")]
    t0, t1 = ps.split_ticks(events, [(0, 900), (1000, 500)], [400])
    # tick 0: busy 100..300, 500..600, 650..700, 950..1000 (the scatter runs past its end)
    assert (t0["window"], t0["busy"], t0["idle"], t0["kernels"]) == (1000, 400, 600, 550)
    assert t0["first_ms"] == 100e-6 and t0["decode_busy"] == 200
    assert dict(t0["by_kind"]) == {"prefill attention": 200, "matmul": 100,
                                   "decode attention": 100, "reduce/softmax/sample": 50,
                                   "gather/scatter": 100}
    # tick 1, the last: its window ends at its last kernel (1700); 50 ns of tick 0's scatter
    assert (t1["window"], t1["busy"], t1["idle"], t1["kernels"]) == (700, 550, 150, 500)
    assert dict(t1["by_kind"]) == {"copy/memcpy/memset": 100, "decode attention": 400}
    assert t1["decode_busy"] == 500 and t1["count"]["entry_mosaic_gpu"] == 1
    # the run's one trace: an untraced tick starting at 1600 bounds tick 1, whose window
    # is then [1000, 1600), its kernels those starting there (the one at 1300 included)
    _, t1 = ps.split_ticks(events + [(1650, 50, "late_fusion")], [(0, 900), (1000, 500)],
                           [400], bounds=[1000, 1600])
    assert (t1["window"], t1["kernels"]) == (600, 500) and "late_fusion" not in t1["count"]

    now = [0.0]
    monkeypatch.setattr(ps.time, "perf_counter", lambda: now[0])
    clock = ps.Clock()

    def inner():
        now[0] += 2.0

    def outer(f):
        now[0] += 1.0
        f()
        now[0] += 0.5

    timed_inner = clock.wrap("wait inner", inner)
    clock.wrap("sched outer", outer)(timed_inner)
    timed_inner()
    assert clock.secs == {"sched outer": 1.5, "wait inner": 4.0}
    assert clock.calls == {"sched outer": 1, "wait inner": 2}


def test_profile_serving_tiny_phases_are_consistent(tmp_path, capsys):
    """benchmarks/profile_serving.py's CPU smoke run of W2 (prefill calls of 2 prompts, so
    the 8 slots fill over 4 ticks; 16 new tokens, 8 ticks a request): phase (a) traces
    ticks that prefill and decode, phase (b) ticks without a prefill call at the full batch,
    phase (c) the last 4 requests' decode; the host's exclusive parts never add up past the tick's
    wall time; a CPU trace has no kernels and says so."""
    import serving
    import profile_serving as ps
    out = tmp_path / "phases.json"
    assert ps.main(["--tiny", "--workload", "w2", "--ticks", "2", "--prefill-tokens", "32",
                    "--chunk", "16", "--min-chunk", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not a GPU" in text and "steady decode" in text
    a, b, c = json.loads(out.read_text())["phases"]
    assert (a["phase"], b["phase"], c["phase"]) == ("a", "b", "c")
    assert a["ticks"] == a["prefill_ticks"] == a["decode_ticks"] == 2
    for p in (b, c):
        assert p["prefill_ticks"] == 0 and p["decode_ticks"] == p["ticks"] == 2
    assert b["live"] == 8 and c["live"] <= 4  # every slot, then at most half of them
    w = serving.TINY["w2"]
    for p in (a, b, c):
        assert p["device"] is None
        assert p["annotated"] == p["ticks"]  # each traced tick's annotation read back
        assert 0 < p["live"] <= p["rows"] <= w.slots
        assert w.prompt[0] <= p["length"] <= w.prompt[0] + 16  # --tiny: 16 new tokens
        parts = {k: v for k, v in p["host_ms"].items() if k != "sched other"}
        assert all(v >= 0 for v in parts.values())
        assert sum(parts.values()) <= p["wall_ms"] * (1 + 1e-9)
        assert parts["dispatch step"] > 0 and parts["wait to_host"] > 0
    assert a["host_ms"]["dispatch prefill_chunks"] > 0
    assert "dispatch prefill_chunks" not in b["host_ms"]
    # --requests 1: one request's decode ticks (no tick prefills while others decode: no (a))
    # (the first run's prefill shapes: its warm-up finds them in the compilation cache), in
    # a trace of its own followed by untraced ticks
    assert ps.main(["--tiny", "--workload", "w2", "--ticks", "2", "--requests", "1",
                    "--prefill-tokens", "32", "--chunk", "16", "--min-chunk", "16",
                    "--no-drain", "--trace-per-phase", "--json", str(out)]) == 0
    (one,) = json.loads(out.read_text())["phases"]
    assert one["phase"] == "b" and one["live"] == 1 and one["decode_ticks"] == 2
    assert one["annotated"] == 2 and one["untraced_wall_ms"] > 0


def test_serving_steady_plan_of_a_hand_worked_schedule():
    """serving.steady_plan on a scheduler whose every prefill call takes 2 rows x 4 tokens
    (ticks, tokens and pages worked out by hand): prompts of 6 tokens are prefilled at
    ticks 2, 2, 4; row i has made 1 + W (P - t_i + 2 + ticks) tokens by the last timed
    tick and holds pages for W more; the batch is the largest whose pages the pool (less
    the null page) holds."""
    import types

    import serving
    fake = types.SimpleNamespace(_call_shape=lambda rest: (2, 4),
                                 config=types.SimpleNamespace(steps_per_tick=2),
                                 paged=types.SimpleNamespace(page_size=4, num_pages=14))
    assert serving.prefill_ticks(fake, 3, 6) == [2, 2, 4]
    # 3 rows: made 11, 11, 7 -> pages ceil(19/4) * 2 + ceil(15/4) = 14 > 13
    # 2 rows: made 7, 7 -> 4 + 4 pages; max_new 1 + W (P + P // 4 + 4 + 2 ticks)
    assert serving.steady_plan(fake, 3, 6, 1) == dict(batch=2, prefill_ticks=2, pages=8,
                                                      max_new=17)
    fake.paged.num_pages = 15
    assert serving.steady_plan(fake, 3, 6, 1) == dict(batch=3, prefill_ticks=4, pages=14,
                                                      max_new=23)
    fake.paged.num_pages = 4  # one row needs 4 pages, the pool holds 3
    with pytest.raises(ValueError, match="one row of 6 tokens"):
        serving.steady_plan(fake, 3, 6, 1)


def test_load_summary_of_hand_made_requests():
    """serving_load.summarize on records worked out by hand: TTFT = first chunk - send,
    inter-token = chunk gaps over the tokens a chunk carries (the request's tokens spread
    evenly over its chunks), end-to-end = end - send, tokens/s over first send to last end;
    a failed request is counted and left out of the latencies."""
    import serving_load as sl
    ok = {"sent": 10.0, "chunks": [11.0, 12.0, 14.0], "words": [1, 2, 3], "end": 14.0,
          "tokens": 6, "error": None}
    bad = {"sent": 10.5, "chunks": [], "tokens": 0, "error": "HTTP 429: b''"}
    row = sl.summarize([ok, bad], t0=10.0)
    assert (row["sent"], row["ok"], row["failed"]) == (2, 1, 1)
    assert row["tokens"] == 6 and row["seconds"] == 4.0 and row["tok_s"] == 1.5
    assert row["ttft_p50_s"] == row["ttft_p99_s"] == 1.0
    assert row["e2e_p50_s"] == 4.0
    # gaps 1 s (2 tokens) and 2 s (3 tokens): 0.5 and 2/3 s a token
    assert abs(row["itl_p50_s"] - 7 / 12) < 1e-9 and abs(row["itl_p99_s"] - 0.665) < 1e-3
    # words that do not add up to the tokens: 2 tokens a chunk, 0.5 and 1.0 s a token
    row = sl.summarize([{**ok, "words": [1, 1, 1]}], t0=10.0)
    assert row["itl_p50_s"] == 0.75 and row["itl_p99_s"] < 1.0
    assert not sl.sustains({**row, "failed": 0})  # p99 TTFT 1 s is not under 1 s
    gaps = np.diff(sl.arrivals(4.0, 20000))
    assert abs(gaps.mean() - 0.25) < 0.01 and abs(gaps.std() - 0.25) < 0.01  # exponential


def test_serving_load_tiny_rows_are_consistent(tmp_path):
    """benchmarks/serving.py --server --tiny (jaxformer's server on a thread, no peer): every
    request of each rate is sent and answered with its max_tokens, tokens/s is tokens over
    seconds, p50 <= p99, the sustained rate is the highest whose p99s meet the targets, and the
    offline engine's row is the same requests' tokens over its seconds."""
    import serving
    import serving_load as sl
    out = tmp_path / "load.json"
    missing = str(tmp_path / "no-guidellm")  # the fallback row, whatever is on PATH
    assert serving.main(["--server", "--tiny", "--rates", "4", "8", "--json", str(out),
                         "--guidellm", missing]) == 0
    # (no capsys: uvicorn's log handlers would hold its stream past the test)
    r = json.loads(out.read_text())
    load = sl.Load(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["load"].items()})
    rows = r["jaxformer"]["rates"]
    assert [x["rate"] for x in rows] == [4, 8]
    for x in rows:
        n = min(load.requests, int(np.ceil(x["rate"] * load.duration)))
        assert x["sent"] == n and x["ok"] + x["failed"] == n and x["failed"] == 0, x["errors"]
        assert x["tokens"] == sum(m for _, m in sl.requests(load, n, 259))
        assert abs(x["tok_s"] - x["tokens"] / x["seconds"]) < 1e-9 * x["tok_s"]
        for m in ("ttft", "itl", "e2e"):
            assert 0 <= x[f"{m}_p50_s"] <= x[f"{m}_p99_s"]
        assert x["ttft_p99_s"] <= x["e2e_p99_s"] + 1e-9
        assert x["sustains"] == (x["ttft_p99_s"] < 1 and x["itl_p99_s"] < 0.05)
    good = [x["rate"] for x in rows if x["sustains"]]
    off = r["offline"]
    assert off["rate"] == (max(good) if good else 8)
    n = next(x["sent"] for x in rows if x["rate"] == off["rate"])
    news = sum(m for _, m in sl.requests(load, n, 259))
    assert abs(off["tok_s"] - news / off["seconds"]) < 1e-6 * off["tok_s"]
    assert r["jaxformer"]["single"]["tok_s"] > 0 and r["engine_single"]["sched_decode_ms"] > 0
    assert r["jaxformer"]["guidellm"] == {
        "error": f"no guidellm program at {missing!r} (pip install guidellm into a venv of its "
                 "own and pass --guidellm VENV/bin/guidellm)"}


def test_guidellm_row_of_hand_made_output():
    """guidellm_run.row on a JSON shaped as guidellm 0.8.1 writes it: tokens/s over first
    request start to last end, offered over first to last start, percentiles from guidellm's
    (ms to s), and requests guidellm did not finish counted as failed."""
    import guidellm_run

    def dist(p50, p99, total=0.0):
        return {"successful": {"percentiles": {"p50": p50, "p99": p99}, "total_sum": total,
                               "mean": 7.0}}
    timings = [{"request_start": 100.0, "request_end": 101.0},
               {"request_start": 102.0, "request_end": 105.0}]
    result = {"benchmarks": [{"duration": 9.0, "requests": {"successful": [
        {"info": {"timings": t}} for t in timings]}, "metrics": {
        "request_totals": {"successful": 2, "errored": 1, "incomplete": 0, "total": 3},
        "output_token_count": dist(0, 0, total=30), "output_tokens_per_second": dist(0, 0),
        "time_to_first_token_ms": dist(10.0, 20.0), "inter_token_latency_ms": dist(2.0, 3.0),
        "request_latency": dist(1.5, 3.0)}}]}
    row = guidellm_run.row(result, rate=2.0, n=4)
    assert (row["sent"], row["ok"], row["failed"]) == (4, 2, 2)
    assert row["errors"] == ["1 errored, 0 incomplete, 1 not sent"]
    assert row["tokens"] == 30 and row["seconds"] == 5.0 and row["tok_s"] == 6.0
    assert row["offered_tok_s"] == 15.0 and row["guidellm_tok_s"] == 7.0
    assert (row["ttft_p50_s"], row["ttft_p99_s"]) == (0.01, 0.02)
    assert (row["itl_p50_s"], row["itl_p99_s"]) == (0.002, 0.003)
    assert (row["e2e_p50_s"], row["e2e_p99_s"]) == (1.5, 3.0)


def test_program_memory_lists_pool_copies_of_hand_made_hlo():
    """benchmarks/program_memory.py's HLO scan, on hand-written HLO: a pool-shaped copy in
    the entry computation is listed with its jax op; the in-place scatter fusion, the
    pass-through instructions and the instructions inside a fusion body are not."""
    import program_memory
    hlo = """
%fused_scatter.1 (p0: bf16[2,8,4,2,16]) -> bf16[2,8,4,2,16] {
  %convert.1 = bf16[2,8,4,2,16]{4,3,2,1,0} convert(%p0)
}
ENTRY %main.9 (k: bf16[2,8,4,2,16]) -> bf16[2,8,4,2,16] {
  %k.1 = bf16[2,8,4,2,16]{4,3,2,1,0} parameter(0), metadata={op_name="args[0].cache.k"}
  %copy.3 = bf16[2,8,4,2,16]{4,3,2,1,0} copy(%k.1), metadata={op_name="jit(f)/while/copy_p"}
  %input_scatter_fusion.2 = bf16[2,8,4,2,16]{4,3,2,1,0} fusion(%copy.3), kind=kInput, calls=%fused_scatter.1, metadata={op_name="jit(f)/scatter"}
  %gte.4 = bf16[2,8,4,2,16]{4,3,2,1,0} get-tuple-element(%t), index=0
  %other.5 = bf16[2,8,4,3,16]{4,3,2,1,0} copy(%k.1)
  ROOT %copy.6 = bf16[2,8,4,2,16]{4,3,2,1,0} copy(%input_scatter_fusion.2)
}
"""
    found = program_memory.pool_instructions(hlo, (2, 8, 4, 2, 16))
    assert found == {("copy", "jit(f)/while/copy_p"): 1, ("copy", ""): 1}


def test_program_memory_smoke_pool_is_aliased(capsys):
    """The CPU smoke run: every program aliases (donates) the whole pool into its output."""
    import program_memory
    assert program_memory.main(["--preset", "demo", "--pages", "256", "--slots", "4",
                                "--max-length", "32", "--chunk", "16", "--rows", "2",
                                "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pool_mb = float(re.search(r"pool (\S+) MB", lines[0]).group(1))
    rows = [ln.split() for ln in lines[2:] if not ln.startswith(" ")]
    assert len(rows) >= 2  # the chunk prefill and at least one decode row count
    for r in rows:
        assert pool_mb > 1 and float(r[-2]) >= pool_mb - 0.05, r  # aliased MB covers the pool


def test_serving_ticks_counts_every_prompt_token_and_decode_row(capsys):
    """benchmarks/serving_ticks.py over W2's shapes cut to 6 requests: the prefill ticks
    compute exactly the requests' prompt tokens (no prefix is shared, nothing is preempted),
    the decode windows hold every request for at least its new tokens after the first, and
    the printed table agrees with the ticks."""
    import serving
    import serving_ticks
    ticks = serving_ticks.main(["--workload", "w2", "--requests", "6", "--prefill-tokens",
                                "256", "--chunk", "128", "--min-chunk", "128"])
    w = serving.WORKLOADS["w2"]
    assert sum(c for _, c in ticks) == 6 * w.prompt[0]
    steps = serving.FULL_ARGS["steps_per_tick"]
    assert steps * sum(r for r, _ in ticks) >= 6 * (w.new - 1)
    assert all(r <= 6 for r, _ in ticks)
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"| {len(ticks)} |")]
    assert len(row) == 1 and f"({6 * w.prompt[0]})" in row[0]
