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

f32, bf16, f8 = jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn
R = 8
def bench(name, fn, *args, bytes_=None, flops=None):
    f = jax.jit(fn)
    try:
        f(*args).block_until_ready()
    except Exception as e:
        print(f"{name:<34} FAILED {type(e).__name__}: {str(e)[:150]}"); return
    ts = []
    for _ in range(10):
        t = time.perf_counter(); f(*args).block_until_ready(); ts.append(time.perf_counter() - t)
    t = float(np.median(ts)) / R
    extra = (f"  {bytes_ / t / 1e9:7.0f} GB/s" if bytes_ else "") + (f"  {flops / t / 1e12:6.0f} TFLOP/s" if flops else "")
    print(f"{name:<34} {t * 1e6:9.1f} us/matmul{extra}", flush=True)

def many(mm):
    return lambda x, ws, *rest: sum(mm(x, w, *rest) for w in ws)

K, N = 4096, 16384
key = jax.random.key(0)
wb = [jax.random.normal(jax.random.fold_in(key, i), (K, N), bf16) for i in range(R)]
wq = [jnp.clip(jnp.round(w.astype(f32) * 40), -127, 127).astype(jnp.int8) for w in wb]
wqt = [jnp.asarray(w.T) for w in wq]
s = jnp.ones((N,), f32) / 40
for M in (1, 16, 64):
    x = jax.random.normal(key, (M, K), bf16)
    print(f"## decode-like M={M}, K={K}, N={N}")
    bench("bf16 einsum", many(lambda x, w: jnp.einsum("mk,kn->mn", x, w)), x, wb, bytes_=K * N * 2)
    bench("int8 astype einsum", many(lambda x, q, s: (jnp.einsum("mk,kn->mn", x, q.astype(bf16), preferred_element_type=f32) * s).astype(bf16)), x, wq, s, bytes_=K * N)
    bench("int8 dot_general mixed", many(lambda x, q, s: (lax.dot_general(x, q, (((1,), (0,)), ((), ())), preferred_element_type=f32) * s).astype(bf16)), x, wq, s, bytes_=K * N)
    bench("int8 transposed [N,K] astype", many(lambda x, q, s: (jnp.einsum("mk,nk->mn", x, q.astype(bf16), preferred_element_type=f32) * s).astype(bf16)), x, wqt, s, bytes_=K * N)
    if M <= 16:
        bench("int8 reduce form", many(lambda x, q, s: ((x.astype(f32)[:, :, None] * q.astype(f32)[None]).sum(1) * s).astype(bf16)), x, wq, s, bytes_=K * N)
        bench("int8 transposed reduce form", many(lambda x, q, s: ((x.astype(f32)[:, None, :] * q.astype(f32)[None]).sum(2) * s).astype(bf16)), x, wqt, s, bytes_=K * N)
M = 2048
x = jax.random.normal(key, (M, K), bf16)
w8 = [w.astype(f8) for w in wb]
w8t = [jnp.asarray(w.T) for w in w8]
print(f"## prefill-like M={M}, K={K}, N={N}")
fl = 2 * M * K * N
bench("bf16 einsum", many(lambda x, w: jnp.einsum("mk,kn->mn", x, w)), x, wb, flops=fl)
bench("fp8 einsum f32 out", many(lambda x, w: jnp.einsum("mk,kn->mn", x.astype(f8), w, preferred_element_type=f32).astype(bf16)), x, w8, flops=fl)
bench("fp8 einsum bf16 out", many(lambda x, w: jnp.einsum("mk,kn->mn", x.astype(f8), w, preferred_element_type=bf16)), x, w8, flops=fl)
bench("fp8 transposed w [N,K]", many(lambda x, w: jnp.einsum("mk,nk->mn", x.astype(f8), w, preferred_element_type=bf16)), x, w8t, flops=fl)
bench("fp8 dequant pattern", many(lambda x, w: jnp.einsum("mk,kn->mn", x.astype(f8).astype(bf16) * bf16(1.0), w.astype(bf16) * bf16(1.0))), x, w8, flops=fl)
bench("fp8 dequant pattern [N,K]", many(lambda x, w: jnp.einsum("mk,nk->mn", (x.astype(f8).astype(f32) * 1.0).astype(bf16), (w.astype(f32) * 1.0).astype(bf16))), x, w8t, flops=fl)
