"""The `jaxformer` command.

    jaxformer generate [--model NAME | --checkpoint DIR] [--tensor T --pipe P --data D]
                       [--devices 0,1,...] --prompt "Hello" [--stream] ...
    jaxformer chat [--model NAME | --checkpoint DIR] [--system TEXT] [--chat-template FILE]
    jaxformer serve [--checkpoint DIR | --model NAME=DIR ...] [--host H --port P] [--api-key K]
                    (jaxformer serve --help; the HTTP server of jaxformer.serving)
    jaxformer presets
    jaxformer bench [--presets gpt3-1.3b ...] [--batches 1 64] [--hf] ...   (benchmarks/harness.py)
    jaxformer info (--checkpoint DIR | --preset NAME) [--tensor T --pipe P --data D]
                   [--batch B --max-length L] [--dtype bfloat16] [--device-memory GiB]
                   [--quantize ...]

Without --model or --checkpoint, `generate` and `chat` run the built-in demo model
(untrained, seeded weights, byte tokenizer): it proves the install works, its text is noise.
Sampling defaults are jf.Sampling's (temperature 1); --greedy (or --temperature 0) is greedy.
Bad input exits with status 2 and a one-line message.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from pathlib import Path

from jaxformer import __version__, cli_serve
from jaxformer.cli_args import (ATTENTION, DTYPE_HELP, DTYPES, QUANTIZE_HELP, Parser,
                                UsageError, add_mesh, add_model, add_sampling,
                                check_length, check_model_source, checkpoint_dir, finite_float, load_model,
                                positive_float, positive_int, quantize_arg,
                                quantize_value,
                                read_prompts_file, resolve_dtype, sampling_from)
from jaxformer.config import PREFILL_TOKENS

DEFAULT_PROMPT = "The meaning of life is"


def _parser() -> Parser:
    ap = Parser(prog="jaxformer", description=__doc__)
    ap.add_argument("--version", action="version", version=f"jaxformer {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="generate text from prompts",
                       description="Generate text from prompts, on one device or a mesh.")
    add_model(g)
    g.add_argument("--prompt", action="append", default=[],
                   help=f"a prompt (repeatable; without --prompt or --prompts-file: "
                        f"{DEFAULT_PROMPT!r})")
    g.add_argument("--prompts-file", help="a file with one prompt per line")
    add_sampling(g, max_new_tokens=32)
    g.add_argument("--num-beams", type=positive_int, default=1, help="beam search when > 1")
    g.add_argument("--length-penalty", type=finite_float, default=1.0,
                   help="beam score = log-prob / length ** length_penalty")
    g.add_argument("--stream", action="store_true", help="print text as it is made")
    c = sub.add_parser("chat", help="an interactive chat in the terminal",
                       description="Chat with a model through its tokenizer's chat template, "
                       "replies streamed as they are made.\nReads one message per line from "
                       "stdin; /exit or end of input (Ctrl-D) quits.")
    add_model(c)
    add_sampling(c, max_new_tokens=256)
    c.add_argument("--system", help="a system message that starts the conversation")
    c.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template (or a tokenizer_config.json holding one); "
                        "default: the tokenizer's, else a plain User:/Assistant: transcript")
    cli_serve.add_parser(sub)
    sub.add_parser("presets", help="list the model presets in configs/models",
                   description="List the model presets in configs/models.")
    sub.add_parser("bench", add_help=False,
                   help="generation speed vs the card's ceilings and Hugging Face "
                        "(jaxformer bench --help)")
    _info_parser(sub)
    return ap


def _info_parser(sub) -> None:
    i = sub.add_parser("info", help="the memory plan per device (reads config.json only)",
                       description="Weights, KV cache and prefill activations per device, "
                       "against device memory,\nand the largest batch x length that fits. "
                       "Nothing is loaded: only the checkpoint's\nconfig.json is read.")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="jaxformer checkpoint dir")
    src.add_argument("--preset", help="a model preset (jaxformer presets lists them)")
    add_mesh(i, devices=False)
    i.add_argument("--batch", type=positive_int, help="prompts generated together")
    i.add_argument("--max-length", type=positive_int,
                   help="prompt + new tokens per prompt, at most the model's context")
    i.add_argument("--dtype", default="auto", choices=DTYPES,
                   help=DTYPE_HELP + "; a plan against --device-memory counts bfloat16")
    i.add_argument("--device-memory", type=positive_float, metavar="GiB",
                   help="memory per device (default: what jax reports, or "
                        "$JAXFORMER_DEVICE_MEMORY)")
    i.add_argument("--rules", default="default", help="sharding rules (configs/sharding/)")
    i.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="attention kernels the plan counts")
    i.add_argument("--quantize", type=quantize_arg, help=QUANTIZE_HELP + " (default: as the checkpoint stores "
                   "it)")
    i.add_argument("--kv-cache", choices=["int8", "fp8"], help="a quantized KV cache")
    i.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "unroll"],
                   help="the layer layout decode runs (RunConfig.layer_loop; auto: unroll "
                        "on a GPU host, where decode updates the cache in place)")
    i.add_argument("--prefill-tokens", type=positive_int, default=PREFILL_TOKENS,
                   help="most prompt tokens one prefill pass computes "
                        "(RunConfig.prefill_tokens; with --page-size, one chunked-prefill "
                        "call's tokens)")
    i.add_argument("--page-size", type=positive_int,
                   help="also size a paged KV cache's pool (serving): its pages and tokens")
    i.add_argument("--slots", type=positive_int, default=64,
                   help="with --page-size: the running batch's slots")


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
        if not prompts:
            raise UsageError(f"--prompts-file {args.prompts_file} holds no prompt")
    return prompts or [DEFAULT_PROMPT]


def cmd_generate(args) -> int:
    # everything that needs no model is checked before it loads
    sampling = sampling_from(args)
    prompts = _prompts(args)
    path = check_model_source(args)
    check_length(args, path)
    model = load_model(args, path)
    t0 = time.perf_counter()
    if args.stream:
        result = _stream(model, prompts, sampling, args)
    else:
        result = model.generate(prompts, args.max_new_tokens, sampling, args.seed)
        for i, p in enumerate(prompts):
            body = (result.texts[i] if result.texts is not None
                    else " ".join(map(str, result.tokens[i])))
            print(f"=== prompt {i}: {p!r}\n{body}")
    dt = time.perf_counter() - t0
    n = sum(len(t) for t in result.tokens)
    print(f"# {n} tokens in {dt:.2f}s: {n / dt:.1f} tokens/s (first call includes compilation)")
    return 0


def _stream(model, prompts, sampling, args):
    """One prompt: its text as it is made, under its header. Several: a `[i] text` line per
    row and chunk. Each text once, cut at a stop string as the final text is."""
    import jaxformer as jf
    from jaxformer.cli_chat import TextStream
    tok = model.tokenizer
    streams = [TextStream(tok, sampling.stop_strings) if tok else None for _ in prompts]
    single = len(prompts) == 1
    if single:
        print(f"=== prompt 0: {prompts[0]!r}", flush=True)

    def show(i, text):
        if text:
            print(text if single else f"[{i}] {text}", end="" if single else "\n", flush=True)
    for item in model.generate(prompts, args.max_new_tokens, sampling, args.seed, stream=True):
        if isinstance(item, jf.GenerateOutput):
            for i, s in enumerate(streams):
                if s is not None:
                    show(i, s.finish(item.texts[i]))
            if single:
                print()
            return item
        for i, new in enumerate(item):
            if streams[i] is not None:
                show(i, streams[i].push(new))
            elif new:
                show(i, " ".join(map(str, new)) + " ")


def cmd_chat(args) -> int:
    from jaxformer.cli_chat import chat
    sampling = sampling_from(args)
    if sampling.num_beams > 1:
        raise UsageError("chat streams its replies: beam search does not apply")
    path = check_model_source(args)
    check_length(args, path)
    if args.chat_template and not os.path.isfile(args.chat_template):
        raise UsageError(f"--chat-template {args.chat_template}: no such file")
    model = load_model(args, path)
    return chat(model, sampling, args, path)


def cmd_info(args) -> int:
    """Print the memory plan; exit status 1 when it does not fit device memory."""
    from types import SimpleNamespace

    import jax

    from jaxformer import kv_replicate, memory
    from jaxformer import sharding as shd
    from jaxformer.config import ModelConfig
    quantize = quantize_value(args.quantize)
    if args.checkpoint:
        from jaxformer.checkpoint import read_config, read_quantization
        path = checkpoint_dir(args.checkpoint)
        config = read_config(path)
        stored = read_quantization(path)
        if stored is not None and args.quantize not in (None, stored):
            raise ValueError(f"{args.checkpoint} holds {stored!r}-quantized weights; "
                             f"--quantize {args.quantize} cannot apply to it")
        quantize = stored or quantize
    else:
        config = ModelConfig.from_preset(args.preset)
    limit = config.max_position_embeddings
    if args.max_length is not None and not 2 <= args.max_length <= limit:
        raise UsageError(f"--max-length {args.max_length}: must be in [2, {limit}], the "
                         f"context of {config.name or 'the model'} (max_position_embeddings)")
    sizes = {"data": args.data, "pipe": args.pipe, "tensor": args.tensor}
    # fewer kv heads than tensor: planned as load() runs it, each kv head copied
    mesh_sizes, rules = SimpleNamespace(shape=sizes), shd.load_rules(args.rules)
    config = kv_replicate.replicated_config(config, kv_replicate.factor(config, mesh_sizes,
                                                                        rules))
    shd.check_divisible(config, mesh_sizes, rules)
    # a plan against given device memory is for an accelerator: count what it would load
    target = "gpu" if args.device_memory is not None or os.environ.get(
        memory.ENV_DEVICE_MEMORY) else jax.default_backend()
    dtype = resolve_dtype(args.dtype, target)
    if args.dtype == "auto":
        print(f"# --dtype auto: {dtype} (what generate loads on {target.upper()})")
    dev = None if args.device_memory is None else args.device_memory * memory.GiB
    plan = memory.plan(config, sizes, dtype, batch=args.batch, max_length=args.max_length,
                       rules=args.rules, attention=args.attention, device_memory=dev,
                       quantize=quantize, kv_cache=args.kv_cache,
                       layer_loop=args.layer_loop, prefill_tokens=args.prefill_tokens)
    print(plan.explain())
    if args.page_size:
        print(memory.pool_plan(config, sizes, dtype, page_size=args.page_size,
                               slots=args.slots, prefill_tokens=args.prefill_tokens,
                               rules=args.rules, attention=args.attention, quantize=quantize,
                               kv_cache=args.kv_cache, device_memory=dev).explain())
    return 1 if plan.fits is False else 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info,
            "serve": cli_serve.cmd_serve}


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench(argv: list[str]) -> int:
    """`jaxformer bench`: the harness lives outside the package, in a source checkout's
    benchmarks/ (with `pip install -e .`, the one jaxformer runs from)."""
    if not (BENCHMARKS / "harness.py").exists():
        print(f"jaxformer bench: error: needs the benchmarks/ folder of a source checkout "
              f"(not found at {BENCHMARKS}); install jaxformer with `pip install -e .` from "
              f"the repository", file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("harness").main(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input prints one line `jaxformer ...: error: ...` and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own argument parser (benchmarks/harness.py)
        return _bench(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "presets":
            import jaxformer as jf
            print("\n".join(jf.list_presets()))
            return 0
        return COMMANDS[args.command](args)
    except UsageError as e:
        msg = str(e)
        print(msg if msg.startswith("jaxformer") else f"jaxformer {args.command}: error: {msg}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's status for it
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # incl. CheckpointError, FileNotFoundError
        # one line, except the memory plan an out-of-memory refusal explains itself with
        print(f"jaxformer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
