"""What each compiled serving program holds besides its arguments: XLA's memory analysis of
the paged engine's chunk-prefill and decode programs, and every instruction of the compiled
HLO that produces a pool-shaped array other than the pool's own in-place updates.

    python benchmarks/program_memory.py --preset llama3-8b --layers 32 --pages 9835
    python benchmarks/program_memory.py --preset demo --pages 64 --slots 4     # CPU smoke

Per program (random weights, nothing runs: lower and compile only) it prints, in MB: the
arguments, the outputs, how much of the outputs aliases donated arguments (the pool should),
and the temporaries. A temporary near the pool's size, or a copy / convert of pool shape in
the listing, means the program holds a second pool: the memory plan does not count one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxformer as jf  # noqa: E402
from jaxformer.cli_args import positive_int  # noqa: E402
from jaxformer.engine import EngineConfig  # noqa: E402
from jaxformer.paged_engine import PagedEngine  # noqa: E402

# pool-shaped instructions that are the pool itself, not a second copy of it
_PASSING = ("parameter", "get-tuple-element", "tuple", "bitcast", "optimization-barrier")


def pool_instructions(hlo: str, shape: tuple[int, ...]) -> dict[tuple[str, str], int]:
    """{(opcode, jax op name): count} of the instructions in optimized HLO text whose result
    is an array of `shape`, outside fusion bodies (a fusion's inner instructions are not
    buffers), less the pass-through ones (_PASSING) and the scatters / scatter fusions that
    write the new tokens in place."""
    dims = ",".join(map(str, shape))
    out: dict[tuple[str, str], int] = {}
    inner = False
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%(\S+) ", line)
        if head:  # a computation starts: fusion bodies are named fused_* / wrapped_*
            inner = head.group(1).startswith(("fused", "wrapped"))
            continue
        m = re.match(rf"\s*(?:ROOT )?%\S+ = \w+\[{dims}\]\S* ([\w-]+)\(", line)
        if inner or not m or m.group(1) in _PASSING:
            continue
        name = re.search(r'op_name="([^"]+)"', line)
        name = name.group(1) if name else ""
        if m.group(1) in ("scatter", "fusion") and name.endswith("scatter"):
            continue
        out[(m.group(1), name)] = out.get((m.group(1), name), 0) + 1
    return out


def programs(engine: PagedEngine, state, rows: int, tokens: int) -> list[tuple[str, object]]:
    """(name, lowered) of the chunk prefill at rows x tokens and of every decode row count."""
    params = engine.model.params
    out = [(f"chunk {rows}x{tokens}",
            engine._chunk_fn().lower(params, state, *engine._chunk_args([], rows, tokens)))]
    out += [(f"decode {r} rows", engine._rows_loop(r).lower(params, state, jnp.int32(1)))
            for r in engine.decode_rows()]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--layers", type=positive_int, help="fewer layers than the preset's")
    ap.add_argument("--pages", type=positive_int, default=4096)
    ap.add_argument("--page-size", type=positive_int, default=16)
    ap.add_argument("--slots", type=positive_int, default=512)
    ap.add_argument("--max-length", type=positive_int, default=640)
    ap.add_argument("--chunk", type=positive_int, default=512)
    ap.add_argument("--rows", type=positive_int, default=8, help="chunk-prefill rows")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    cfg = jf.ModelConfig.from_preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    model = jf.Model.random(cfg, dtype=args.dtype, seed=0)
    engine = PagedEngine(model, EngineConfig(
        slots=args.slots, max_length=args.max_length, window=8, page_size=args.page_size,
        num_pages=args.pages), chunk=args.chunk)
    state = engine.init_state()
    pool = jax.tree.leaves(state.cache)
    MB = 1e6
    print(f"# {args.preset}, {cfg.num_layers} layers, {jax.devices()[0].device_kind}; pool "
          f"{sum(a.nbytes for a in pool) / MB:.1f} MB in {len(pool)} arrays of "
          f"{pool[0].shape}")
    print(f"{'program':<18}{'args MB':>10}{'out MB':>10}{'aliased':>10}{'temp MB':>10}")
    for name, lowered in programs(engine, state, args.rows, min(args.chunk,
                                                                 args.max_length)):
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        print(f"{name:<18}{m.argument_size_in_bytes / MB:>10.1f}"
              f"{m.output_size_in_bytes / MB:>10.1f}{m.alias_size_in_bytes / MB:>10.1f}"
              f"{m.temp_size_in_bytes / MB:>10.1f}")
        for (op, jax_op), n in pool_instructions(compiled.as_text(), pool[0].shape).items():
            print(f"    {n} x pool-shaped {op} ({jax_op or 'no op name'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
