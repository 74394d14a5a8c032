"""Where a decode step's time goes: per-kernel device time per generated token, from a
jax.profiler trace of generate()'s decode loop.

    python benchmarks/profile_decode.py gpt3-1.3b:1 gpt3-1.3b:64     # PRESET:BATCH ...

For each case (random weights, bf16, prompt 128, 64 new tokens) it prints the wall time per
step, the summed kernel time per step, the kernel launches per step, and the kernels that
take the most time (name, microseconds per step, launches per step). On a CPU there are no
device kernels to list; the wall time is still printed.
"""
from __future__ import annotations

import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxformer as jf  # noqa: E402
from jaxformer.generate import _Run  # noqa: E402


def profile(preset: str, batch: int, prompt: int = 128, new: int = 64, top: int = 25) -> None:
    cfg = jf.ModelConfig.from_preset(preset)
    model = jf.Model.random(cfg, dtype="bfloat16", seed=0)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    run = _Run(model, prompts, new, None, 0, ignore_eos=True)
    jax.block_until_ready(run.decode(run.prefill(), new).out)  # compile
    state = run.prefill()
    jax.block_until_ready(state.last)
    trace = tempfile.mkdtemp()
    with jax.profiler.trace(trace):
        t = time.perf_counter()
        jax.block_until_ready(run.decode(state, new).out)
        wall = time.perf_counter() - t
    steps = new - 1
    total, count = collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "Stream" not in line.name and "Kernels" not in line.name:
                    continue
                for ev in line.events:
                    total[ev.name] += ev.duration_ns
                    count[ev.name] += 1
    busy = sum(total.values())
    print(f"## {preset} batch {batch}: wall {wall / steps * 1e3:.3f} ms/step, kernels "
          f"{busy / steps / 1e6:.3f} ms/step, {sum(count.values()) / steps:.0f} launches/step "
          f"(with the profiler attached)")
    for name, ns in total.most_common(top):
        print(f"  {ns / steps / 1e3:9.1f} us/step  x{count[name] / steps:6.1f}  {name[:100]}")
    sys.stdout.flush()


if __name__ == "__main__":
    for case in sys.argv[1:] or ["gpt3-1.3b:1"]:
        name, b = case.split(":")
        profile(name, int(b))
