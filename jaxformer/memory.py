"""The memory plan per device: weights, KV cache, prefill and decode against device memory.

    plan = jaxformer.memory.plan(config, {"data": 1, "pipe": 2, "tensor": 4}, "bfloat16",
                                 batch=8, max_length=2048)
    print(plan.explain())          # what `jaxformer info` prints
    plan.fits                      # True / False / None (device memory unknown)

Everything is computed from the config and the mesh sizes alone (nothing is loaded or
allocated), with the same rules that place the real arrays:

- weights: the abstract parameter tree (models.param_axes) through the sharding rules
  (sharding.logical_to_spec); a dimension on mesh axes of total size n holds dim / n per
  device. All leaves are stored in the run dtype, as `load` and `Model.random` create them,
  except under quantization (jaxformer.quant): quantized kernels count their own bits (int8
  and fp8 8, int4 4: XLA packs int4 two to a byte) and their scales 4 bytes.
- KV cache: k and v, each [L, B, S, K, H] with the cache axes of cache.py (layers on `pipe`,
  kv heads on `tensor`, batch on `data` in the default rules), in the run dtype, for the
  batch and cache length that generate() allocates (`cache.cache_rows`, `cache_length`).
- prefill activations: an estimate of the largest live temporaries of the prefill
  (`activation_bytes` states the formula);
- decode working set: what a decode step holds besides the cache (`decode_bytes`): with the
  scanned layer layout or a pipeline a second copy of the cache (the layer scan reads the
  carried cache and writes a new one); the unrolled layout (GPUs) updates it in place.

The plan itself (MemoryPlan, plan, check_fits and the quantize-at-load check) lives in
jaxformer/memory_plan.py and is re-exported here: this module holds the byte formulas.

total = weights + KV cache + max(prefill activations, decode working set), checked against
the devices' measured peak (`peak_bytes_in_use`, benchmarks/memory_plan.py); the decode
terms were identified from those runs (docs/parallelism.md has the table).

Device memory is `bytes_limit` from `jax.Device.memory_stats()` (GPUs; it already reflects
XLA_PYTHON_CLIENT_MEM_FRACTION), overridden by the JAXFORMER_DEVICE_MEMORY environment
variable ("80GiB", "79.6G", "8e10") or an explicit argument. On CPU it is unknown: the plan
is printed without a verdict.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from jaxformer import cache as kvc
from jaxformer.config import ModelConfig
from jaxformer.kernels.attention import is_hopper
from jaxformer.models import abstract_params, param_axes
from jaxformer.models.stack import LayerStack
from jaxformer.quant.params import leaf_dtype, weight_bits
from jaxformer.sharding import load_rules, logical_to_spec

GiB = 1 << 30
ENV_DEVICE_MEMORY = "JAXFORMER_DEVICE_MEMORY"
MESH_AXES = ("data", "pipe", "tensor")
CACHE_AXES = kvc.CACHE_AXES


# ---- small helpers ---------------------------------------------------------------------------
def mesh_sizes(mesh) -> dict[str, int]:
    """{'data': D, 'pipe': P, 'tensor': T} from a jax Mesh, a mapping or None (all 1)."""
    if mesh is None:
        return dict.fromkeys(MESH_AXES, 1)
    shape = dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)
    out = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    for a, n in out.items():
        if n <= 0:
            raise ValueError(f"mesh size {a}={n} must be a positive integer")
    return out


def _axes_size(sizes: Mapping[str, int], entry) -> int:
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([sizes[a] for a in axes], dtype=np.int64))


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape, axes, sizes: Mapping[str, int], rules) -> tuple[int, ...]:
    """The per-device shape of an array with logical `axes` (ceil division, as jax pads)."""
    spec = logical_to_spec(tuple(axes), rules)
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(-(-int(d) // _axes_size(sizes, e)) for d, e in zip(shape, spec))


def _itemsize(dtype) -> int:
    import jax.numpy as jnp
    return jnp.dtype(dtype).itemsize


def _rules(rules):
    return load_rules(rules) if not isinstance(rules, dict) else rules


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def parse_bytes(text) -> int:
    """'80GiB', '80G', '79.6 GB' (GiB: memory sizes are binary), '8e10' (bytes) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. '80GiB' or '8e10'")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


