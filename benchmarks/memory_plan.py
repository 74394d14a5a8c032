"""The memory plan (`jaxformer info`, jaxformer.memory) against measured device memory.

    python benchmarks/memory_plan.py gpt3-2.7b:8:1024:128 llama-7b:32:256:64
    python benchmarks/memory_plan.py llama-7b:32:896:128 llama-7b:64:896:128:int8  # KV cache

Each case PRESET:BATCH:PROMPT:NEW[:KV] (KV: a quantized cache, int8 or fp8; RunConfig.kv_cache)
runs in its own process (a device's peak_bytes_in_use
cannot be reset): zero weights created directly in bf16 in the unrolled layout (no float32
init spike), then generate(); it prints one table row: the plan's total, the measured peak
and their ratio. On a GPU only (CPUs report no device memory).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def child(preset: str, batch: int, prompt: int, new: int, attention: str,
          kv_cache: str | None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxformer as jf
    from jaxformer import memory
    from jaxformer import sharding as shd
    from jaxformer.model import Model, default_mesh, param_shardings
    from jaxformer.models import abstract_model

    if not jax.devices()[0].memory_stats():
        raise SystemExit(f"no device memory statistics on {jax.devices()[0].platform}: "
                         f"this check needs a GPU")
    cfg = jf.ModelConfig.from_preset(preset)
    mesh, rules = default_mesh(), shd.load_rules("default")
    run = jf.RunConfig(dtype="bfloat16", attention=attention, layer_loop="unroll",
                       kv_cache=kv_cache)
    abstract = nnx.to_pure_dict(abstract_model(cfg, 1)[1])
    params = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.bfloat16), abstract),
                     out_shardings=param_shardings(cfg, mesh, rules, None, 1))()
    jax.block_until_ready(params)
    model = Model(cfg, params, mesh, run, rules, None)
    prompts = [[1 + (i % 100)] * prompt for i in range(batch)]
    model.generate(prompts, max_new_tokens=new, ignore_eos=True)
    peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    plan = memory.plan(cfg, mesh, "bfloat16", batch=batch, max_length=prompt + new,
                       prompt_length=prompt, attention=attention, kv_cache=kv_cache)
    return dict(preset=preset, batch=batch, prompt=prompt, new=new, plan=plan.total,
                peak=peak, device=jax.devices()[0].device_kind)


def main(argv) -> int:
    if argv[:1] == ["--child"]:
        p, b, t, n, a, kv = argv[1:]
        print(json.dumps(child(p, int(b), int(t), int(n), a, None if kv == "-" else kv)),
              flush=True)
        return 0
    attention = os.environ.get("ATTENTION", "auto")
    print("| preset | batch | prompt + new | KV cache | plan GB | measured peak GB "
          "| plan / measured |")
    print("|---|---|---|---|---|---|---|")
    for case in argv or ["gpt3-2.7b:8:1024:128", "llama-7b:32:256:64"]:
        fields = case.split(":")
        if len(fields) not in (4, 5):
            raise SystemExit(f"{case!r}: expected PRESET:BATCH:PROMPT:NEW[:KV]")
        p, b, t, n = fields[:4]
        kv = fields[4] if len(fields) == 5 else "-"
        res = subprocess.run([sys.executable, __file__, "--child", p, b, t, n, attention, kv],
                             capture_output=True, text=True)
        kv_name = "bf16" if kv == "-" else kv
        if res.returncode:
            err = (res.stderr.strip().splitlines() or ["no output"])[-1][:160]
            print(f"| {p} | {b} | {t} + {n} | {kv_name} | failed: {err} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"| {p} | {b} | {t} + {n} | {kv_name} | {r['plan'] / 1e9:.2f} | "
              f"{r['peak'] / 1e9:.2f} | "
              f"{r['plan'] / r['peak']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main(sys.argv[1:]))
