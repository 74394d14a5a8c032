"""One Mixtral-8x7B MoE layer's decode (bf16, batch 1-8): the dispatches of layers/moe.py
against the bytes of the experts the batch chose, and against a plain device copy.

    python benchmarks/moe_decode.py [--experts 8 --k 2 --hidden 4096 --ffn 14336]

Variants: "gather" (moe.gather_experts, what a decode step runs: per assignment its expert's
weights consumed by a multiply and a float32 reduction over D / F, which XLA fuses with the
gather, reading the chosen weights once in place), "einsum" (the chosen experts' weights
gathered, then batched einsums: the gathered copy is written out and read again), "ragged"
(moe.ragged_experts: assignments sorted by expert, jax.lax.ragged_dot over all experts).
Printed: microseconds per layer and GB/s of the chosen experts' weights.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer.config import ModelConfig  # noqa: E402
from jaxformer.layers import moe  # noqa: E402


def timed(fn, *args, n=20):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    a = ap.parse_args()
    E, k, D, F = a.experts, a.k, a.hidden, a.ffn
    cfg = ModelConfig(vocab_size=128, hidden_size=D, num_layers=1, num_heads=32,
                      activation="silu", gated_mlp=True, linear_bias=False, num_experts=E,
                      experts_per_token=k, ffn_size=F)
    key = jax.random.PRNGKey(0)
    wi = (jax.random.normal(key, (E, D, 2, F), jnp.float32) * 0.02).astype(jnp.bfloat16)
    wo = (jax.random.normal(key, (E, F, D), jnp.float32) * 0.02).astype(jnp.bfloat16)
    big = jnp.zeros((wi.size,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + 1)
    t = timed(copy, big)
    print(f"device copy: {2 * big.nbytes / t / 1e9:.0f} GB/s (read + write)")
    per_expert = (wi.nbytes + wo.nbytes) / E
    for B in a.batches:
        x = jax.random.normal(key, (B, D), jnp.float32).astype(jnp.bfloat16)
        ids = jnp.asarray(np.random.default_rng(B).permutation(E)[:B * k].reshape(B, k)
                          if B * k <= E else np.random.default_rng(B).integers(0, E, (B, k)),
                          jnp.int32)
        w = jnp.full((B, k), 1.0 / k, jnp.bfloat16)
        chosen = len(np.unique(np.asarray(ids))) * per_expert

        def take(arr):
            return lambda e: jnp.take(arr, e, axis=0)

        gather = jax.jit(lambda x, w, ids, wi, wo: moe.gather_experts(
            x, w, ids, take(wi), take(wo), cfg, 0, E))
        ragged = jax.jit(lambda x, w, ids, wi, wo: moe.ragged_experts(x, w, ids, wi, wo, cfg))
        def einsum(x, w, ids, wi, wo):
            e = ids.reshape(-1)
            rows = jnp.repeat(x, k, axis=0)  # [A, D]
            h = jnp.einsum("ad,adf->af", rows, wi[e].reshape(B * k, D, -1))  # [A, C F]
            h = jax.nn.silu(h[:, :F]) * h[:, F:]  # [A, F]
            y = jnp.einsum("af,afd->ad", h, wo[e]) * w.reshape(-1, 1)  # [A, D]
            return y.reshape(-1, k, D).sum(1)

        for name, fn in (("gather", gather), ("einsum", jax.jit(einsum)), ("ragged", ragged)):
            t = timed(fn, x, w, ids, wi, wo)
            print(f"batch {B} {name}: {t * 1e6:.0f} us, chosen experts' weights at "
                  f"{chosen / t / 1e9:.0f} GB/s")


if __name__ == "__main__":
    main()
