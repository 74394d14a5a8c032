"""kv-head replication: a model with fewer kv heads K than the mesh's tensor size T (and T a
multiple of K) runs as the equivalent model with T kv heads, each of the K heads copied
r = T / K times, so each device holds the kv head its query heads read (vLLM's and
TensorRT-LLM's answer to GQA on wide tensor parallelism).

Exact: query head n = k * G + g (G = N / K) reads kv head k; in the replicated model of
G' = G / r query heads per kv head, the same query head n = k' * G' + g' reads kv head
k' = n // G' = k * r + g // G', a copy of k. The fused QKV [D, K, G+2, H] becomes
[D, K*r, G'+2, H]; the KV cache holds r copies of each head (r x its bytes), which is what
buys every device its own head without a gather per step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.config import ModelConfig
from jaxformer.sharding import mesh_size

QKV = ("kernel", "bias")


def factor(cfg: ModelConfig, mesh, rules) -> int:
    """r: how many copies of each kv head this mesh needs (1: none)."""
    tp = mesh_size(mesh, rules.get("kv_heads"))
    K = cfg.kv_heads
    if tp <= K or tp % K or cfg.num_heads % tp:
        return 1
    return tp // K


def replicated_config(cfg: ModelConfig, r: int) -> ModelConfig:
    return cfg if r == 1 else cfg.replace(num_kv_heads=cfg.kv_heads * r)


def unsharded_kv_rules(rules) -> dict:
    """The rules to restore the stored (K-head) weights with: kv_heads replicated."""
    return {**rules, "kv_heads": None, "act_kv_heads": None}


def expand_qkv(a, cfg: ModelConfig, r: int, kv_axis: int):
    """a [..., K, G+2, ...] (kv_heads at kv_axis, qkv next) -> [..., K*r, G/r + 2, ...]."""
    K, G = cfg.kv_heads, cfg.q_per_kv
    a = jnp.moveaxis(jnp.moveaxis(a, kv_axis, 0), kv_axis + 1, 1)  # [K, G+2, ...]
    rest = a.shape[2:]
    q = a[:, :G].reshape(K, r, G // r, *rest)
    kv = jnp.broadcast_to(a[:, None, G:], (K, r, 2, *rest))  # key, value copies
    out = jnp.concatenate([q, kv], axis=2).reshape(K * r, G // r + 2, *rest)
    return jnp.moveaxis(jnp.moveaxis(out, 1, kv_axis + 1), 0, kv_axis)


def replicate_params(params: dict, cfg: ModelConfig, r: int, shardings: dict) -> dict:
    """The stored params (stacked layout, qkv [L, D, K, G+2, H] / bias [L, K, G+2, H]) ->
    the replicated model's, placed in `shardings` (the replicated config's)."""
    qkv = params["layers"]["attn"]["qkv"]

    def fn(qkv):
        return {name: expand_qkv(qkv[name], cfg, r, 2 if name == "kernel" else 1)
                for name in qkv}

    out_sh = {name: shardings["layers"]["attn"]["qkv"][name] for name in qkv}
    new = jax.jit(fn, out_shardings=out_sh)(dict(qkv))
    attn = {**params["layers"]["attn"], "qkv": new}
    return {**params, "layers": {**params["layers"], "attn": attn}}
