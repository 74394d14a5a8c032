"""bf16 vs INT8 / FP8 matmul formulations through XLA on this GPU: the measurements behind
jaxformer.quant.ops' stored layout and paths (docs/quantization.md, docs/benchmarks.md).

    python benchmarks/quant_matmul.py

Each line is the time of one [M, K] x [K, N] product (K = 4096, N = 16384), averaged over
eight distinct weights per call so nothing stays in L2, with the bytes or FLOP rate it
implies. Decode-like rows (M = 1, 16, 64) compare bf16 with int8 codes in the float layout
[K, N] and K-minor [N, K]; prefill-like rows (M = 2048) compare bf16 with FP8 GEMMs.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32, BF16, F8 = jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn
R = 8  # distinct weights per timed call
K, N = 4096, 16384


def bench(name, mm, x, weights, *rest, nbytes=None, flops=None):
    """Time sum(mm(x, w) for w in weights) and print one line per product."""
    f = jax.jit(lambda x, ws, *rest: sum(mm(x, w, *rest) for w in ws))
    try:
        f(x, weights, *rest).block_until_ready()
    except Exception as e:  # noqa: BLE001 - a formulation this backend cannot compile
        print(f"{name:<34} FAILED {type(e).__name__}: {str(e)[:150]}")
        return
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(x, weights, *rest).block_until_ready()
        ts.append(time.perf_counter() - t)
    t = float(np.median(ts)) / R
    rate = (f"  {nbytes / t / 1e9:7.0f} GB/s" if nbytes else "") + \
        (f"  {flops / t / 1e12:6.0f} TFLOP/s" if flops else "")
    print(f"{name:<34} {t * 1e6:9.1f} us/matmul{rate}", flush=True)


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


def main():
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
