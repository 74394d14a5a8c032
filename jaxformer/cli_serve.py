"""`jaxformer serve`: the OpenAI-compatible and Triton (KServe v2) HTTP server.

    jaxformer serve --checkpoint DIR [--tensor 2] [--port 8000]
    jaxformer serve --model chat=smollm2-135m-instruct --mesh chat=1x1x2@0,1 \\
                    --model demo=demo --mesh demo=1x1x1@2

--model NAME=SOURCE is repeatable (SOURCE: a checkpoint directory, a name jf.load resolves, or
"demo"); --mesh NAME=DATAxPIPExTENSOR[@I,J,...] gives that model its own mesh and devices
(default: --data/--pipe/--tensor over the next free devices).

Over several processes (hosts), one model on a mesh spanning them: start every process with
the same flags plus --coordinator HOST:PORT --num-processes N --process-id I (or the
JAXFORMER_* variables). Process 0 serves HTTP on --host/--port and schedules; the others
open no port and follow its plan, and exit when process 0 stops (docs/serving.md). With
--data N the data replicas sit behind process 0's front, each on the processes holding its
devices. A process that dies makes the others exit with status 1 and the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from jaxformer.cli_args import (ATTENTION, DTYPE_HELP, DTYPES, QUANTIZE_HELP, UsageError,
                                add_distributed, add_mesh, checkpoint_dir, device_list,
                                SERVE_GPU_MEMORY, fraction, init_distributed, positive_float,
                                positive_int, quantize_arg, quantize_value, set_gpu_memory)

_MESH = re.compile(r"^(\d+)x(\d+)x(\d+)(?:@([\d,]+))?$")


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible and Triton HTTP server",
                       description=__doc__)
    s.add_argument("--checkpoint", metavar="DIR", help="serve one checkpoint (its name: the "
                   "directory's, or --served-name)")
    s.add_argument("--served-name", help="the model name requests use with --checkpoint")
    s.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                   help="a model to serve (repeatable); SOURCE: checkpoint dir, known name, "
                        "or demo")
    s.add_argument("--mesh", action="append", default=[], metavar="NAME=DxPxT[@I,J,...]",
                   help="one model's mesh sizes and device indices")
    add_mesh(s)
    s.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    s.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="attention kernels (auto: Pallas on Hopper GPUs, else xla)")
    s.add_argument("--quantize", type=quantize_arg, help=QUANTIZE_HELP)
    s.add_argument("--kv-cache", choices=["int8", "fp8"], help="quantize the KV cache")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    s.add_argument("--api-key", help="requests must send Authorization: Bearer KEY")
    s.add_argument("--max-body-bytes", type=positive_int, default=4 * 2 ** 20,
                   help="larger request bodies get 413")
    s.add_argument("--drain-timeout", type=positive_float, default=30.0,
                   help="seconds SIGTERM lets running requests finish")
    g = s.add_argument_group("scheduler (per model)")
    g.add_argument("--slots", type=positive_int, default=16, help="rows of the running batch")
    g.add_argument("--max-length", type=positive_int, default=1024,
                   help="prompt + generated tokens per request")
    g.add_argument("--steps-per-tick", type=positive_int, default=4,
                   help="decode steps between admissions")
    g.add_argument("--max-queue", type=positive_int, default=1024,
                   help="waiting requests beyond which the server answers 429")
    g.add_argument("--page-size", type=positive_int, default=16, help="tokens per KV page")
    g.add_argument("--num-pages", type=positive_int, default=None,
                   help="KV pages in the pool (default: what the memory plan leaves on the "
                        "model's devices; where device memory is unknown, e.g. on CPU, "
                        "slots x max-length / page-size + 1)")
    g.add_argument("--gpu-memory", type=fraction, default=None, metavar="FRACTION",
                   help=f"share of each GPU jax takes, the page pool sized from it (default: "
                        f"$XLA_PYTHON_CLIENT_MEM_FRACTION where set, else {SERVE_GPU_MEMORY})")
    g.add_argument("--prefill-tokens", type=positive_int, default=512,
                   help="prompt tokens one tick prefills at most (chunked prefill)")
    over = g.add_mutually_exclusive_group()
    over.add_argument("--overlap", action="store_true", default=None,
                      help="read each plain device call's tokens while the next one runs "
                           "(the host's work per tick hidden behind the device's; "
                           "PagedConfig.overlap: by default where plain windows run, GPUs)")
    over.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                      help="read every call's tokens before the next tick")
    g.add_argument("--no-plain-windows", action="store_true",
                   help="run every decode window in the general program (PagedConfig."
                        "plain_windows: by default, on GPUs, greedy batches run a "
                        "fixed-length window with no host syncs, compiled at warm-up beside "
                        "it)")
    g.add_argument("--compile-workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="threads that compile the warm-up shapes before serving (XLA "
                        "compiles without the GIL, so the programs compile side by side; "
                        "default: the CPUs, at most 8)")
    s.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache")
    add_distributed(s)


def sources(args) -> list:
    """The ModelSources the flags name, checked before anything loads."""
    from jaxformer.serving.server import ModelSource
    out = []
    if args.checkpoint:
        if args.model:
            raise UsageError("give --checkpoint or --model NAME=SOURCE, not both")
        path = checkpoint_dir(args.checkpoint)
        out.append(ModelSource(args.served_name or path.resolve().name, str(path)))
    for m in args.model:
        name, eq, src = m.partition("=")
        if not eq:
            name, src = m.rsplit("/", 1)[-1], m
        if not name or not src:
            raise UsageError(f"--model {m}: expected NAME=SOURCE")
        if src != "demo" and Path(src).expanduser().exists():
            src = str(checkpoint_dir(src, "--model"))
        out.append(ModelSource(name, src))
    if not out:
        out.append(ModelSource(args.served_name or "demo", "demo"))
    names = [s.name for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UsageError(f"--model: the name {dup} is used twice")
    meshes = {}
    for spec in args.mesh:
        name, _, value = spec.partition("=")
        m = _MESH.match(value)
        if name not in names or not m:
            raise UsageError(f"--mesh {spec}: expected NAME=DATAxPIPExTENSOR[@I,J,...] with "
                             f"NAME one of {', '.join(names)}")
        meshes[name] = m
    for s in out:
        if s.name in meshes:
            m = meshes[s.name]
            s.data, s.pipe, s.tensor = (int(v) for v in m.groups()[:3])
            try:
                s.devices = device_list(m.group(4)) if m.group(4) else None
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--mesh {s.name}=...: {e}") from None
        else:
            s.data, s.pipe, s.tensor = args.data, args.pipe, args.tensor
            s.devices = args.devices if len(out) == 1 else None
    return out


def cmd_serve(args) -> int:
    import jaxformer as jf
    from jaxformer.serving.paged_scheduler import PagedConfig
    from jaxformer.serving.multihost import ProcessLost
    from jaxformer.serving.scheduler import SchedulerConfig
    from jaxformer.serving.server import build_specs, serve
    srcs = sources(args)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: must be in [0, 65535]")
    pages = args.num_pages or args.slots * -(-args.max_length // args.page_size) + 1
    try:
        sched = SchedulerConfig(slots=args.slots, max_length=args.max_length,
                                steps_per_tick=args.steps_per_tick, max_queue=args.max_queue)
        paged = PagedConfig(page_size=args.page_size, num_pages=pages,
                            prefill_tokens=args.prefill_tokens, overlap=args.overlap,
                            plain_windows=False if args.no_plain_windows else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    set_gpu_memory(args.gpu_memory)  # both before anything touches a device
    init_distributed(args)
    if not args.no_compile_cache:
        jf.enable_compilation_cache()
    try:
        specs = build_specs(srcs, sched, paged, dtype=args.dtype, attention=args.attention,
                            quantize=quantize_value(args.quantize), kv_cache=args.kv_cache)
        specs = [dataclasses.replace(s, size_pool=args.num_pages is None,
                                     compile_workers=args.compile_workers) for s in specs]
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        serve(specs, args.host, args.port, api_key=args.api_key,
              max_body=args.max_body_bytes, drain_timeout=args.drain_timeout,
              log_level="info" if args.verbose else "warning")
    except ProcessLost as e:  # jax's exit barrier would wait for the lost process: exit now
        print(f"jaxformer serve: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 0
