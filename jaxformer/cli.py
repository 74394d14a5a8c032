"""The `jaxformer` command.

    jaxformer generate [--checkpoint DIR] [--tensor T --pipe P --data D] --prompt "Hello"
                       [--quantize int8|int4|int4-g<N>|fp8|fp8-tensor] ...
    jaxformer presets
    jaxformer bench [--presets gpt3-1.3b ...] [--batches 1 64] [--hf] ...   (jaxformer/bench.py)
    jaxformer info (--checkpoint DIR | --preset NAME) [--tensor T --pipe P --data D]
                   [--batch B --max-length L] [--dtype bfloat16] [--device-memory GiB]
                   [--quantize ...]

Without --checkpoint, `generate` runs the built-in demo model (untrained, seeded weights,
byte tokenizer): it proves the install works, its text is noise.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from jaxformer.config import PREFILL_TOKENS


def _add_mesh(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=int, default=1, help="data-parallel size")
    p.add_argument("--pipe", type=int, default=1, help="pipeline stages")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size")


QUANTIZE_HELP = ("quantize the linear layers: int8 | int4 | int4-g<N> | fp8 | fp8-tensor | none "
                 "(docs/quantization.md)")


def _quantize(value):
    return None if value in (None, "none") else value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxformer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from prompts")
    g.add_argument("--checkpoint", help="jaxformer checkpoint dir (default: the demo model)")
    _add_mesh(g)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a file with one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stream", action="store_true", help="print tokens as they are made")
    g.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    g.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache ($JAXFORMER_CACHE_DIR, "
                        "default ~/.cache/jaxformer/jax)")
    g.add_argument("--quantize", help=QUANTIZE_HELP + "; a quantized checkpoint loads as "
                   "stored without it")
    g.add_argument("--kv-cache", choices=["int8", "fp8"],
                   help="quantize the KV cache (about half the bytes of bf16)")
    sub.add_parser("presets", help="list the model presets in configs/models")
    sub.add_parser("bench", add_help=False,
                   help="generation speed vs the card's ceilings and Hugging Face "
                        "(jaxformer bench --help)")
    i = sub.add_parser("info", help="the memory plan per device (reads config.json only)",
                       description="Weights, KV cache and prefill activations per device, "
                       "against device memory, and the largest batch x length that fits. "
                       "Nothing is loaded: only the checkpoint's config.json is read.")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="jaxformer checkpoint dir")
    src.add_argument("--preset", help="a model preset (jaxformer presets lists them)")
    _add_mesh(i)
    i.add_argument("--batch", type=int, help="prompts generated together")
    i.add_argument("--max-length", type=int, help="prompt + new tokens per prompt")
    i.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    i.add_argument("--device-memory", type=float, metavar="GiB",
                   help="memory per device (default: what jax reports, or "
                        "$JAXFORMER_DEVICE_MEMORY)")
    i.add_argument("--rules", default="default", help="sharding rules (configs/sharding/)")
    i.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    i.add_argument("--quantize", help=QUANTIZE_HELP + " (default: as the checkpoint stores "
                   "it)")
    i.add_argument("--kv-cache", choices=["int8", "fp8"], help="a quantized KV cache")
    i.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "unroll"],
                   help="the layer layout decode runs (RunConfig.layer_loop; auto: unroll "
                        "on a GPU host, where decode updates the cache in place)")
    i.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS,
                   help="most prompt tokens one prefill pass computes "
                        "(RunConfig.prefill_tokens)")
    return ap


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        prompts = ["The meaning of life is"]
    return prompts


def cmd_generate(args) -> int:
    import jaxformer as jf

    sampling = jf.Sampling(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, num_beams=args.num_beams,
        length_penalty=args.length_penalty, stop_strings=tuple(args.stop))
    if not args.no_compile_cache:  # a second run loads its programs instead of compiling
        jf.enable_compilation_cache()
    mesh = jf.make_mesh(args.data, args.pipe, args.tensor,
                        devices=None if args.data * args.pipe * args.tensor > 1 else
                        __import__("jax").devices()[:1])
    t0 = time.perf_counter()
    if args.checkpoint:
        model = jf.load(args.checkpoint, mesh=mesh, dtype=args.dtype, attention=args.attention,
                        quantize=_quantize(args.quantize), kv_cache=args.kv_cache)
    else:
        print("# no --checkpoint: using the built-in demo model (UNTRAINED random weights; "
              "its text is noise)", file=sys.stderr)
        model = jf.demo_model(mesh=mesh, dtype=args.dtype, quantize=_quantize(args.quantize),
                              kv_cache=args.kv_cache)
    quant = f" ({model.run.quantize})" if model.run.quantize else ""
    print(f"# loaded {model.config.name or args.checkpoint}{quant} in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompts = _prompts(args)
    t0 = time.perf_counter()
    if args.stream:
        tok = model.tokenizer
        result = None
        for item in model.generate(prompts, args.max_new_tokens, sampling, args.seed,
                                   stream=True):
            if isinstance(item, jf.GenerateOutput):
                result = item
                break
            for i, new in enumerate(item):
                if new:
                    text = tok.decode(new) if tok else " ".join(map(str, new))
                    print(f"[{i}] {text}", flush=True)
    else:
        result = model.generate(prompts, args.max_new_tokens, sampling, args.seed)
    dt = time.perf_counter() - t0
    for i, p in enumerate(prompts):
        body = result.texts[i] if result.texts is not None else " ".join(map(str, result.tokens[i]))
        print(f"=== prompt {i}: {p!r}\n{body}")
    n = sum(len(t) for t in result.tokens)
    print(f"# {n} tokens in {dt:.2f}s: {n / dt:.1f} tokens/s (first call includes compilation)")
    return 0


def cmd_info(args) -> int:
    """Print the memory plan; exit status 1 when it does not fit device memory."""
    from types import SimpleNamespace

    from jaxformer import kv_replicate, memory
    from jaxformer import sharding as shd
    from jaxformer.config import ModelConfig
    quantize = _quantize(args.quantize)
    if args.checkpoint:
        from jaxformer.checkpoint import read_config, read_quantization
        config = read_config(args.checkpoint)
        stored = read_quantization(args.checkpoint)
        if stored is not None and args.quantize not in (None, stored):
            raise ValueError(f"{args.checkpoint} holds {stored!r}-quantized weights; "
                             f"--quantize {args.quantize} cannot apply to it")
        quantize = stored or quantize
    else:
        config = ModelConfig.from_preset(args.preset)
    sizes = {"data": args.data, "pipe": args.pipe, "tensor": args.tensor}
    # fewer kv heads than tensor: planned as load() runs it, each kv head copied
    mesh_sizes, rules = SimpleNamespace(shape=sizes), shd.load_rules(args.rules)
    config = kv_replicate.replicated_config(config, kv_replicate.factor(config, mesh_sizes, rules))
    shd.check_divisible(config, mesh_sizes, rules)
    dev = None if args.device_memory is None else args.device_memory * memory.GiB
    plan = memory.plan(config, sizes, args.dtype, batch=args.batch, max_length=args.max_length,
                       rules=args.rules, attention=args.attention, device_memory=dev,
                       quantize=quantize, kv_cache=args.kv_cache,
                       layer_loop=args.layer_loop, prefill_tokens=args.prefill_tokens)
    print(plan.explain())
    return 1 if plan.fits is False else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own argument parser (jaxformer/bench.py)
        from jaxformer import bench
        return bench.main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "presets":
            import jaxformer as jf
            print("\n".join(jf.list_presets()))
            return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxformer: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
