"""What the `jaxformer` subcommands share: a parser whose errors are one line, value types
that name the flag at fault, the mesh / model / sampling flags, and loading the model they
describe (jaxformer/cli.py builds the commands from these)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

DTYPES = ["auto", "float32", "bfloat16", "float16"]
ATTENTION = ["auto", "xla", "cudnn", "pallas"]
DTYPE_HELP = ("weights and activations; auto: bfloat16 on GPUs and TPUs, float32 on CPU "
              "(where XLA computes bfloat16 slowly)")
QUANTIZE_HELP = ("quantize the linear layers: int8 | int4 | int4-g<N> | fp8 | fp8-tensor | none "
                 "(docs/quantization.md)")


class UsageError(Exception):
    """Bad command-line input; main() prints the message as one line and exits 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, every option's default after its help (an unset default,
    None or False, is said by the help text itself)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...`), raised as
    UsageError instead of printing the usage block and exiting."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# ---- value types: argparse reports "argument --flag: <message>" -------------------------------
def _number(kind, s: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _checked(kind, ok, expected: str, name: str):
    """An argparse type: a finite kind(s) that ok() accepts, else "<expected>, got '<s>'"."""
    def parse(s: str):
        v = _number(kind, s)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{expected}, got {s!r}")
        return v
    parse.__name__ = parse.__qualname__ = name
    return parse


positive_int = _checked(int, lambda v: v >= 1, "must be a positive integer", "positive_int")
nonnegative_int = _checked(int, lambda v: v >= 0, "must be an integer >= 0", "nonnegative_int")
finite_float = _checked(float, lambda v: True, "", "finite_float")
nonnegative_float = _checked(float, lambda v: v >= 0, "must be >= 0", "nonnegative_float")
positive_float = _checked(float, lambda v: v > 0, "must be > 0", "positive_float")
fraction = _checked(float, lambda v: 0 < v <= 1, "must be in (0, 1]", "fraction")

# jax takes 75% of each GPU unless told otherwise; a server's page pool is the rest after the
# weights, so it asks for more (vLLM's default gpu_memory_utilization is 0.9)
SERVE_GPU_MEMORY = 0.9
MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def set_gpu_memory(value: float | None, default: float = SERVE_GPU_MEMORY) -> None:
    """jax's share of each GPU (XLA_PYTHON_CLIENT_MEM_FRACTION), which it reads when the
    backend starts, so this runs before anything touches a device: `value` (a flag) wins,
    then the variable where already set, then `default`."""
    if value is not None:
        os.environ[MEM_FRACTION] = str(value)
    else:
        os.environ.setdefault(MEM_FRACTION, str(default))


def device_list(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected device indices like 0,1,2,3, got {s!r}") \
            from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"expected distinct device indices >= 0, got {s!r}")
    return ids


def quantize_arg(s: str) -> str:
    """--quantize, checked when parsed (none is kept: no quantization)."""
    from jaxformer.quant.spec import name
    if s != "none":
        try:
            name(s, "--quantize")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("--quantize: ")) from None
    return s


def quantize_value(value):
    return None if value in (None, "none") else value


# ---- flag groups ----------------------------------------------------------------------------
def add_mesh(p: argparse.ArgumentParser, devices: bool = True) -> None:
    p.add_argument("--data", type=positive_int, default=1, help="data-parallel size")
    p.add_argument("--pipe", type=positive_int, default=1, help="pipeline stages")
    p.add_argument("--tensor", type=positive_int, default=1, help="tensor-parallel size")
    if devices:
        p.add_argument("--devices", type=device_list, metavar="I,J,...",
                       help="the devices the mesh uses, by index in jax.devices() (their "
                            "number = data x pipe x tensor); default: the first ones "
                            "(CUDA_VISIBLE_DEVICES narrows what jax sees)")


def add_distributed(p: argparse.ArgumentParser) -> None:
    """The flags of a run over several processes (jaxformer.distributed.initialize)."""
    g = p.add_argument_group("several processes (docs/multihost.md); every process gets the "
                             "same flags but --process-id")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address, where the processes meet (default: "
                        "$JAXFORMER_COORDINATOR; without either: one process)")
    g.add_argument("--num-processes", type=positive_int,
                   help="how many processes (default: $JAXFORMER_NUM_PROCESSES)")
    g.add_argument("--process-id", type=nonnegative_int,
                   help="this process's index, 0 .. num-processes - 1 (default: "
                        "$JAXFORMER_PROCESS_ID)")


def init_distributed(args) -> None:
    """Join the other processes when the flags or JAXFORMER_* variables name a run over
    several (before anything touches a device); a UsageError when that cannot be done."""
    from jaxformer import distributed
    named = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
             "JAX_COORDINATOR_ADDRESS")
    if not (args.coordinator or args.num_processes or args.process_id is not None
            or any(os.environ.get(v) for v in named)):
        return  # one process (a cluster's own variables alone do not start several)
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedError as e:
        raise UsageError(f"jaxformer {args.command}: error: {e} (--coordinator HOST:PORT "
                         f"--num-processes N --process-id I)") from None


def add_model(p: argparse.ArgumentParser) -> None:
    """--model / --checkpoint and the flags that say how to load it."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="NAME",
                     help="a model by name (e.g. smollm2-135m-instruct) or Hugging Face id "
                          "(org/name), resolved by jaxformer.hub; default: the demo model")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a jaxformer checkpoint directory (python -m conversion.hf writes "
                          "one); default: the built-in demo model (untrained)")
    add_mesh(p)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    p.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="attention kernels (auto: Pallas on Hopper GPUs, else xla)")
    p.add_argument("--quantize", type=quantize_arg,
                   help=QUANTIZE_HELP + "; a quantized checkpoint loads as stored without it")
    p.add_argument("--kv-cache", choices=["int8", "fp8"],
                   help="quantize the KV cache (about half the bytes of bf16)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache ($JAXFORMER_CACHE_DIR, "
                        "default ~/.cache/jaxformer/jax)")


def add_sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The jf.Sampling flags, with jf.Sampling's defaults (temperature 1: sampling)."""
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help="new tokens per prompt at most")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0,
                   help="0 = greedy (as jf.Sampling: 1 samples from the model's distribution)")
    p.add_argument("--greedy", action="store_true", help="the same as --temperature 0")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus mass, in (0, 1]")
    p.add_argument("--min-p", type=finite_float, default=0.0, help="in [0, 1]")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1 = off")
    p.add_argument("--presence-penalty", type=finite_float, default=0.0, help="0 = off")
    p.add_argument("--frequency-penalty", type=finite_float, default=0.0, help="0 = off")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed")


def sampling_from(args):
    import jaxformer as jf
    return jf.Sampling(
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        num_beams=getattr(args, "num_beams", 1),
        length_penalty=getattr(args, "length_penalty", 1.0), stop_strings=tuple(args.stop))


# ---- checks that need no model ----------------------------------------------------------------
def checkpoint_dir(path: str, flag: str = "--checkpoint") -> Path:
    """`path` as a jaxformer checkpoint directory, or a UsageError saying what it is instead."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such directory")
    if not p.is_dir():
        raise UsageError(f"{flag} {path} is a file; it takes a jaxformer checkpoint directory")
    cfg = p / "config.json"
    if cfg.is_file() and not (p / "params").is_dir():
        try:
            d = json.loads(cfg.read_text())
        except ValueError as e:
            raise UsageError(f"{cfg} is not valid JSON: {e}") from None
        if isinstance(d, dict) and ("model_type" in d or "architectures" in d):
            raise UsageError(
                f"{flag} {path} is a Hugging Face model directory, not a jaxformer checkpoint: "
                f"convert it once with `python -m conversion.hf --input {path} --output "
                f"ckpt/{p.resolve().name}` and pass --checkpoint ckpt/{p.resolve().name}")
    return p


