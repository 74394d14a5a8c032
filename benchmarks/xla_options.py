"""Per-program XLA options against the compiled decode loop: one model, one process, one
table (ms per decode step for each option set), so an option is judged on the same card,
weights and inputs as the defaults.

    python benchmarks/xla_options.py --preset gpt3-6.7b --tensor 2
    python benchmarks/xla_options.py --preset gpt3-6.7b --options defaults,pdl

Each option set is passed to `Lowered.compile(options)` for generate()'s decode loop only
(XLA_FLAGS would change every program). Batch 1, prompt 128, 128 new tokens, random bf16
weights; the best of three timed loops after a warm-up. An option this jaxlib does not know
is reported and skipped. Greedy tokens are printed beside each time as a sanity check.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxformer as jf  # noqa: E402
from jaxformer.generate import GenerateRun  # noqa: E402

OPTIONS = {
    "defaults": {},
    "sync_all_reduce": {"xla_gpu_disable_async_collectives": "ALLREDUCE"},
    "one_shot_all_reduce": {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True},
    "sync_one_shot": {"xla_gpu_disable_async_collectives": "ALLREDUCE",
                      "xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True},
    "block_level_rewriter": {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True},
    "all_fusions_triton": {"xla_gpu_experimental_all_fusions_with_triton": True},
    "heroless_fusion": {"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True},
    "multi_output_fusion": {"xla_gpu_unsupported_enable_triton_multi_output_fusion": True},
    "pdl": {"xla_gpu_enable_pdl": True},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt3-6.7b")
    ap.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--options", default=",".join(OPTIONS),
                    help=f"comma-separated option sets, of: {', '.join(OPTIONS)}")
    ap.add_argument("--new", type=int, default=128, help="decode steps per timed loop")
    args = ap.parse_args(argv)
    names = [n for n in args.options.split(",") if n]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        ap.error(f"--options: unknown {unknown}; known: {list(OPTIONS)}")
    cfg = jf.ModelConfig.from_preset(args.preset)
    mesh = jf.make_mesh(1, 1, args.tensor, devices=jax.devices()[:args.tensor])
    model = jf.Model.random(cfg, mesh, dtype="bfloat16", seed=0, quantize=args.quantize)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 128)).tolist()
    new = args.new
    run = GenerateRun(model, prompts, new, None, 0, ignore_eos=True)
    loop = run.engine.decode_loop()
    leaves = model.param_leaves()
    dev = jax.devices()[0]
    print(f"# {args.preset} tensor={args.tensor} {args.quantize or 'bf16'} batch 1 on "
          f"{args.tensor} x {dev.device_kind}; jax {jax.__version__}")
    print("| options | ms/step | first tokens |\n|---|---|---|")
    for name in names:
        try:
            state = run.prefill()
            exe = loop.lower(model.params, state, jnp.int32(new)).compile(
                OPTIONS[name])
        except Exception as e:  # noqa: BLE001 - an option this jaxlib lacks, or rejects
            print(f"| {name} | not compiled: {type(e).__name__}: {str(e)[:120]} | |")
            continue
        times = []
        for _ in range(4):  # a warm-up, then three timed loops
            state = run.prefill()
            jax.block_until_ready(state.last)
            t = time.perf_counter()
            out = exe(leaves, state, jnp.int32(new))
            jax.block_until_ready(out.out)
            times.append(time.perf_counter() - t)
        toks = np.asarray(out.out)[0, :6].tolist()
        print(f"| {name} | {min(times[1:]) / (new - 1) * 1e3:.3f} | {toks} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
