"""Where a decode step's time goes: per-kernel device time per generated token, from a
jax.profiler trace of generate()'s decode loop.

    python benchmarks/profile_decode.py gpt3-1.3b:1 gpt3-1.3b:64     # PRESET:BATCH ...
    python benchmarks/profile_decode.py gpt3-6.7b:1:int8 --sequence 40  # + launch order
    python benchmarks/profile_decode.py gpt3-6.7b:1 --tensor 2    # tensor-parallel, GPU 0
    python benchmarks/profile_decode.py gpt3-6.7b:1:fp8 --prefill 1920  # one prefill instead

For each case (random weights, bf16, prompt 128, 64 new tokens) it prints the wall time per
step, the summed kernel time per step, the kernel launches per step, and the kernels that
take the most time (name, microseconds per step, launches per step). On a CPU there are no
device kernels to list; the wall time is still printed. With --tensor N the model runs on
a tensor=N mesh and the kernels listed are the first device's (collectives included). With
--prefill T the prompt is T tokens and the trace covers one prefill (time to first token)
instead of the decode loop: "per step" then means that one prefill. On a GPU it also prints
the call's timeline: how long after the call the first kernel starts (host dispatch: jit's
argument handling and the launch), the device span with its idle time, and the time after
the last kernel. The profiler slows the host side, so the dispatch time printed is an upper
bound; generate.py's TTFT is the unprofiled wall clock.
"""
from __future__ import annotations

import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxformer as jf  # noqa: E402
from harness import gpu_kernel_events, host_event, timeline  # noqa: E402
from jaxformer.generate import GenerateRun  # noqa: E402


CALL = "profile_decode.call"  # the host annotation around the traced call


def profile(preset: str, batch: int, prompt: int = 128, new: int = 64, top: int = 25,
            sequence: int = 0, quantize: str | None = None, tensor: int = 1,
            prefill: int = 0) -> None:
    prompt = prefill or prompt
    cfg = jf.ModelConfig.from_preset(preset)
    mesh = jf.make_mesh(1, 1, tensor, devices=jax.devices()[:tensor])
    model = jf.Model.random(cfg, mesh, dtype="bfloat16", seed=0, quantize=quantize)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    run = GenerateRun(model, prompts, new, None, 0, ignore_eos=True)
    jax.block_until_ready(run.decode(run.prefill(), new).out)  # compile
    for _ in range(3 if prefill else 1):  # warm calls: jit's fast path, the allocator
        state = run.prefill()
        jax.block_until_ready(state.last)
    trace = tempfile.mkdtemp()
    with jax.profiler.trace(trace), jax.profiler.TraceAnnotation(CALL):
        t = time.perf_counter()
        if prefill:
            jax.block_until_ready(run.prefill().last)
        else:
            jax.block_until_ready(run.decode(state, new).out)
        wall = time.perf_counter() - t
    steps = 1 if prefill else new - 1
    total, count = collections.Counter(), collections.Counter()
    # (start ns, duration ns, name) of every kernel, for --sequence
    events = gpu_kernel_events(trace, "/device:GPU:0" if tensor > 1 else None)
    for _, ns, name in events:
        total[name] += ns
        count[name] += 1
    busy = sum(total.values())
    mesh_note = (f" tensor={tensor}" if tensor > 1 else "") + \
        (f" {quantize}" if quantize else "") + (f" prefill of {prompt}" if prefill else "")
    print(f"## {preset} batch {batch}{mesh_note}: wall {wall / steps * 1e3:.3f} ms/step, kernels "
          f"{busy / steps / 1e6:.3f} ms/step, {sum(count.values()) / steps:.0f} launches/step "
          f"(with the profiler attached)")
    tl = timeline(events, host_event(trace, CALL))
    if "before" in tl:
        # a prefill's time to first token is host dispatch + device span + the sync after
        print(f"  timeline: first kernel {tl['before']:.3f} ms after the call, device span "
              f"{tl['span']:.3f} ms ({tl['idle']:.3f} idle), {tl['after']:.3f} ms after the "
              f"last kernel")
    for name, ns in total.most_common(top):
        print(f"  {ns / steps / 1e3:9.1f} us/step  x{count[name] / steps:6.1f}  {name[:100]}")
    if sequence:
        # consecutive kernels from the middle of the loop: one layer's launches in order,
        # with the idle gap before each (launch latency the GPU spends waiting)
        events.sort()
        mid = len(events) // 2
        print(f"  {sequence} consecutive kernels from mid-loop (gap before, duration, name):")
        for (s0, d, n), (p0, pd, _) in zip(events[mid:mid + sequence],
                                           events[mid - 1:mid + sequence - 1]):
            print(f"    {(s0 - p0 - pd) / 1e3:6.2f} us  {d / 1e3:7.2f} us  {n[:90]}")
    sys.stdout.flush()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=["gpt3-1.3b:1"], help="PRESET:BATCH[:QUANT]")
    ap.add_argument("--sequence", type=int, default=0,
                    help="also list this many consecutive kernels in launch order")
    ap.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices")
    ap.add_argument("--prefill", type=int, default=0,
                    help="profile one prefill of this many prompt tokens instead of decode")
    args = ap.parse_args()
    for case in args.cases:
        name, b, *q = case.split(":")
        profile(name, int(b), sequence=args.sequence, quantize=q[0] if q else None,
                tensor=args.tensor, prefill=args.prefill)
