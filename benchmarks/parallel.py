"""Data vs pipeline vs tensor parallelism on two devices: one table.

    python benchmarks/parallel.py                      # 2 GPUs: gpt3-6.7b, bfloat16
    python benchmarks/parallel.py --preset gpt3-1.3b --batch 1 32
    python benchmarks/parallel.py --tiny               # CPU check: tiny model, 2 emulated devices

Measures, in one run:
  1. tokens/s of a model that fits one device on 1 device, data=2, pipe=2 and tensor=2, at
     batch 1 and at a large batch (decode tokens/s of real rows, ms per decode step, prefill s);
  2. the largest GPT preset that fits the two devices with pipe=2 and with tensor=2 (the
     largest whose estimate fits is tried first; one that fails to run falls back to the next).
Targets (issue 5): pipe=2 >= 90% of data=2's large-batch tokens/s; tensor=2 batch-1 step
time <= 0.6x of one device on a 6.7B model. Weights are seeded random (speed only).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--preset", default="gpt3-6.7b", help="model that fits one device")
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--repeat", type=int, default=2, help="timed runs after the warm-up")
ap.add_argument("--attention", default="auto", help="attention backend")
ap.add_argument("--no-largest", action="store_true", help="skip the largest-preset search")
ap.add_argument("--memory-gb", type=float, default=None,
                help="memory per device for the largest-preset estimate (default: the "
                     "device's own limit)")
ap.add_argument("--tiny", action="store_true",
                help="a tiny float32 model, short runs, 2 emulated CPU devices (a smoke test)")
args = ap.parse_args()
if args.tiny:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.dtype, args.prompt_len, args.new_tokens, args.repeat = "float32", 8, 8, 1
    args.batch = [1, 8] if args.batch == ap.get_default("batch") else args.batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import numpy as np

import jaxformer as jf
from jaxformer.config import ModelConfig
from jaxformer.sharding import check_divisible, load_rules

LAYOUTS = {"1 device": (1, 1, 1), "data=2": (2, 1, 1), "pipe=2": (1, 2, 1),
           "tensor=2": (1, 1, 2)}
GPT_PRESETS = ["gpt3-175b", "gpt3-20b", "gpt3-13b", "gpt3-6.7b", "gpt3-2.7b", "gpt2-xl",
               "gpt3-1.3b", "gpt2-large", "megatron-gpt-345m", "gpt2"]
TINY = dict(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, ffn_size=256,
            max_position_embeddings=128)


def tiny_config(scale: int = 1) -> ModelConfig:
    return ModelConfig(**dict(TINY, hidden_size=64 * scale, ffn_size=256 * scale),
                       name=f"tiny-x{scale}")


def config(name: str) -> ModelConfig:
    return tiny_config() if args.tiny else ModelConfig.from_preset(name)


def measure(cfg: ModelConfig, layout, batch: int, devices) -> dict:
    """Warm up, then time generate(): decode tokens/s of real rows, ms/step, prefill s."""
    d, p, t = layout
    mesh = jf.make_mesh(d, p, t, devices=devices[: d * p * t])
    model = jf.Model.random(cfg, mesh, dtype=args.dtype, attention=args.attention)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
    kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    model.generate(prompts, **kw)  # compile
    runs = []
    for _ in range(args.repeat):
        s = model.generate(prompts, **kw).stats
        runs.append(s)
    decode = min(r["decode_s"] for r in runs)
    prefill = min(r["prefill_s"] for r in runs)
    steps = args.new_tokens - 1  # the first token comes from the prefill
    for leaf in jax.tree.leaves(model.params):  # free now: compiled closures keep models alive
        leaf.delete()
    del model
    return dict(tok_s=batch * steps / decode, ms_step=1e3 * decode / steps, prefill_s=prefill)


def estimate_bytes(cfg: ModelConfig, layout, batch: int) -> float:
    """Bytes per device: weights (embedding and head replicated over pipe) plus KV cache."""
    _, p, t = layout
    nbytes = np.dtype(args.dtype).itemsize
    embed = cfg.padded_vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    layers = cfg.num_params() - embed
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
    mesh = jf.make_mesh(*layout, devices=devices[:2])
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
            return cfg.name, measure(cfg, layout, 1, devices)
        except Exception as e:  # noqa: BLE001 - out of memory: try the next one
            tried.append(f"{cfg.name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return "-", "; ".join(tried) or "nothing fits"


def main():
    devices = jax.devices()
    if len(devices) < 2:
        sys.exit(f"needs 2 devices, found {len(devices)} ({devices[0].platform}); "
                 f"on a CPU run with --tiny")
    dev = devices[0]
    cfg = config(args.preset)
    print(f"# jaxformer parallel benchmark: {cfg.name} ({cfg.num_params() / 1e9:.2f}B), "
          f"{args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"# devices: 2 x {getattr(dev, 'device_kind', dev.platform)}; jax {jax.__version__}; "
          f"attention {args.attention}")
    rows = []
    results = {}
    for batch in args.batch:
        for name, layout in LAYOUTS.items():
            t0 = time.perf_counter()
            try:
                r = measure(cfg, layout, batch, devices)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory on one device
                r = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            results[(name, batch)] = r
            rows.append((cfg.name, name, batch, r, time.perf_counter() - t0))
    if not args.no_largest:
        for name in ("pipe=2", "tensor=2"):
            t0 = time.perf_counter()
            model_name, r = largest(LAYOUTS[name], devices)
            rows.append((f"largest: {model_name}", name, 1, r, time.perf_counter() - t0))

    head = ("model", "layout", "batch", "tokens/s", "ms/step", "prefill s", "vs 1 device")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for model_name, name, batch, r, _ in rows:
        if isinstance(r, str):
            print(f"| {model_name} | {name} | {batch} | {r} | | | |")
            continue
        base = results.get(("1 device", batch))
        rel = f"{r['tok_s'] / base['tok_s']:.2f}x" if isinstance(base, dict) and \
            model_name == cfg.name else ""
        print(f"| {model_name} | {name} | {batch} | {r['tok_s']:.1f} | {r['ms_step']:.2f} | "
              f"{r['prefill_s']:.3f} | {rel} |")
    big, one = max(args.batch), min(args.batch)
    dp, pp = results.get(("data=2", big)), results.get(("pipe=2", big))
    tp, single = results.get(("tensor=2", one)), results.get(("1 device", one))
    if isinstance(dp, dict) and isinstance(pp, dict):
        print(f"# pipe=2 / data=2 tokens/s at batch {big}: {pp['tok_s'] / dp['tok_s']:.2f} "
              f"(target >= 0.90)")
    if isinstance(tp, dict) and isinstance(single, dict):
        print(f"# tensor=2 / 1 device step time at batch {one}: "
              f"{tp['ms_step'] / single['ms_step']:.2f} (target <= 0.60 on a 6.7B model)")


if __name__ == "__main__":
    main()
