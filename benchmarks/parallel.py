"""Data vs pipeline vs tensor parallelism, on 2, 4 or 8 devices: one table.

    python benchmarks/parallel.py                      # 2 GPUs: gpt3-6.7b, bfloat16
    python benchmarks/parallel.py --preset gpt3-1.3b --batch 1 32
    python benchmarks/parallel.py --preset gpt3-20b llama-70b --batch 1 128 --isolate \\
        --layouts 1 tensor=2 tensor=4 tensor=2,pipe=2 --no-largest     # 4 GPUs (issue 10)
    python benchmarks/parallel.py --tiny               # CPU check: tiny model, emulated devices

Measures, in one run:
  1. for each preset and layout (default: 1 device, data=2, pipe=2, tensor=2): decode
     tokens/s of real rows, ms per decode step, time to first token (the prefill), peak
     memory per device (with --isolate), and the bandwidth utilisation of the decode step:
     bytes every device reads per step (its weight shard plus its part of the KV cache),
     summed, over the step time times the devices' datasheet HBM bandwidth (the measured
     copy bandwidth for a device not in SPEC_BANDWIDTH);
  2. the largest GPT preset that fits the two devices with pipe=2 and with tensor=2 (the
     largest whose estimate fits is tried first; one that fails to run falls back to the next).
Targets: issue 5, pipe=2 >= 90% of data=2's large-batch tokens/s and tensor=2 batch-1 step
time <= 0.6x of one device on a 6.7B model; issue 10, tensor=8 batch-1 bandwidth utilisation
>= 70% and tensor=4 x pipe=2 large-batch tokens/s >= 90% of tensor=8's (printed for whichever
pair of layouts is present: tensor=N vs tensor=N/2 x pipe=2). Weights are seeded random.

--isolate runs every (preset, layout) in a child process and never touches the devices
itself: each child starts with an empty allocator, so `peak GB/dev` is that layout's own
peak (the largest over its devices), and a layout that runs out of memory cannot leave
fragments behind for the next one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--preset", nargs="+", default=["gpt3-6.7b"],
                help="models to run (the 1-device layout needs one that fits one device)")
ap.add_argument("--layouts", nargs="+", default=["1", "data=2", "pipe=2", "tensor=2"],
                help='mesh layouts: "1" (one device) or axis=size joined by commas, e.g. '
                     '"tensor=4" "tensor=2,pipe=2" "data=2,tensor=4"')
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--repeat", type=int, default=2, help="timed runs after the warm-up")
ap.add_argument("--attention", default="auto", help="attention backend")
ap.add_argument("--isolate", action="store_true",
                help="each preset and layout in its own process (per-layout peak memory)")
ap.add_argument("--child-timeout", type=float, default=1800,
                help="seconds an isolated child may run")
ap.add_argument("--no-largest", action="store_true", help="skip the largest-preset search")
ap.add_argument("--memory-gb", type=float, default=None,
                help="memory per device for the largest-preset estimate (default: the "
                     "device's own limit)")
ap.add_argument("--tiny", action="store_true",
                help="a tiny float32 model, short runs, emulated CPU devices (a smoke test)")
ap.add_argument("--child", help=argparse.SUPPRESS)  # JSON job of an isolated child
args = ap.parse_args()


def parse_layout(text: str) -> tuple[int, int, int]:
    """"1" -> (1, 1, 1); "tensor=2,pipe=2" -> (data, pipe, tensor) = (1, 2, 2)."""
    sizes = {"data": 1, "pipe": 1, "tensor": 1}
    if text.strip() in ("1", "1 device"):
        return (1, 1, 1)
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis.strip() not in sizes or not size.strip().isdigit() or int(size) < 1:
            sys.exit(f"--layouts: {text!r} is not '1' or axis=size[,axis=size] with axes "
                     f"data, pipe, tensor")
        sizes[axis.strip()] = int(size)
    return (sizes["data"], sizes["pipe"], sizes["tensor"])


def layout_name(layout) -> str:
    d, p, t = layout
    parts = [f"tensor={t}"] * (t > 1) + [f"pipe={p}"] * (p > 1) + [f"data={d}"] * (d > 1)
    return " x ".join(parts) or "1 device"


LAYOUTS = [parse_layout(s) for s in args.layouts]
N_DEVICES = max(math.prod(lay) for lay in LAYOUTS) if LAYOUTS else 1
if not args.no_largest:
    N_DEVICES = max(N_DEVICES, 2)
if args.tiny:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={N_DEVICES}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.dtype, args.prompt_len, args.new_tokens, args.repeat = "float32", 8, 8, 1
    args.batch = [1, 8] if args.batch == ap.get_default("batch") else args.batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

import jaxformer as jf  # noqa: E402
from harness import ceilings, decode_kv_bytes  # noqa: E402
from jaxformer.config import ModelConfig  # noqa: E402
from jaxformer.sharding import check_divisible, load_rules  # noqa: E402

GPT_PRESETS = ["gpt3-175b", "gpt3-20b", "gpt3-13b", "gpt3-6.7b", "gpt3-2.7b", "gpt2-xl",
               "gpt3-1.3b", "gpt2-large", "megatron-gpt-345m", "gpt2"]
TINY = dict(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, ffn_size=256,
            max_position_embeddings=128)


def tiny_config(scale: int = 1) -> ModelConfig:
    return ModelConfig(**dict(TINY, hidden_size=64 * scale, ffn_size=256 * scale),
                       name=f"tiny-x{scale}")


def config(name: str) -> ModelConfig:
    return tiny_config() if args.tiny else ModelConfig.from_preset(name)


# datasheet HBM bandwidth (bytes/s) by device_kind substring: utilisation is quoted against it
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12,
                  "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.039e12,
                  "A100-SXM4-40GB": 1.555e12}


def spec_bandwidth(kind: str) -> float | None:
    return next((bw for k, bw in SPEC_BANDWIDTH.items() if k in kind), None)


def copy_bandwidth() -> float:
    """Measured bytes/s (read + write) of an elementwise copy on one device."""
    return ceilings(args.tiny)["copy_GBps"] * 1e9


def peak_gb(devices) -> float | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 1e9 if peaks else None


def measure(cfg: ModelConfig, layout, batches, devices, copy_bw=None) -> dict:
    """Per batch: decode tokens/s of real rows, ms/step, TTFT (prefill s), bandwidth use."""
    from jaxformer import memory
    n = math.prod(layout)
    mesh = jf.make_mesh(*layout, devices=devices[:n])
    model = jf.Model.random(cfg, mesh, dtype=args.dtype, attention=args.attention)
    weights_per_device = memory.weights_bytes(cfg, mesh, args.dtype)
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
        try:
            model.generate(prompts, **kw)  # compile
            runs = [model.generate(prompts, **kw).stats for _ in range(args.repeat)]
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at this batch
            out[batch] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        decode = min(r["decode_s"] for r in runs)
        steps = args.new_tokens - 1  # the first token comes from the prefill
        step = decode / steps
        # bytes read per decode step, all devices together: every device its weight shard,
        # and the K and V the step attends to
        step_bytes = n * weights_per_device + decode_kv_bytes(
            cfg, batch, args.prompt_len, args.new_tokens, args.dtype)
        out[batch] = dict(tok_s=batch * steps / decode, ms_step=1e3 * step,
                          ttft_ms=1e3 * min(r["prefill_s"] for r in runs),
                          bw_util=step_bytes / step / (n * copy_bw) if copy_bw else None)
    for leaf in jax.tree.leaves(model.params):  # free now: compiled closures keep models alive
        leaf.delete()
    del model
    return out


def child_main(job: dict) -> None:
    """An isolated (preset, layout): measure it, print one JSON line the parent reads."""
    devices = jax.devices()
    layout = tuple(job["layout"])
    res = dict(devices=len(devices), kind=getattr(devices[0], "device_kind", "cpu"),
               jax=jax.__version__)
    try:
        bw = copy_bandwidth()
        res["copy_GBps"] = bw / 1e9
        bw = spec_bandwidth(res["kind"]) or bw
        res["batches"] = {str(b): r for b, r in
                          measure(config(job["preset"]), layout, job["batches"], devices,
                                  bw).items()}
        res["peak_GB"] = peak_gb(devices[: math.prod(layout)])
    except Exception as e:  # noqa: BLE001 - reported as the row's result
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    print("@@RESULT " + json.dumps(res), flush=True)


def run_isolated(preset: str, layout, batches) -> dict:
    job = json.dumps(dict(preset=preset, layout=list(layout), batches=list(batches)))
    argv = [sys.executable, os.path.abspath(__file__), "--child", job] + sys.argv[1:]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True,
                              timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.child_timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if not lines:
        return dict(error=f"child exited {proc.returncode} without a result "
                          f"(stderr above)")
    res = json.loads(lines[-1][len("@@RESULT "):])
    res["batches"] = {int(b): r for b, r in res.get("batches", {}).items()}
    res["wall_s"] = time.perf_counter() - t0
    return res


def estimate_bytes(cfg: ModelConfig, layout, batch: int) -> float:
    """Bytes per device: weights (embedding and head replicated over pipe) plus KV cache."""
    _, p, t = layout
    nbytes = np.dtype(args.dtype).itemsize
    embed = cfg.padded_vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    layers = jf.num_params(cfg) - embed
    weights = (layers / (p * t) + embed / t) * nbytes
    cache = (2 * cfg.num_layers * batch * (args.prompt_len + args.new_tokens + 128)
             * cfg.kv_heads * cfg.dims_per_head * nbytes) / (p * t)
    return 1.15 * (weights + cache) + 1e9 * (not args.tiny)  # + workspace


def device_memory(device) -> float | None:
    if args.memory_gb is not None:
        return args.memory_gb * 2**30
    try:
        return float(device.memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU devices have no stats
        return 0.02 * 2**30 if args.tiny else None


def largest(layout, devices) -> tuple[str, dict | str]:
    """The largest candidate that fits `layout` and runs; (name, measurement or reason)."""
    cands = [tiny_config(s) for s in (16, 8, 4, 2, 1)] if args.tiny else \
        [ModelConfig.from_preset(n) for n in GPT_PRESETS]
    budget = device_memory(devices[0])
    mesh = jf.make_mesh(*layout, devices=devices[: math.prod(layout)])
    rules = load_rules("default")
    tried = []
    for cfg in cands:
        try:
            check_divisible(cfg, mesh, rules)
        except ValueError:
            continue
        if budget is not None and estimate_bytes(cfg, layout, 1) > budget:
            continue
        try:
            r = measure(cfg, layout, [1], devices)[1]
        except Exception as e:  # noqa: BLE001 - out of memory: try the next one
            r = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if isinstance(r, dict):
            return cfg.name, r
        tried.append(f"{cfg.name}: {r}")
    return "-", "; ".join(tried) or "nothing fits"


def fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main():
    if args.child:
        return child_main(json.loads(args.child))
    results: dict = {}  # (preset, layout) -> {"batches": {batch: dict | str}, ...}
    info: dict = {}
    devices = None
    if not args.isolate:
        devices = jax.devices()
        if len(devices) < N_DEVICES:
            sys.exit(f"needs {N_DEVICES} devices, found {len(devices)} "
                     f"({devices[0].platform}); on a CPU run with --tiny")
        bw = copy_bandwidth()
        info = dict(devices=len(devices), kind=getattr(devices[0], "device_kind", "cpu"),
                    jax=jax.__version__, copy_GBps=bw / 1e9)
        bw = spec_bandwidth(info["kind"]) or bw
    for preset in args.preset:
        cfg = config(preset)
        for layout in LAYOUTS:
            t0 = time.perf_counter()
            if args.isolate:
                res = run_isolated(preset, layout, args.batch)
                info = info or {k: res[k] for k in ("devices", "kind", "jax", "copy_GBps")
                                if k in res}
            else:
                try:
                    res = dict(batches=measure(cfg, layout, args.batch, devices, bw))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory on one device
                    res = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}")
            res.setdefault("wall_s", time.perf_counter() - t0)
            results[(cfg.name, layout)] = res
            done = "; ".join(f"batch {b}: " + (f"{r['ms_step']:.2f} ms/step, "
                                                f"{r['tok_s']:.0f} tok/s"
                                                if isinstance(r, dict) else r)
                             for b, r in res.get("batches", {}).items())
            print(f"# {cfg.name} {layout_name(layout)}: {res.get('error', done)} "
                  f"({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    largest_rows = []
    if not args.no_largest:
        devices = devices or jax.devices()
        for layout in ((1, 2, 1), (1, 1, 2)):
            largest_rows.append((layout, *largest(layout, devices)))

    names = [config(p).name for p in args.preset]
    print(f"# jaxformer parallel benchmark: {', '.join(names)}; {args.dtype}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, attention {args.attention}")
    print(f"# devices: {info.get('devices', '?')} x {info.get('kind', '?')}; jax "
          f"{info.get('jax', jax.__version__)}; BW util against "
          + (f"the datasheet's {spec_bandwidth(info['kind']) / 1e9:.0f} GB/s"
             if spec_bandwidth(info.get("kind", "")) else "the measured copy bandwidth")
          + f" per device (copy measured {fmt(info.get('copy_GBps'), '.0f')} GB/s)"
          + ("; one process per layout" if args.isolate else ""))
    head = ("model", "layout", "GPUs", "batch", "tokens/s", "ms/step", "TTFT ms",
            "BW util", "peak GB/dev", "vs 1 device", "per-device eff.")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (name, layout), res in results.items():
        n = math.prod(layout)
        for batch in args.batch:
            r = res.get("batches", {}).get(batch, res.get("error", "no result"))
            cells = [name, layout_name(layout), str(n), str(batch)]
            if isinstance(r, str):
                print("| " + " | ".join(cells + [r] + [""] * 6) + " |")
                continue
            base = results.get((name, (1, 1, 1)), {}).get("batches", {}).get(batch)
            speedup = r["tok_s"] / base["tok_s"] if isinstance(base, dict) else None
            cells += [f"{r['tok_s']:.1f}", f"{r['ms_step']:.2f}", f"{r['ttft_ms']:.1f}",
                      fmt(r.get("bw_util"), ".2f"), fmt(res.get("peak_GB"), ".1f"),
                      fmt(speedup, ".2f") + "x" * (speedup is not None),
                      fmt(speedup / n if speedup else None, ".2f")]
            print("| " + " | ".join(cells) + " |")
    for layout, name, r in largest_rows:
        if isinstance(r, str):
            print(f"| largest: {name} | {layout_name(layout)} | 2 | 1 | {r} | | | | | | |")
        else:
            print(f"| largest: {name} | {layout_name(layout)} | 2 | 1 | {r['tok_s']:.1f} | "
                  f"{r['ms_step']:.2f} | {r['ttft_ms']:.1f} | {fmt(r['bw_util'], '.2f')} "
                  f"| | | |")
    summarize(results)


def summarize(results: dict) -> None:
    """The issues' target ratios, for the layouts this run has."""
    big, one = max(args.batch), min(args.batch)

    def get(name, layout, batch):
        r = results.get((name, layout), {}).get("batches", {}).get(batch)
        return r if isinstance(r, dict) else None

    for name in dict.fromkeys(n for n, _ in results):
        dp, pp = get(name, (2, 1, 1), big), get(name, (1, 2, 1), big)
        if dp and pp:
            print(f"# {name}: pipe=2 / data=2 tokens/s at batch {big}: "
                  f"{pp['tok_s'] / dp['tok_s']:.2f} (target >= 0.90)")
        single = get(name, (1, 1, 1), one)
        for t in (2, 4, 8):
            tp = get(name, (1, 1, t), one)
            if tp and single:
                print(f"# {name}: tensor={t} / 1 device step time at batch {one}: "
                      f"{tp['ms_step'] / single['ms_step']:.2f} (ideal {1 / t:.2f}; "
                      f"issue 5 target <= 0.60 for tensor=2 on a 6.7B model)")
            if tp and tp.get("bw_util") is not None:
                print(f"# {name}: tensor={t} batch-{one} bandwidth utilisation "
                      f"{tp['bw_util']:.2f} (issue 10 target >= 0.70 at tensor=8)")
            mixed = get(name, (1, 2, t // 2), big) if t >= 4 else None
            full = get(name, (1, 1, t), big)
            if mixed and full:
                print(f"# {name}: tensor={t // 2} x pipe=2 / tensor={t} tokens/s at batch "
                      f"{big}: {mixed['tok_s'] / full['tok_s']:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
