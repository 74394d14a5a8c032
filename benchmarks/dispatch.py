"""Host time of a prefill call: compiled entry points take the weights as a flat tuple built
once per model (jaxformer.engine.ParamsJit) instead of the nnx.State that jit would flatten
in Python on every call. Prints, per weight mode, how long the call takes to return (the
device waits for that) and the time to first token, both ways, in one process:

    python benchmarks/dispatch.py --preset gpt3-6.7b --prompt 1920 --quantize none,int8,fp8

Median of --calls calls, --gap seconds apart (so each call starts on an idle device).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxformer as jf  # noqa: E402
from jaxformer.generate import _Run, make_prefill  # noqa: E402


def timed(f, params, args, calls: int, gap: float):
    """(median ms until the call returns, median ms until the first token is on the host)"""
    jax.block_until_ready(f(params, *args).last)
    ret, total = [], []
    for _ in range(calls):
        time.sleep(gap)
        t = time.perf_counter()
        state = f(params, *args)
        ret.append(time.perf_counter() - t)
        jax.block_until_ready(state.last)
        total.append(time.perf_counter() - t)
    return np.median(ret) * 1e3, np.median(total) * 1e3


def handed_the_state(flat):
    """The same program behind a jit that is handed the nnx.State itself (the old way)."""
    return jax.jit(lambda p, *a: flat._jitted(tuple(jax.tree.leaves(p)), *a))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt3-1.3b")
    ap.add_argument("--prompt", type=int, default=1920)
    ap.add_argument("--quantize", default="none", help="comma list: none,int8,int4,fp8")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--gap", type=float, default=0.2)
    args = ap.parse_args(argv)
    cfg = jf.ModelConfig.from_preset(args.preset)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.preset}, one prompt "
          f"of {args.prompt} tokens")
    print("| weights | arrays | call returns after (ms), State -> tuple | TTFT (ms), State -> "
          "tuple |\n|---|---|---|---|")
    for mode in args.quantize.split(","):
        q = None if mode == "none" else mode
        model = jf.Model.random(cfg, dtype="bfloat16", seed=0, quantize=q)
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt))
        run = _Run(model, prompt.tolist(), 8, None, 0, ignore_eos=True)
        flat = run.compiled("prefill", make_prefill, run.feats, run.max_new, run.cache_len)
        state_jit = handed_the_state(flat)
        call = (run.ids, run.lengths, run.req)
        r0, t0 = timed(state_jit, model.params, call, args.calls, args.gap)
        r1, t1 = timed(flat, model.params, call, args.calls, args.gap)
        print(f"| {mode if q else 'bf16'} | {len(model.param_leaves())} | {r0:.2f} -> {r1:.2f} "
              f"| {t0:.1f} -> {t1:.1f} |", flush=True)
        del model, run, flat, state_jit
    return 0


if __name__ == "__main__":
    sys.exit(main())
