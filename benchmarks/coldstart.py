"""Compile time of the first request, and the same after a restart with the persistent
compilation cache, each in a fresh process (issue targets: 13B compiles in under 60 s; a
restarted process serves its first token in under 10 s).

    python benchmarks/coldstart.py --preset gpt3-13b
    python benchmarks/coldstart.py --preset demo --dtype float32     # a CPU smoke run

Each process builds the model (seeded random weights, bf16), then times its first request
(prompt 128 tokens, 8 new): compile + prefill + decode. The first process starts from an
empty cache directory; the second finds the programs the first stored there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()


def child(args) -> None:
    import jax
    import numpy as np

    import jaxformer as jf
    jf.enable_compilation_cache(args.cache)
    cfg = jf.ModelConfig.from_preset(args.preset)
    model = jf.Model.random(cfg, dtype=args.dtype)
    jax.block_until_ready(jax.tree.leaves(model.params))
    t_weights = time.perf_counter()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt).tolist()
    out = model.generate([prompt], max_new_tokens=8, ignore_eos=True)
    assert len(out.tokens[0]) == 8
    t_first = time.perf_counter()
    print(json.dumps(dict(weights_s=t_weights - T_START, first_request_s=t_first - t_weights,
                          process_s=t_first - T_START)), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt3-13b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    with tempfile.TemporaryDirectory() as cache:
        rows = []
        for name in ("cold (empty cache)", "restart (cache)"):
            cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--dtype",
                   args.dtype, "--prompt", str(args.prompt), "--cache", cache]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return res.returncode
            rows.append((name, json.loads(res.stdout.strip().splitlines()[-1])))
    print(f"# {args.preset}, {args.dtype}, first request: prompt {args.prompt}, 8 new tokens")
    print("| process | weights ready s | first request s | process total s |")
    print("|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['weights_s']:.1f} | {r['first_request_s']:.1f} | "
              f"{r['process_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