def read_prompts_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts-file {path}: {getattr(e, 'strerror', None) or e}") \
            from None


def resolve_dtype(value: str, platform: str) -> str:
    """--dtype auto: bfloat16 on accelerators, float32 on CPU."""
    if value != "auto":
        return value
    return "float32" if platform == "cpu" else "bfloat16"


def build_mesh(args):
    """The mesh of --data/--pipe/--tensor over --devices (default: the first devices)."""
    import jax

    import jaxformer as jf
    n = args.data * args.pipe * args.tensor
    if args.devices is None:
        if n > jax.device_count():
            raise UsageError(f"--data {args.data} x --pipe {args.pipe} x --tensor "
                             f"{args.tensor} = {n} devices, but {jax.device_count()} are "
                             f"available")
        return jf.make_mesh(args.data, args.pipe, args.tensor)
    all_devices = jax.devices()
    if len(args.devices) != n:
        raise UsageError(f"--devices names {len(args.devices)} devices, but --data {args.data} "
                         f"x --pipe {args.pipe} x --tensor {args.tensor} = {n}")
    missing = [i for i in args.devices if i >= len(all_devices)]
    if missing:
        raise UsageError(f"--devices {','.join(map(str, args.devices))}: no device "
                         f"{missing[0]} ({len(all_devices)} devices: 0..{len(all_devices) - 1})")
    return jf.make_mesh(args.data, args.pipe, args.tensor,
                        devices=[all_devices[i] for i in args.devices])


def check_model_source(args) -> Path | None:
    """The checkpoint directory --model or --checkpoint names (None: the demo model), checked
    before anything loads."""
    if getattr(args, "model", None):
        from jaxformer import hub
        return checkpoint_dir(str(hub.resolve(args.model)), "--model")
    if args.checkpoint:
        return checkpoint_dir(args.checkpoint)
    return None


def check_length(args, path: Path | None) -> None:
    """--max-new-tokens must leave room for a prompt in the model's context (the exact check,
    with the prompt's length, is generate's)."""
    from jaxformer.checkpoint import read_config
    from jaxformer.config import ModelConfig
    config = read_config(path) if path is not None else ModelConfig.from_preset("demo")
    limit = config.max_position_embeddings
    if args.max_new_tokens >= limit:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                         f"in the context of {config.name or path} ({limit} positions)")


def load_model(args, path: Path | None):
    """The model the flags describe, on the mesh they describe; notes go to stderr."""
    import jaxformer as jf
    if not args.no_compile_cache:  # a second run loads its programs instead of compiling
        jf.enable_compilation_cache()
    mesh = build_mesh(args)
    dtype = resolve_dtype(args.dtype, mesh.devices.flat[0].platform)
    quantize = quantize_value(args.quantize)
    t0 = time.perf_counter()
    if path is not None:
        model = jf.load(path, mesh=mesh, dtype=dtype, attention=args.attention,
                        quantize=quantize, kv_cache=args.kv_cache)
    else:
        print("# no --model or --checkpoint: using the built-in demo model (UNTRAINED random "
              "weights; its text is noise)", file=sys.stderr)
        model = jf.demo_model(mesh=mesh, dtype=dtype, quantize=quantize,
                              kv_cache=args.kv_cache, attention=args.attention)
    quant = f", {model.run.quantize}" if model.run.quantize else ""
    shape = "x".join(str(v) for v in mesh.shape.values())
    print(f"# loaded {model.config.name or path} ({model.run.dtype}{quant}, mesh {shape}) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return model
