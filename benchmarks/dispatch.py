"""Host time of a prefill call, three ways: jit handed the nnx.State (flattened in Python on
every call), the weights as a flat tuple built once per model, and that tuple with the small
replicated arrays packed into one buffer per dtype (jaxformer.params_jit; what prefill
uses). Prints, per weight mode, how many arrays the call hands jit, how long the call takes
to return (the device waits for that) and the time to first token, in one process:

    python benchmarks/dispatch.py --preset gpt3-6.7b --prompt 1920 --quantize none,int8,fp8

Median of --calls calls of each, interleaved, --gap seconds apart (so each call starts on
an idle device).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxformer as jf  # noqa: E402
from jaxformer.generate import GenerateRun  # noqa: E402
from jaxformer.engine import make_prefill  # noqa: E402


def timed(fs, params, args, calls: int, gap: float) -> list[tuple[float, float]]:
    """Per function: (median ms until the call returns, median ms until the first token is
    on the host); the functions' calls interleaved, so drift in clocks hits all alike."""
    for f in fs:
        jax.block_until_ready(f(params, *args).last)
    ret, total = [[] for _ in fs], [[] for _ in fs]
    for _ in range(calls):
        for k, f in enumerate(fs):
            time.sleep(gap)
            t = time.perf_counter()
            state = f(params, *args)
            ret[k].append(time.perf_counter() - t)
            jax.block_until_ready(state.last)
            total[k].append(time.perf_counter() - t)
            del state
    return [(np.median(r) * 1e3, np.median(t) * 1e3) for r, t in zip(ret, total)]


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
    print("| weights | arrays handed to jit: tuple, packed | call returns after (ms): State, "
          "tuple, packed | TTFT (ms): State, tuple, packed |\n|---|---|---|---|")
    for mode in args.quantize.split(","):
        q = None if mode == "none" else mode
        model = jf.Model.random(cfg, dtype="bfloat16", seed=0, quantize=q)
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt))
        run = GenerateRun(model, prompt.tolist(), 8, None, 0, ignore_eos=True)
        _, args = run.prefill_call()
        c = run.engine.config
        ways = [make_prefill(model, c.features, c.window, run.cache_len, pack_small=p)
                for p in (False, True)]
        ways.insert(0, handed_the_state(ways[0]))
        call = args[1:]
        res = timed(ways, model.params, call, args.calls, args.gap)
        plan = ways[2].plan
        packed = len(plan.big) + len(plan.groups)
        print(f"| {mode if q else 'bf16'} | {len(model.param_leaves())}, {packed} | "
              + ", ".join(f"{r:.2f}" for r, _ in res) + " | "
              + ", ".join(f"{t:.1f}" for _, t in res) + " |", flush=True)
        del model, run, ways
    return 0


if __name__ == "__main__":
    sys.exit(main())
