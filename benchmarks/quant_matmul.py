"""bf16 vs INT8 / FP8 matmul formulations through XLA on this GPU: the measurements behind
jaxformer.quant.ops' stored layout and paths (docs/quantization.md, docs/benchmarks.md).

    python benchmarks/quant_matmul.py

Each line is the time of one [M, K] x [K, N] product (K = 4096, N = 16384), averaged over
eight distinct weights per call so nothing stays in L2, with the bytes or FLOP rate it
implies. Decode-like rows (M = 1, 16, 64) compare bf16 with int8 codes in the float layout
[K, N] and K-minor [N, K]; prefill-like rows (M = 2048) compare bf16 with FP8 GEMMs.

The last section (Hopper only; elsewhere it prints why it is skipped) puts the Pallas
weight-only kernel (jaxformer.kernels.quant_matmul) beside the XLA path jaxformer.quant.ops
uses without it, at M = 1, 4, 16 on the decode shapes, with each shape's int8 copy rate
(read + write) as the bandwidth to compare with:

    python benchmarks/quant_matmul.py --kernel-only            # just that section
    python benchmarks/quant_matmul.py --kernel-only --sweep    # + block/stage/split configs

--variants runs, instead, other XLA formulations at the model's shapes: the batch-1 int8 and
int4 products of gpt3-6.7b's four matrices (codes as jaxformer.quant stores them, int4 also
in the float layout it used before), and its FP8 prefill GEMMs of 1920 rows with the scale
and a bias + GeLU consumer after them, the product written in float32 or in bf16:

    python benchmarks/quant_matmul.py --variants

--batch1 times, by device time (the profiler's CUPTI kernel times, each product isolated by
an optimization barrier), the batch-1 products of gpt3-6.7b's and gpt3-13b's four matrices:
bf16 as the model runs them, the int8 row reduction, the int8 GEMM of one row and of two
(the second zero), what jaxformer.quant.ops.einsum picks and, on Hopper, the Pallas kernel
(with the kernels that pad x and merge its split partials). The wall-clock lines above
include launch gaps and the sum of the eight products, which at these sizes hide the
differences:

    python benchmarks/quant_matmul.py --batch1
"""
import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32, BF16, F8 = jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn
R = 8  # distinct weights per timed call
K, N = 4096, 16384


def bench(name, mm, x, weights, *rest, nbytes=None, flops=None, ref_rate=None):
    """Time sum(mm(x, w) for w in weights) and print one line per product; with ref_rate
    (bytes/s), also the share of it that nbytes / time reaches. Returns the time (s)."""
    f = jax.jit(lambda x, ws, *rest: sum(mm(x, w, *rest) for w in ws))
    try:
        f(x, weights, *rest).block_until_ready()
    except Exception as e:  # noqa: BLE001 - a formulation this backend cannot compile
        print(f"{name:<34} FAILED {type(e).__name__}: {str(e)[:150]}")
        return None
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x, weights, *rest).block_until_ready()
        ts.append(time.perf_counter() - t)
    t = float(np.median(ts)) / R
    rate = (f"  {nbytes / t / 1e9:7.0f} GB/s" if nbytes else "") + \
        (f"  {flops / t / 1e12:6.0f} TFLOP/s" if flops else "") + \
        (f"  {100 * nbytes / t / ref_rate:4.0f}% of copy" if ref_rate and nbytes else "")
    print(f"{name:<34} {t * 1e6:9.1f} us/matmul{rate}", flush=True)
    return t


# the formulations: x [M, K]; w [K, N] (float layout) or [N, K] (K-minor); s [N] scales
def bf16_mm(x, w):
    return jnp.einsum("mk,kn->mn", x, w)


def int8_astype(x, q, s):
    return (jnp.einsum("mk,kn->mn", x, q.astype(BF16), preferred_element_type=F32) * s
            ).astype(BF16)


