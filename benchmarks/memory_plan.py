"""The memory plan (`jaxformer info`, jaxformer.memory) against measured device memory.

    python benchmarks/memory_plan.py gpt3-2.7b:8:1024:128 llama-7b:32:256:64

Each case PRESET:BATCH:PROMPT:NEW runs in its own process (a device's peak_bytes_in_use
cannot be reset): zero weights created directly in bf16 in the unrolled layout (no float32
init spike), then generate(); it prints one table row: the plan's total, the measured peak
and their ratio. On a GPU only (CPUs report no device memory).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def child(preset: str, batch: int, prompt: int, new: int, attention: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxformer as jf
    from jaxformer import memory
    from jaxformer import sharding as shd
    from jaxformer.engine import Model, default_mesh, param_shardings
    from jaxformer.models import abstract_model

    if not jax.devices()[0].memory_stats():
        raise SystemExit(f"no device memory statistics on {jax.devices()[0].platform}: "
                         f"this check needs a GPU")
    cfg = jf.ModelConfig.from_preset(preset)
    mesh, rules = default_mesh(), shd.load_rules("default")
    run = jf.RunConfig(dtype="bfloat16", attention=attention, layer_loop="unroll")
    abstract = nnx.to_pure_dict(abstract_model(cfg, 1)[1])
    params = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.bfloat16), abstract),
                     out_shardings=param_shardings(cfg, mesh, rules, None, 1))()
    jax.block_until_ready(params)
    model = Model(cfg, params, mesh, run, rules, None)
    prompts = [[1 + (i % 100)] * prompt for i in range(batch)]
    model.generate(prompts, max_new_tokens=new, ignore_eos=True)
    peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    plan = memory.plan(cfg, mesh, "bfloat16", batch=batch, max_length=prompt + new,
                       prompt_length=prompt, attention=attention)
    return dict(preset=preset, batch=batch, prompt=prompt, new=new, plan=plan.total,
                peak=peak, device=jax.devices()[0].device_kind)


def main(argv) -> int:
    if argv[:1] == ["--child"]:
        p, b, t, n, a = argv[1:]
        print(json.dumps(child(p, int(b), int(t), int(n), a)), flush=True)
        return 0
    attention = os.environ.get("ATTENTION", "auto")
    print("| preset | batch | prompt + new | plan GB | measured peak GB | plan / measured |")
    print("|---|---|---|---|---|---|")
    for case in argv or ["gpt3-2.7b:8:1024:128", "llama-7b:32:256:64"]:
        p, b, t, n = case.split(":")
        res = subprocess.run([sys.executable, __file__, "--child", p, b, t, n, attention],
                             capture_output=True, text=True)
        if res.returncode:
            print(f"| {p} | {b} | {t} + {n} | failed: {res.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {p} | {b} | {t} + {n} | {r['plan'] / 1e9:.2f} | {r['peak'] / 1e9:.2f} | "
              f"{r['plan'] / r['peak']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main(sys.argv[1:]))
