"""Where an encoder call's time goes, and which epilogues XLA fused into its matmuls.

    python benchmarks/profile_encode.py bert-large:128:384 bert-base:1:128   # PRESET:BATCH:SEQ
    python benchmarks/profile_encode.py bert-large:128:384 --dtype bfloat16 --packed
    python benchmarks/profile_encode.py bert-smoke:2:16 --dtype float32       # CPU smoke run

For each case (random weights, one compiled call of Model.embed's program, as
benchmarks/encode.py times it) it prints:
- the optimized HLO's matmuls: how many, and the epilogue each carries (cuBLASLt's BIAS,
  GELU, BIAS_GELU, ... in the custom call's backend config: the bias add and activation
  it folded in), with the fusion kinds beside them;
- on a GPU, the span of one call on the device (first kernel start to last kernel end,
  what CUDA events around the call measure) and its kernel time by kind: matmuls,
  attention, and the rest (the element-wise and reduction fusions: bias, GeLU, residual
  add, LayerNorm, casts). The rest is what fused epilogues could save; its share of the
  call is the number to watch. The kernels that take the most time are listed by name.
On a CPU there are no device kernels to list; the HLO summary and the wall time still print.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402

import encode  # noqa: E402
import jaxformer as jf  # noqa: E402
from harness import gpu_kernel_events  # noqa: E402

KINDS = (  # (kind, pattern of a kernel's name), first match wins
    ("attention", re.compile(r"flash|fmha|cudnn|attention|mosaic|softmax", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|dot", re.I)),
)


def kind(name: str) -> str:
    return next((k for k, pat in KINDS if pat.search(name)), "other")


def hlo_summary(hlo: str) -> dict:
    """Matmul custom calls, their epilogues, and fusion kinds in an optimized HLO text."""
    calls = re.findall(r'custom_call_target="([^"]*(?:gemm|matmul)[^"]*)"', hlo, re.I)
    epilogues = collections.Counter(re.findall(r'"epilogue":"(\w+)"', hlo))
    fusions = collections.Counter(re.findall(r"kind=(k\w+)", hlo))
    dots = len(re.findall(r"\bdot\(", hlo))
    return {"matmul calls": len(calls), "dots left in HLO": dots,
            "epilogues": dict(epilogues), "fusions": dict(fusions)}


def hlo_sources(hlo: str) -> dict:
    """{kernel name: (result shape, jax op_name)} for the optimized HLO's instructions: a
    GPU kernel carries its fusion's name with '.' as '_', so a kernel in the profile can be
    traced back to the jax operation (and source line) it came from."""
    out = {}
    pat = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)?) \w[\w-]*\(")
    for line in hlo.splitlines():
        m = pat.match(line)
        if m:
            src = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1).replace(".", "_").replace("-", "_")] = (
                m.group(2), src.group(1) if src else "")
    return out


def profile(preset: str, batch: int, seq: int, dtype: str, packed: bool, top: int,
            hlo_dir: str | None = None) -> None:
    cfg = encode.config(preset)
    model = jf.Model.random(cfg, dtype=dtype, seed=0)
    fn, args, _ = encode.jax_call(model, [seq] * batch, packed)
    hlo = fn.lower(model.params, *args).compile().as_text()
    if hlo_dir:  # the whole optimized program, for reading offline
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{preset}_{batch}x{seq}.hlo.txt"), "w") as f:
            f.write(hlo)
    sources = hlo_sources(hlo)
    for _ in range(3):
        jax.block_until_ready(fn(model.params, *args))
    trace = tempfile.mkdtemp()
    with jax.profiler.trace(trace):
        t = time.perf_counter()
        jax.block_until_ready(fn(model.params, *args))
        wall = time.perf_counter() - t
    layout = "packed" if packed else "padded"
    print(f"## {preset} {dtype} batch {batch} x seq {seq} ({layout}): wall {wall * 1e3:.2f} ms "
          f"(profiler attached)")
    for k, v in hlo_summary(hlo).items():
        print(f"  {k}: {v}")
    by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    events = gpu_kernel_events(trace)
    for _, ns, name in events:
        by_kind[kind(name)] += ns
        by_name[name] += ns
        count[name] += 1
    busy = sum(by_kind.values())
    if not busy:
        print("  (no device kernels: not a GPU)")
        return
    # first kernel's start to last kernel's end: what CUDA events recorded on the stream
    # around the call measure (TensorRT's published latencies), host dispatch excluded
    span = max(s + d for s, d, _ in events) - min(s for s, _, _ in events)
    print(f"  device span {span / 1e6:.3f} ms, kernels {busy / 1e6:.3f} ms, "
          f"{sum(count.values())} launches; by kind:")
    for k, ns in by_kind.most_common():
        print(f"    {k:<10} {ns / 1e6:8.3f} ms  {ns / busy:6.1%}")
    for name, ns in by_name.most_common(top):
        print(f"    {ns / 1e3:9.1f} us  x{count[name]:<4} {kind(name):<9} {name[:90]}")
        shape, op = sources.get(name, ("", ""))
        if shape or op:  # what the kernel writes and the jax op it came from
            print(f"{'':26}-> {shape[:60]}  {op[-110:]}")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=["bert-large:128:384", "bert-base:1:128"],
                    help="PRESET:BATCH:SEQ")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--packed", action="store_true", help="the packed (varseqlen) layout")
    ap.add_argument("--top", type=int, default=15, help="kernels listed by name")
    ap.add_argument("--hlo", metavar="DIR", help="also write each case's optimized HLO here")
    args = ap.parse_args(argv)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for case in args.cases:
        try:
            preset, b, s = case.split(":")
            b, s = int(b), int(s)
        except ValueError:
            ap.error(f"case {case!r}: expected PRESET:BATCH:SEQ, e.g. bert-large:128:384")
        profile(preset, b, s, args.dtype, args.packed, args.top, args.hlo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