def int8_mixed_dot(x, q, s):
    y = lax.dot_general(x, q, (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return (y * s).astype(BF16)


def int8_kminor_astype(x, q, s):
    return (jnp.einsum("mk,nk->mn", x, q.astype(BF16), preferred_element_type=F32) * s
            ).astype(BF16)


def int8_reduce(x, q, s):
    return ((x.astype(F32)[:, :, None] * q.astype(F32)[None]).sum(1) * s).astype(BF16)


def int8_kminor_packed(x, q, s):
    """The codes read as int32 words of four (a free bitcast) and unpacked with shifts in
    the reduction fusion: slower in the model than the batch-1 path (docs/benchmarks.md),
    so not used; kept to compare."""
    k4 = q.shape[-1] // 4
    words = lax.bitcast_convert_type(q.reshape(q.shape[:-1] + (k4, 4)), jnp.int32)
    xs = x[0].astype(F32).reshape(k4, 4)
    acc = sum(lax.shift_right_arithmetic(lax.shift_left(words, 24 - 8 * i), 24).astype(F32)
              * xs[:, i] for i in range(4))
    return (acc.sum(-1)[None] * s).astype(BF16)


def int8_kminor_reduce(x, q, s):
    return ((x.astype(F32)[:, None, :] * q.astype(F32)[None]).sum(2) * s).astype(BF16)


def fp8_f32_out(x, w):
    return jnp.einsum("mk,kn->mn", x.astype(F8), w, preferred_element_type=F32).astype(BF16)


def fp8_bf16_out(x, w):
    return jnp.einsum("mk,kn->mn", x.astype(F8), w, preferred_element_type=BF16)


def fp8_kminor(x, w):
    return jnp.einsum("mk,nk->mn", x.astype(F8), w, preferred_element_type=BF16)


def fp8_dequant_pattern(x, w):
    return jnp.einsum("mk,kn->mn", x.astype(F8).astype(BF16), w.astype(BF16))


def copy_rate(weights):
    """Bytes/s of an elementwise int8 copy (read + write) of the weights, the bound to beat."""
    f = jax.jit(lambda ws: [w + jnp.int8(1) for w in ws])
    jax.block_until_ready(f(weights))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(weights))
        ts.append(time.perf_counter() - t)
    return 2 * sum(w.size for w in weights) / float(np.median(ts))


KERNEL_SHAPES = [(4096, 4096), (4096, 12288), (4096, 16384), (16384, 4096)]  # (K, N), 6.7B
SHAPES_13B = [(5120, 5120), (5120, 15360), (5120, 20480), (20480, 5120)]  # gpt3-13b


# ---- --batch1: device time per product, each call isolated -------------------------------
def device_times(f, *args, reps=5):
    """{kernel name: (total ns, launches)} over `reps` calls of f, from the profiler's GPU
    planes (CUPTI): kernel time alone, no launch or Python overhead."""
    import collections
    import tempfile
    from harness import gpu_kernel_events
    jax.block_until_ready(f(*args))
    trace = tempfile.mkdtemp()
    with jax.profiler.trace(trace):
        for _ in range(reps):
            jax.block_until_ready(f(*args))
    total, count = collections.Counter(), collections.Counter()
    for _, ns, name in gpu_kernel_events(trace):
        total[name] += ns
        count[name] += 1
    return {n: (total[n], count[n]) for n in total}


def isolated(mm, x, weights, *rest):
    """[mm(x, w) for w in weights] with an optimization barrier after each, so XLA cannot
    fuse the products into one multi-output kernel (the model's products are separate)."""
    outs = []
    for w in weights:
        y = mm(x, w, *rest)
        outs.append(y)
        x, y = lax.optimization_barrier((x, y))
    return outs


def batch1_line(name, mm, x, weights, *rest, nbytes, reps=5):
    times = device_times(jax.jit(functools.partial(isolated, mm)), x, weights, *rest,
                         reps=reps)
    if not times:
        print(f"{name:<30} no GPU kernel times (this backend: {jax.default_backend()})")
        return
    calls = reps * len(weights)
    per = sum(t for t, _ in times.values()) / calls
    top = sorted(times.items(), key=lambda kv: -kv[1][0])[:3]
    kernels = ", ".join(f"{n[:28]} {t / c / 1e3:.1f}" for n, (t, c) in top)
    print(f"{name:<30} {per / 1e3:7.1f} us {nbytes / per:6.0f} GB/s | {kernels}", flush=True)


def batch1_section():
    """Batch-1 products of gpt3-6.7b's and gpt3-13b's matrices: bf16 (as the model runs
    them) and the int8 formulations quant.ops chooses between, by device time."""
    from jaxformer.kernels import attention, quant_matmul as qm
    from jaxformer.quant import ops, spec
    int8 = spec.parse("int8")
    hopper = attention.is_hopper(jax.devices()[0])
    key = jax.random.key(3)
    print("device time per product (CUPTI, mean of 5 x 4 isolated calls); after | the "
          "longest kernels, us each")
    for k_dim, n_dim in KERNEL_SHAPES + SHAPES_13B:
        wq, s = int8_codes(key, k_dim, n_dim, count=4)
        nbytes = k_dim * n_dim
        x = jax.random.normal(key, (1, k_dim), BF16)
        print(f"## K={k_dim}, N={n_dim}: {nbytes / 1e6:.1f} MB of int8 codes")
        wb = [jax.random.normal(jax.random.fold_in(key, i), (k_dim, n_dim), BF16)
              for i in range(2)]
        batch1_line("bf16 (the model's einsum)", bf16_mm, x, wb, nbytes=2 * nbytes)
        del wb
        batch1_line("int8 row reduction", int8_kminor_reduce, x, wq, s, nbytes=nbytes)
        batch1_line("int8 one-row GEMM", int8_kminor_astype, x, wq, s, nbytes=nbytes)
        batch1_line("int8 two-row GEMM", int8_dot_two_rows, x, wq, s, nbytes=nbytes)
        batch1_line("int8 quant.ops.einsum", lambda x, q, s: ops.einsum(
            "mk,kn->mn", x, q, s, int8, 1), x, wq, s, nbytes=nbytes)
        if hopper:  # the opt-in Pallas kernel with its pad and merge kernels
            batch1_line("int8 Pallas kernel", qm.int8_matmul, x, wq, s, nbytes=nbytes)
        del wq


# ---- --variants: batch-1 formulations at the model's shapes ----------------------------------
def int8_two_stage(x, q, s, chunk=512):
    """Row reduction split in two: [N, K/c, c] summed over c, then over K/c."""
    n, k = q.shape
    part = (q.reshape(n, k // chunk, chunk).astype(F32)
            * x[0].astype(F32).reshape(k // chunk, chunk)).sum(-1)
    return (part.sum(-1)[None] * s).astype(BF16)


def int8_bf16_product(x, q, s):
    """Products rounded to bf16, summed in float32: half the register width of the float32
    product (not exact: a benchmark formulation)."""
    return (jnp.sum(q.astype(BF16) * x[0], axis=-1, dtype=F32)[None] * s).astype(BF16)


def int8_dot_two_rows(x, q, s):
    """The bf16 path's two-row padding: a GEMM of 2 rows, the convert fused into it."""
    x2 = jnp.concatenate([x, jnp.zeros_like(x)])
    return int8_kminor_astype(x2, q, s)[:1]


def int4_ops_path(x, q, s):
    """jaxformer.quant.ops' int4 product over its stored (K-minor) codes and scales."""
    from jaxformer.quant import ops, spec
    return ops.einsum("mk,kn->mn", x, q, s, spec.parse("int4"), 1)


def int4_dequant_einsum(x, q, s, group=128):
    """The float layout [K, N] dequantized into bf16 (group scales s [K/g, N]), then einsum:
    ops' int4 path before the codes were stored K-minor."""
    k, n = q.shape
    w = (q.reshape(k // group, group, n).astype(F32) * s[:, None]).reshape(k, n)
    return bf16_mm(x, w.astype(BF16))


def int4_column_reduce(x, q, s, group=128):
    """y[n] = sum_g s[g, n] * sum_(k in g) x[k] q[k, n]: a column reduction over the codes in
    their float layout [K, N], the group scale applied once per group."""
    k, n = q.shape
    part = (x[0].astype(F32).reshape(k // group, group, 1)
            * q.reshape(k // group, group, n).astype(F32)).sum(1)   # [K/g, N]
    return ((part * s).sum(0)[None]).astype(BF16)


def int4_kminor_reduce(x, q_t, s_t, group=128):
    """The codes K-minor [N, K] (scales [N, K/g]): per group a row reduction of 128 codes,
    then the group scales: y[n] = sum_g s_t[n, g] * sum_(k in g) x[k] q_t[n, k]."""
    n, k = q_t.shape
    part = (q_t.reshape(n, k // group, group).astype(F32)
            * x[0].astype(F32).reshape(k // group, group)).sum(-1)   # [N, K/g]
    return ((part * s_t).sum(-1)[None]).astype(BF16)


def fp8_prefill(out_dtype):
    """fp8 x fp8 K-minor GEMM, product in out_dtype, then * scale, + bias, GeLU (the MLP's
    first matrix as jaxformer runs it)."""
    def mm(x, w, s, b):
        y = jnp.einsum("mk,nk->mn", x.astype(F8), w, preferred_element_type=out_dtype)
        return jax.nn.gelu((y.astype(F32) * s).astype(BF16) + b)
    return mm


def int8_codes(key, k_dim, n_dim, count=R):
    """`count` distinct random K-minor int8 code matrices [N, K] and one scale vector [N]."""
    wq = [jax.random.randint(jax.random.fold_in(key, i), (n_dim, k_dim), -127, 128, jnp.int8)
          for i in range(count)]
    return wq, jnp.full((n_dim,), 1 / 40, F32)


def variants_section():
    from jaxformer.quant import ops, spec
    key = jax.random.key(2)
    for k_dim, n_dim in KERNEL_SHAPES:
        wq, s = int8_codes(key, k_dim, n_dim)
        ref = copy_rate(wq)
        x = jax.random.normal(key, (1, k_dim), BF16)
        print(f"## batch 1, int8 K={k_dim}, N={n_dim}: copy {ref / 1e9:.0f} GB/s")
        for f in (int8_kminor_reduce, int8_two_stage, int8_bf16_product, int8_kminor_astype,
                  int8_dot_two_rows):
            bench(f.__name__, f, x, wq, s, nbytes=k_dim * n_dim, ref_rate=ref)
        del wq
        i4 = spec.parse("int4")
        w4 = [ops.quantize_kernel(jax.random.normal(jax.random.fold_in(key, i), (k_dim, n_dim),
                                                    BF16), i4, 0, 1) for i in range(R)]
        q4, s4 = [w[0] for w in w4], w4[0][1]  # as stored: K-minor [N, K], scales [N, K/g]
        q4_float = [ops.from_stored(q, i4, 0, 1) for q in q4]  # [K, N], scales [K/g, N]
        s4_float = ops.from_stored(s4, i4, 0, 1)
        print(f"## batch 1, int4 (groups of 128) K={k_dim}, N={n_dim}")
        for f in (int4_dequant_einsum, int4_column_reduce):
            bench(f.__name__, f, x, q4_float, s4_float, nbytes=k_dim * n_dim // 2,
                  ref_rate=ref)
        for f in (int4_kminor_reduce, int4_ops_path):
            bench(f.__name__, f, x, q4, s4, nbytes=k_dim * n_dim // 2, ref_rate=ref)
        bench("bf16 einsum", bf16_mm, x,
              [jax.random.normal(jax.random.fold_in(key, i), (k_dim, n_dim), BF16)
               for i in range(R)], nbytes=2 * k_dim * n_dim)
        del w4, q4, q4_float
    M = 1920
    for k_dim, n_dim in KERNEL_SHAPES:
        x = jax.random.normal(key, (M, k_dim), BF16)
        wb = [jax.random.normal(jax.random.fold_in(key, i), (k_dim, n_dim), BF16)
              for i in range(R)]
        w8 = [jnp.asarray(w.T).astype(F8) for w in wb]
        s, b = jnp.full((n_dim,), 1 / 40, F32), jnp.zeros((n_dim,), BF16)
        flops = 2 * M * k_dim * n_dim
        print(f"## prefill M={M}, K={k_dim}, N={n_dim}, then scale + bias + GeLU")
        bench("bf16 einsum + bias + gelu", lambda x, w, b: jax.nn.gelu(bf16_mm(x, w) + b),
              x, wb, b, flops=flops)
        bench("fp8, f32 product", fp8_prefill(F32), x, w8, s, b, flops=flops)
        bench("fp8, bf16 product", fp8_prefill(BF16), x, w8, s, b, flops=flops)
        del wb, w8


def kernel_section(sweep: bool):
    """The Pallas kernel against today's XLA path, per decode shape and M."""
    from jaxformer.kernels import attention, quant_matmul as qm
    dev = jax.devices()[0]
    if not attention.is_hopper(dev):
        kind = getattr(dev, "device_kind", "")
        print(f"## Pallas int8 kernel: skipped, needs a Hopper GPU (this is {dev.platform}"
              f"{'' if kind == dev.platform else ' ' + kind})")
        return
    key = jax.random.key(1)
    for k_dim, n_dim in KERNEL_SHAPES:
        wq, s = int8_codes(key, k_dim, n_dim)
        ref = copy_rate(wq)
        nbytes = k_dim * n_dim
        print(f"## int8 weight-only K={k_dim}, N={n_dim}: copy {ref / 1e9:.0f} GB/s")
        for M in (1, 4, 16):
            x = jax.random.normal(key, (M, k_dim), BF16)
            xla = int8_kminor_reduce if M == 1 else int8_kminor_astype  # ops' XLA paths
            bench(f"M={M:<2} XLA ({xla.__name__})", xla, x, wq, s, nbytes=nbytes,
                  ref_rate=ref)
            cfg = qm.fit_config(n_dim, k_dim)
            P = qm.choose_splits(n_dim // cfg.block_n, k_dim // cfg.block_k)
            bench(f"M={M:<2} Pallas {cfg.block_n}x{cfg.block_k} s{cfg.stages} P{P}",
                  functools.partial(qm.int8_matmul, config=cfg), x, wq, s, nbytes=nbytes,
                  ref_rate=ref)
            if sweep and M == 1:
                for cfg in sweep_configs(n_dim, k_dim):
                    name = (f"  sweep {cfg.block_n}x{cfg.block_k} s{cfg.stages} "
                            f"P{cfg.splits}")
                    bench(name, functools.partial(qm.int8_matmul, config=cfg), x, wq, s,
                          nbytes=nbytes, ref_rate=ref)
        del wq


def sweep_configs(n_dim, k_dim):
    from jaxformer.kernels import quant_matmul as qm
    for bn in (64, 128):
        for bk in (128, 256, 512):
            for stages in (4, 8):
                base = qm.QuantMatmulConfig(block_n=bn, block_k=bk, stages=stages)
                p0 = qm.choose_splits(n_dim // bn, k_dim // bk)
                for p in sorted({p0, max(1, p0 // 2), min(k_dim // bk, 2 * p0)}):
                    yield dataclasses.replace(base, splits=p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel-only", action="store_true", help="only the Pallas section")
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel configs at M=1")
    ap.add_argument("--variants", action="store_true",
                    help="only the model-shape XLA formulations (module docstring)")
    ap.add_argument("--batch1", action="store_true",
                    help="only the batch-1 device times of 6.7B and 13B (module docstring)")
    args = ap.parse_args()
    if args.batch1:
        print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
        batch1_section()
        return
    if args.variants:
        print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
        variants_section()
        return
    if not args.kernel_only:
        xla_sections()
    else:
        print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    kernel_section(args.sweep)


def xla_sections():
    key = jax.random.key(0)
    wb = [jax.random.normal(jax.random.fold_in(key, i), (K, N), BF16) for i in range(R)]
    wq = [jnp.clip(jnp.round(w.astype(F32) * 40), -127, 127).astype(jnp.int8) for w in wb]
    wq_kminor = [jnp.asarray(w.T) for w in wq]
    s = jnp.ones((N,), F32) / 40
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for M in (1, 16, 64):
        x = jax.random.normal(key, (M, K), BF16)
        print(f"## decode-like M={M}, K={K}, N={N}")
        bench("bf16 einsum", bf16_mm, x, wb, nbytes=K * N * 2)
        bench("int8 astype einsum", int8_astype, x, wq, s, nbytes=K * N)
        bench("int8 dot_general mixed", int8_mixed_dot, x, wq, s, nbytes=K * N)
        bench("int8 K-minor astype einsum", int8_kminor_astype, x, wq_kminor, s, nbytes=K * N)
        if M <= 16:
            bench("int8 reduce", int8_reduce, x, wq, s, nbytes=K * N)
            bench("int8 K-minor reduce", int8_kminor_reduce, x, wq_kminor, s, nbytes=K * N)
        if M == 1:
            bench("int8 K-minor packed words", int8_kminor_packed, x, wq_kminor, s,
                  nbytes=K * N)
    M = 2048
    x = jax.random.normal(key, (M, K), BF16)
    w8 = [w.astype(F8) for w in wb]
    w8_kminor = [jnp.asarray(w.T) for w in w8]
    flops = 2 * M * K * N
    print(f"## prefill-like M={M}, K={K}, N={N}")
    bench("bf16 einsum", bf16_mm, x, wb, flops=flops)
    bench("fp8 einsum, f32 out", fp8_f32_out, x, w8, flops=flops)
    bench("fp8 einsum, bf16 out", fp8_bf16_out, x, w8, flops=flops)
    bench("fp8 K-minor weight", fp8_kminor, x, w8_kminor, flops=flops)
    bench("fp8 dequantize-then-dot pattern", fp8_dequant_pattern, x, w8, flops=flops)


if __name__ == "__main__":
    main()