# ---- the three terms ------------------------------------------------------------------------
def weights_bytes(config: ModelConfig, mesh=None, dtype="float32", rules="default",
                  subtree: str | None = None, quantize: str | None = None) -> int:
    """Bytes of parameters on one device: sum over leaves of prod(shard shape) * itemsize
    (only the leaves under `subtree`, e.g. "layers", when given). quantize: the linear
    layers as RunConfig.quantize stores them (jaxformer.quant.params.leaf_dtype)."""
    sizes, table = mesh_sizes(mesh), _rules(rules)
    shapes, axes = abstract_params(config, quantize), param_axes(config, quantize)
    prefix = ()
    if subtree is not None:
        shapes, axes, prefix = shapes[subtree], axes[subtree], (subtree,)
    bits = sum(int(np.prod(shard_shape(s.shape, a, sizes, table), dtype=np.int64))
               * weight_bits(leaf_dtype(p, s.dtype, dtype))
               for p, s, a in _pairs(shapes, axes, prefix))
    return int(-(-bits // 8))


def _pairs(shapes, axes, prefix=()):
    for k, v in shapes.items():
        if isinstance(v, dict):
            yield from _pairs(v, axes[k], prefix + (k,))
        else:
            yield prefix + (k,), v, axes[k]


def prompt_bucket(config: ModelConfig, prompt_length: int) -> int:
    """The padded prompt length generate() prefills (cache.bucket: a power of two >= 16)."""
    return kvc.bucket(prompt_length, config.max_position_embeddings)


def cache_length(config: ModelConfig, max_length: int, prompt_length: int | None = None) -> int:
    """Cache slots generate() allocates for a prompt of `prompt_length` tokens plus new
    tokens up to `max_length` in all: the prompt bucket plus the new tokens, rounded up to a
    multiple of 128, capped at the model's position limit. Without prompt_length: the most
    any split of max_length can take (a prompt just past a power of two is padded to the next
    one, so a prompt of 129 + 127 new tokens takes 384 slots where 128 + 128 takes 256)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    limit = config.max_position_embeddings

    def alloc(p):  # generate.GenerateRun's rule for prompts of p and max_length - p new tokens
        return kvc.cache_slots(prompt_bucket(config, p), p, max(max_length - p, 1), limit)

    if prompt_length is not None:
        if not 1 <= prompt_length < max(max_length, 2):
            raise ValueError(f"prompt_length {prompt_length} must be in [1, max_length)")
        return alloc(prompt_length)
    # within one bucket the slots fall as the prompt grows: try each bucket's shortest prompt
    cands = {1, max(max_length - 1, 1)} | {(1 << k) + 1 for k in range(4, 40)
                                           if (1 << k) + 1 < max_length}
    return max(alloc(p) for p in cands)


def kv_cache_bytes(config: ModelConfig, mesh=None, dtype="float32", batch: int = 1,
                   length: int = 1, rules="default", kv_cache: str | None = None) -> int:
    """Bytes of k and v on one device for a cache of exactly `batch` rows x `length` slots:
    2 * prod(shard shape of [L, batch, length, K, H]) * itemsize; a quantized cache
    (RunConfig.kv_cache) holds 1-byte codes plus 2 * prod([L, batch, length, K]) * 4 bytes of
    scales."""
    sizes, table = mesh_sizes(mesh), _rules(rules)
    abstract = kvc.KVCache.abstract(config, batch, length, dtype, kv_cache)
    axes = kvc.KVCache.axes(kv_cache)
    total = 0
    for f in ("k", "v", "k_scale", "v_scale"):
        a = getattr(abstract, f)
        if a is not None:
            n = int(np.prod(shard_shape(a.shape, getattr(axes, f), sizes, table),
                            dtype=np.int64))
            total += n * a.dtype.itemsize
    return total


def activation_bytes(config: ModelConfig, mesh=None, dtype="float32", batch: int = 1,
                     length: int = 1, rules="default", attention: str = "auto",
                     chunk_rows: int | None = None) -> int:
    """Estimated peak of prefill temporaries on one device (an estimate, not exact).

    With b = rows per device (batch / data-size of `batch`), r = rows per pipeline
    microbatch (b / pipe) or per prefill pass (chunk_rows, cache.prefill_rows), T = length
    (the padded prompt), e = itemsize, and per-device
    sizes n = N / t, k = K / t, f = F / t, v = Vp / t (t: the tensor size where the rules
    shard heads, kv heads, mlp and vocab):

        r*T*(6*D*e + k*(G+2)*H*e + n*H*e + (3 if gated else 2)*f*e)   one block's tensors
      + 2*r*n*T*T*4               float32 scores and probabilities (xla attention, and auto
                                  where it falls back to xla; pallas and cudnn are flash-style)
      + 2*b*T*D*e                 the stage's input and output buffers (pipe > 1 only)
      + 2*r*T*k*H*e               one layer's fresh keys and values before the cache write
      + 2*b*v*4                   last-position logits and the sampler's sorted copy (float32)
    """
    sizes, table = mesh_sizes(mesh), _rules(rules)
    c = config
    e = _itemsize(dtype)
    div = lambda n, logical: -(-n // _axes_size(sizes, table.get(logical)))  # noqa: E731
    b = div(batch, "batch")
    pipe = sizes["pipe"]
    r = -(-b // pipe) if chunk_rows is None else min(chunk_rows, -(-b // pipe))
    T = length
    D, H, G = c.hidden_size, c.dims_per_head, c.q_per_kv
    n, k, f, v = div(c.num_heads, "heads"), div(c.kv_heads, "kv_heads"), div(c.mlp_size, "mlp"), \
        div(c.padded_vocab_size, "vocab")
    mlp = (3 if c.gated_mlp else 2) * f * e
    if c.num_experts:  # a mixture (layers/moe.py): k rows per token of x, h and the output
        # over the tokens of every shard that splits the batch along the experts' axis
        fe = div(c.expert_mlp_size, "mlp")
        shared = set(_names(table.get("batch"))) & set(_names(table.get("experts")))
        gathered = _axes_size(sizes, tuple(shared))
        mlp = gathered * c.experts_per_token * ((3 if c.gated_mlp else 2) * fe + 2 * D) * e \
            + (3 if c.gated_mlp else 2) * div(c.shared_expert_size, "mlp") * e
    block = r * T * (6 * D * e + k * (G + 2) * H * e + n * H * e + mlp)
    scores = 0 if _flash(attention, dtype) else 2 * r * n * T * T * 4
    stage = 2 * b * T * D * e if pipe > 1 else 0
    fresh_kv = 2 * r * T * k * H * e
    logits = 2 * b * v * 4
    return int(block + scores + stage + fresh_kv + logits)


def _flash(attention: str, dtype) -> bool:
    """Whether attention runs flash-style (no [T, T] scores): pallas and cudnn do, and auto
    does where it picks pallas (Hopper GPUs, bfloat16 / float16)."""
    if attention in ("pallas", "cudnn"):
        return True
    if attention != "auto" or _itemsize(dtype) != 2:
        return False
    try:
        import jax
        return is_hopper(jax.local_devices()[0])
    except Exception:  # no backend or no kernels module: count the scores
        return False


def decode_bytes(config: ModelConfig, mesh=None, dtype="float32", batch: int = 1,
                 length: int = 1, rules="default", quantize: str | None = None,
                 kv_cache: str | None = None, layer_loop: str = "scan") -> int:
    """What a decode step holds on one device besides the cache itself:

        kv_cache_bytes(batch, length)   a second copy of the cache, with layer_loop "scan"
                                        or pipe > 1: the layer scan reads the carried cache
                                        and writes a new one (XLA's memory analysis shows
                                        it); the unrolled layout updates it in place
      + 2*b*S*k*H*e                     one layer's k and v slice being updated
      + one layer's weights             the slice of the stacked weights the scan copies
      + 2*b*v*4                         the step's logits and the sampler's copy (float32)

    with b, k, v, e as in `activation_bytes` and S = length (the cache slots).
    """
    sizes, table = mesh_sizes(mesh), _rules(rules)
    c = config
    div = lambda n, logical: -(-n // _axes_size(sizes, table.get(logical)))  # noqa: E731
    b, k, v = div(batch, "cache_batch"), div(c.kv_heads, "kv_heads"), \
        div(c.padded_vocab_size, "vocab")
    e = _itemsize(dtype)
    layer = weights_bytes(config, sizes, dtype, table, "layers", quantize) \
        // div(c.num_layers, "layers")
    copy = 0 if decode_in_place(layer_loop, sizes) else \
        kv_cache_bytes(config, sizes, dtype, batch, length, table, kv_cache)
    return int(copy + 2 * b * length * k * c.dims_per_head * e + layer + 2 * b * v * 4)


def decode_in_place(layer_loop: str, sizes: Mapping[str, int]) -> bool:
    """Whether decode updates the KV cache in place rather than holding a second copy: the
    layer stack's answer (models/stack.py) for this layer loop and pipe size."""
    return LayerStack.for_run(None, layer_loop, sizes["pipe"]).decode_in_place


def device_stats(d) -> dict | None:
    """A device's memory_stats() where it reports a bytes_limit, else None (CPU)."""
    try:
        stats = d.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return stats if stats and stats.get("bytes_limit") else None


def device_memory_limit(devices=None) -> tuple[int | None, str]:
    """(bytes per device, where it came from): JAXFORMER_DEVICE_MEMORY, else the smallest
    `bytes_limit` of the local devices' memory_stats(), else (None, reason)."""
    env = os.environ.get(ENV_DEVICE_MEMORY)
    if env:
        return parse_bytes(env), f"${ENV_DEVICE_MEMORY}"
    import jax
    devs = list(devices) if devices is not None else jax.local_devices()
    limits = [int(st["bytes_limit"]) for st in map(device_stats, devs) if st]
    if limits and len(limits) == len(devs):
        return min(limits), f"bytes_limit of {devs[0].device_kind}"
    return None, f"unknown on {devs[0].platform if devs else 'this machine'}"


# the plan, on these formulas (imported last: jaxformer.memory_plan imports this module)
from jaxformer.memory_plan import (MemoryPlan, OutOfMemoryPlan, PoolPlan,  # noqa: E402
                                   check_fits, check_quantize_at_load, fit_pool, plan, pool_plan,
                                   quantize_transient_bytes)

__all__ = ["MemoryPlan", "OutOfMemoryPlan", "PoolPlan", "pool_plan", "fit_pool",
           "activation_bytes", "cache_length", "check_quantize_at_load", "quantize_transient_bytes",
           "check_fits", "decode_bytes", "device_memory_limit", "kv_cache_bytes", "plan",
           "weights_bytes"]
