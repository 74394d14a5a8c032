"""The all-reduce of a tensor-parallel layer on two GPUs: XLA's collective against a
hand-written Mosaic GPU kernel that adds the peer's partial sums read over NVLink, both in
one compiled chain of layers, timed side by side.

    python benchmarks/allreduce.py                    # one process, both GPUs
    python benchmarks/allreduce.py --processes 2      # one process per GPU

Why: at batch 1 a tensor=2 decode step spends about a fifth of each layer in its two
all-reduces ([1, 4096] bf16) and the idle time around them (docs/benchmarks.md, issue 5).
The kernel here is the candidate replacement, an all-reduce fused with the residual add:

    out[R, D] = residual + partial(this device) + partial(peer)     (float32 sum, then bf16)

It writes its partial into the peer's receive buffer (`plgpu.remote_ref`), signals the
peer's semaphore and waits for the peer's signal; an arrival handshake first makes sure
the peer is inside the kernel before its buffer is written. Both devices add the same two
partials in the same order, so they hold bitwise-equal results.

The chain is L layers of a tensor-parallel MLP as the models run it, x [R, D] replicated:
h = gelu(x @ wi) (column-parallel, F/2 columns a device), partial = h @ wo (row-parallel),
x = rms_norm(all_reduce_add(partial, x)). Weights cycle through 4 sets, 1 GiB in all, so
they are read from HBM, not L2. Printed per variant: wall ms per chain (median of 30 calls),
µs per layer, the first GPU's kernel time per layer, its collective kernel's mean time (the
costliest kernel named like one) and its four costliest kernels (jax.profiler), and the
largest difference from the XLA chain's output. Needs two GPUs; on anything else
it says so and exits 2.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

SETS = 4  # weight sets the chain cycles through


def fused_all_reduce_add(partial, residual, axis: str):
    """partial, residual [R, D] bf16 (inside shard_map over a 2-device `axis`) ->
    residual + psum(partial) as one Mosaic GPU kernel."""
    import jax.numpy as jnp
    from jax import lax

    from jaxformer.kernels.flash_attention import _plgpu
    pl, plgpu = _plgpu()

    def body(p_ref, r_ref, out_ref, recv_ref, arrived, received):
        peer = 1 - lax.axis_index(axis)
        pl.semaphore_signal(arrived, device_id=peer)
        pl.semaphore_wait(arrived)
        plgpu.remote_ref(recv_ref, peer)[...] = p_ref[...]
        pl.semaphore_signal(received, device_id=peer)  # orders the write before it
        pl.semaphore_wait(received)
        total = p_ref[...].astype(jnp.float32) + recv_ref[...].astype(jnp.float32)
        out_ref[...] = (total + r_ref[...].astype(jnp.float32)).astype(out_ref.dtype)

    shape = jax.ShapeDtypeStruct(partial.shape, partial.dtype)
    out, _ = plgpu.kernel(body, out_type=(shape, shape),
                          scratch_types=[plgpu.SemaphoreType.REGULAR] * 2)(partial, residual)
    return out


def xla_all_reduce_add(partial, residual, axis: str):
    return jax.lax.psum(partial, axis) + residual


VARIANTS = {"xla": xla_all_reduce_add, "mosaic": fused_all_reduce_add}


def rms_norm(x):
    import jax.numpy as jnp
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True))).astype(x.dtype)


def make_chain(mesh, all_reduce_add, layers: int):
    from jax.sharding import PartitionSpec as P

    def run(x, wi, wo):
        for layer in range(layers):
            h = jax.nn.gelu(x @ wi[layer % SETS])
            partial = (h @ wo[layer % SETS]).astype(x.dtype)
            x = rms_norm(all_reduce_add(partial, x, "t"))
        return x

    return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P(None, None, "t"),
                                                           P(None, "t", None)),
                                 out_specs=P(), check_vma=False))


def inputs(mesh, rows: int, dim: int, hidden: int):
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    def init():
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        wi = jax.random.normal(k1, (SETS, dim, hidden), jnp.float32) * dim ** -0.5
        wo = jax.random.normal(k2, (SETS, hidden, dim), jnp.float32) * hidden ** -0.5
        x = jax.random.normal(k3, (rows, dim), jnp.float32)
        return wi.astype(jnp.bfloat16), wo.astype(jnp.bfloat16), x.astype(jnp.bfloat16)

    # Built on the devices by one program, so it also works with one process per GPU.
    shardings = (NamedSharding(mesh, P(None, None, "t")), NamedSharding(mesh, P(None, "t", None)),
                 NamedSharding(mesh, P()))
    return jax.jit(init, out_shardings=shardings)()


def local_value(a):
    import numpy as np
    return np.asarray(a.addressable_data(0)).astype(np.float32)


def measure(mesh, args, tag: str) -> None:
    import numpy as np

    from harness import gpu_kernel_events
    wi, wo, x = inputs(mesh, args.rows, args.dim, args.hidden)
    print(f"\n{tag}: {args.layers} layers, x [{args.rows}, {args.dim}] bf16, MLP {args.dim} -> "
          f"{args.hidden} -> {args.dim} split over 2 devices\n")
    print("| all-reduce + add | wall ms / chain | wall µs / layer | GPU kernels µs / layer "
          "| collective kernel µs | max abs diff vs xla |\n|---|---|---|---|---|---|")
    ref, notes = None, []
    for name in args.variants:
        chain = make_chain(mesh, VARIANTS[name], args.layers)
        try:
            out = chain(x, wi, wo)
            value = local_value(out)
        except Exception as e:  # noqa: BLE001 - report the failure as the row
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:300]} | | | | |",
                  flush=True)
            continue
        times = []
        for _ in range(30):
            t = time.perf_counter()
            chain(x, wi, wo).block_until_ready()
            times.append(time.perf_counter() - t)
        trace = tempfile.mkdtemp()
        with jax.profiler.trace(trace):
            for _ in range(3):
                chain(x, wi, wo).block_until_ready()
        plane = None if jax.process_count() > 1 else "/device:GPU:0"
        events = gpu_kernel_events(trace, plane)
        per_name = collections.defaultdict(list)
        for _, dur, kname in events:
            per_name[kname].append(dur / 1e3)
        # the collective: the costliest kernel named like one (NCCL's, XLA's, the Mosaic one)
        collective = max((v for k, v in per_name.items()
                          if any(s in k.lower() for s in ("all_reduce", "allreduce",
                                                          "all-reduce", "nccl", "mosaic"))),
                         key=sum, default=[])
        kernels = sum(d for v in per_name.values() for d in v) / 3 / args.layers
        ref = value if ref is None else ref
        wall = float(np.median(times))
        coll = f"{np.mean(collective):.2f}" if collective else "none"
        print(f"| {name} | {wall * 1e3:.3f} | {wall * 1e6 / args.layers:.1f} | {kernels:.1f} | "
              f"{coll} | {np.abs(value - ref).max():.3g} (max abs x {np.abs(ref).max():.3g}) |",
              flush=True)
        costly = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:4]
        notes.append(f"{name}: " + "; ".join(
            f"{k[:48]} {len(v) / 3:.0f}x {np.mean(v):.2f} µs" for k, v in costly))
    print("\ncostliest kernels per chain (name, launches, mean):\n" + "\n".join(notes))


def single_call_check(mesh) -> None:
    """One kernel call against numpy: each device's sum of both partials plus its residual."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    p = jax.device_put(jax.random.normal(jax.random.key(1), (2, 4096), jnp.bfloat16),
                       NamedSharding(mesh, P("t")))
    r = jax.device_put(jax.random.normal(jax.random.key(2), (2, 4096), jnp.bfloat16),
                       NamedSharding(mesh, P("t")))
    f = jax.jit(jax.shard_map(lambda a, b: fused_all_reduce_add(a, b, "t"), mesh=mesh,
                              in_specs=(P("t"), P("t")), out_specs=P("t"), check_vma=False))
    got = np.asarray(f(p, r)).astype(np.float32)
    pn, rn = np.asarray(p).astype(np.float32), np.asarray(r).astype(np.float32)
    want = pn.sum(0, keepdims=True) + rn
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"single call against numpy: max relative error {err:.2e} (bf16 rounding: 3.9e-3)")
    if err > 4e-3:
        raise SystemExit("the Mosaic GPU all-reduce disagrees with numpy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=1, choices=(1, 2),
                    help="1: one process drives both GPUs; 2: one process per GPU")
    ap.add_argument("--rows", type=int, default=1, help="rows of x (batch x new tokens)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variants", default="xla,mosaic")
    ap.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        ap.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    if args.processes == 2 and args.process_id is None:
        children = [subprocess.Popen([sys.executable, "-u", __file__, *(argv or sys.argv[1:]),
                                      "--process-id", str(i)]) for i in range(2)]
        try:
            codes = [c.wait(timeout=600) for c in children]
        except subprocess.TimeoutExpired:
            for c in children:
                c.kill()
            print("timed out after 600 s")
            return 1
        return max(codes)
    if args.process_id is not None:
        jax.distributed.initialize("127.0.0.1:23491", 2, args.process_id,
                                   local_device_ids=[args.process_id])
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2:
        print(f"needs two GPUs, found {len(gpus)} ({jax.devices()[0].device_kind})")
        return 2
    mesh = jax.make_mesh((2,), ("t",), devices=gpus[:2],
                         axis_types=(jax.sharding.AxisType.Explicit,))
    where = (f"process {args.process_id} of 2" if args.process_id is not None
             else "one process")
    tag = f"2 x {gpus[0].device_kind}, {where}, jax {jax.__version__}"
    if args.process_id is None:
        single_call_check(mesh)
    measure(mesh, args, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
