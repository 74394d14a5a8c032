"""The memory plan: MemoryPlan, plan(), check_fits() and the quantize-at-load check, built
on the byte formulas of jaxformer.memory (which re-exports everything here: use
`jaxformer.memory.plan`). The module docstring of jaxformer.memory describes the terms."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxformer import cache as kvc
from jaxformer.config import PREFILL_TOKENS, ModelConfig, RunConfig
from jaxformer.memory import (CACHE_AXES, ENV_DEVICE_MEMORY, _axes_size, _count, _itemsize,
                              _rules, activation_bytes, cache_length, decode_bytes,
                              decode_in_place, device_memory_limit, device_stats, fmt_bytes,
                              kv_cache_bytes, mesh_sizes, parse_bytes, prompt_bucket, shard_shape,
                              weights_bytes)
from jaxformer.models import abstract_params, num_active_params, num_params, param_axes
from jaxformer.quant.params import covered
from jaxformer.quant.spec import name


# ---- the plan (re-exported by jaxformer.memory) --------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for one model on one mesh; see the module docstring."""

    config: ModelConfig
    sizes: dict
    dtype: str
    rules: Any
    attention: str
    weights: int
    quantize: str | None = None  # RunConfig.quantize of the linear layers
    kv_quant: str | None = None  # RunConfig.kv_cache
    batch: int | None = None  # prompts asked for
    max_length: int | None = None  # prompt + new tokens asked for
    prompt_length: int | None = None  # None: any prompt up to max_length - 1
    rows: int | None = None  # cache rows generate() allocates (all devices)
    slots: int | None = None  # cache length generate() allocates
    prefill_tokens: int | None = None  # padded prompt length the activations are for
    prefill_budget: int = PREFILL_TOKENS  # RunConfig.prefill_tokens: tokens per prefill pass
    prefill_chunk: int | None = None  # rows one prefill pass computes (cache.prefill_rows)
    layer_loop: str = "scan"  # RunConfig.layer_loop, resolved: "unroll" updates the cache in place
    kv_cache: int = 0
    activations: int = 0  # prefill temporaries
    decode: int = 0  # decode working set besides the cache
    device_memory: int | None = None
    device_memory_source: str = ""

    @property
    def total(self) -> int:
        """weights + KV cache + the larger of the prefill and decode working sets."""
        return self.weights + self.kv_cache + max(self.activations, self.decode)

    @property
    def fits(self) -> bool | None:
        """Whether the total fits device memory; None when device memory is unknown."""
        return None if self.device_memory is None else self.total <= self.device_memory

    @property
    def weights_fit(self) -> bool | None:
        return None if self.device_memory is None else self.weights <= self.device_memory

    def largest_batch(self, length: int) -> int:
        """The largest number of prompts (as generate() pads them) whose cache of `length`
        fits beside the weights; 0 if not even one does (or device memory is unknown).

        The plan's total grows with the batch, so doubling finds a batch that does not fit
        and bisection the largest one that does (every batch is a candidate, not only
        powers of two)."""
        if self.device_memory is None:
            return 0

        def fits(n):
            return _plan_total(self, n, length) <= self.device_memory
        if not fits(1):
            return 0
        lo, hi = 1, 2  # fits(lo); hi: not yet known
        while hi <= 1 << 24 and fits(hi):
            lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return lo
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def fit_table(self, lengths=None) -> list[tuple[int, int]]:
        """[(length, largest batch)] for powers of two up to the position limit."""
        limit = self.config.max_position_embeddings
        if lengths is None:
            lengths = sorted({min(128 << i, limit) for i in range(16) if 128 << i <= 2 * limit}
                             | ({self.max_length} if self.max_length else set()))
        return [(L, self.largest_batch(L)) for L in lengths]

    def explain(self) -> str:
        """The plan as text (what `jaxformer info` prints and what load() raises)."""
        c, s = self.config, self.sizes
        n_dev = s["data"] * s["pipe"] * s["tensor"]
        item = _itemsize(self.dtype)
        rules = self.rules if isinstance(self.rules, str) else "<custom>"
        whole = weights_bytes(c, None, self.dtype, _rules(self.rules), quantize=self.quantize)
        quant = f", {self.quantize} linear layers" if self.quantize else ""
        lines = [
            f"model {c.name or '(unnamed)'}: {c.arch}, {_count(num_params(c))} parameters, "
            f"L={c.num_layers} D={c.hidden_size} N={c.num_heads} K={c.kv_heads} "
            f"H={c.dims_per_head} F={c.mlp_size} V={c.padded_vocab_size}"
            + (f" E={c.num_experts} experts (k={c.experts_per_token} per token, "
               f"{_count(num_active_params(c))} active parameters)" if c.num_experts else ""),
            f"mesh data={s['data']} x pipe={s['pipe']} x tensor={s['tensor']} "
            f"({n_dev} devices), {self.dtype}{quant}, rules {rules}",
            "per device:",
            f"  weights       {fmt_bytes(self.weights):>12}   "
            f"(the whole model: {fmt_bytes(whole)})",
        ]
        if self.rows is not None:
            table = _rules(self.rules)
            shp = shard_shape((c.num_layers, self.rows, self.slots, c.kv_heads, c.dims_per_head),
                              CACHE_AXES, s, table)
            per = (f"1 B {self.kv_quant} + a float32 scale per token and head"
                   if self.kv_quant else f"{item} B")
            chunked = "" if self.prefill_chunk == self.rows else f" (of {self.rows} rows)"
            lines += [
                f"  KV cache      {fmt_bytes(self.kv_cache):>12}   k and v, each "
                f"[{', '.join(map(str, shp))}] x {per} (batch {self.batch} -> "
                f"{self.rows} rows, length {self.max_length} -> "
                f"{'' if self.prompt_length else 'up to '}{self.slots} slots)",
                f"  prefill       {fmt_bytes(self.activations):>12}   activations for "
                f"{self.prefill_chunk} x {self.prefill_tokens} tokens"
                f"{chunked}, "
                f"{self.attention} attention "
                f"(an estimate: memory.activation_bytes)",
                f"  decode        {fmt_bytes(self.decode):>12}   working set: "
                f"{'' if decode_in_place(self.layer_loop, s) else 'a second cache copy, '}"
                f"one layer's k/v, logits (memory.decode_bytes)",
            ]
        lines.append(f"  total         {fmt_bytes(self.total):>12}" + (
            "   weights + KV cache + max(prefill, decode)" if self.rows is not None else ""))
        if self.device_memory is None:
            lines.append(f"device memory: {self.device_memory_source}; pass --device-memory "
                         f"GiB (or set ${ENV_DEVICE_MEMORY}) for a verdict")
            return "\n".join(lines)
        free = self.device_memory - self.total
        verdict = "fits" if free >= 0 else "DOES NOT FIT"
        lines.append(f"device memory {fmt_bytes(self.device_memory):>12}   "
                     f"({self.device_memory_source}): {verdict}, "
                     f"{fmt_bytes(abs(free))} {'free' if free >= 0 else 'short'}")
        if not self.weights_fit:
            lines.append(f"the weights alone need {fmt_bytes(self.weights)} per device: use "
                         f"more tensor or pipe shards (per-device weights scale as "
                         f"1 / (tensor x pipe)), or a smaller dtype or quantization")
            return "\n".join(lines)
        rows = self.fit_table()
        lines.append("largest batch that fits, by length (prompt + new tokens): "
                     + ", ".join(f"{L}: {B}" for L, B in rows))
        if self.fits is False:
            lines.append("reduce the batch or the length, or spread it over more devices: the "
                         "KV cache splits its rows over data, its layers over pipe and its kv "
                         "heads over tensor")
        return "\n".join(lines)


def _workload(config, sizes, dtype, table, attention, batch, max_length, prompt_length,
              quantize=None, kv_quant=None, budget=PREFILL_TOKENS, layer_loop="scan"):
    """(rows, slots, prefill tokens, rows per prefill pass, kv, prefill activation and
    decode bytes) of a workload; budget: RunConfig.prefill_tokens."""
    data = _axes_size(sizes, table.get("cache_batch"))
    rows = kvc.cache_rows(batch, data)
    slots = cache_length(config, max_length, prompt_length)
    tokens = prompt_bucket(config, prompt_length or max(max_length - 1, 1))
    # a chunked prefill writes each chunk's keys and values straight into the batch's cache
    chunk = kvc.prefill_rows(rows, tokens, budget, data, sizes["pipe"])
    return (rows, slots, tokens, chunk,
            kv_cache_bytes(config, sizes, dtype, rows, slots, table, kv_quant),
            activation_bytes(config, sizes, dtype, rows, tokens, table, attention, chunk),
            decode_bytes(config, sizes, dtype, rows, slots, table, quantize, kv_quant,
                         layer_loop))


def _plan_total(p: MemoryPlan, batch: int, length: int) -> int:
    *_, kv, act, dec = _workload(p.config, p.sizes, p.dtype, _rules(p.rules), p.attention,
                                 batch, length, None, p.quantize, p.kv_quant, p.prefill_budget,
                                 p.layer_loop)
    return p.weights + kv + max(act, dec)


def plan(config: ModelConfig, mesh=None, dtype="float32", *, batch: int | None = None,
         max_length: int | None = None, prompt_length: int | None = None, rules="default",
         attention: str = "auto", device_memory=None,
         quantize: str | None = None, kv_cache: str | None = None,
         prefill_tokens: int = PREFILL_TOKENS, layer_loop: str = "auto") -> MemoryPlan:
    """The memory plan per device. `mesh`: a jax Mesh or {'data', 'pipe', 'tensor'} sizes.

    batch and max_length (prompt + new tokens) add the KV cache, the prefill activations and
    the decode working set of generate(); prompt_length (default: the worst case) makes the
    cache exact for one prompt length. device_memory (bytes or '80GiB') overrides
    `device_memory_limit`.
    attention "auto" counts the xla backend's [T, T] scores except on Hopper GPUs, where
    auto picks the flash-style Pallas kernels. quantize (RunConfig.quantize) counts the
    linear layers' weights at their quantized size; kv_cache (RunConfig.kv_cache) the KV
    cache at its quantized size; prefill_tokens (RunConfig.prefill_tokens) how many prompt
    tokens one prefill pass computes (larger batches prefill in row chunks); layer_loop
    (RunConfig.layer_loop, "auto": "unroll" where jax's default backend is a GPU, as load
    resolves it) whether decode updates the cache in place.
    """
    import jax
    import jax.numpy as jnp
    layer_loop = RunConfig.layer_loop_on(layer_loop, jax.default_backend())
    sizes = mesh_sizes(mesh)
    dtype = jnp.dtype(dtype).name
    table = _rules(rules)
    quantize = name(quantize)
    weights = weights_bytes(config, sizes, dtype, table, quantize=quantize)
    if device_memory is not None:
        dev, src = parse_bytes(device_memory), "given"
    else:
        dev, src = device_memory_limit()
    p = MemoryPlan(config, sizes, dtype, rules, attention, weights, quantize, kv_cache,
                   prefill_budget=prefill_tokens, layer_loop=layer_loop, device_memory=dev,
                   device_memory_source=src)
    if batch is None and max_length is None:
        return p
    batch = 1 if batch is None else int(batch)
    max_length = config.max_position_embeddings if max_length is None else int(max_length)
    _check_workload(config, batch, max_length, prompt_length, prefill_tokens)
    rows, slots, tokens, chunk, kv, act, dec = _workload(
        config, sizes, dtype, table, attention, batch, max_length, prompt_length, quantize,
        kv_cache, prefill_tokens, layer_loop)
    return dataclasses.replace(p, batch=batch, max_length=max_length, rows=rows, slots=slots,
                               prompt_length=prompt_length, prefill_tokens=tokens,
                               prefill_chunk=chunk, kv_cache=kv, activations=act, decode=dec)


def _check_workload(config: ModelConfig, batch: int, max_length: int, prompt_length,
                    prefill_tokens: int) -> None:
    """One ValueError naming the first workload value that cannot describe a generate()."""
    limit = config.max_position_embeddings
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if max_length < 2:
        raise ValueError(f"max_length (prompt + new tokens) must be at least 2, got "
                         f"{max_length}")
    if max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the context of "
                         f"{config.name or 'the model'}: max_position_embeddings = {limit}")
    if prompt_length is not None and not 1 <= prompt_length < max_length:
        raise ValueError(f"prompt_length must be in [1, max_length = {max_length}), got "
                         f"{prompt_length}")
    if prefill_tokens < 1:
        raise ValueError(f"prefill_tokens must be at least 1, got {prefill_tokens}")


class OutOfMemoryPlan(ValueError):
    """The plan does not fit device memory; the message is the plan."""


def check_fits(config: ModelConfig, mesh, dtype, rules="default", *, max_batch=None,
               max_length=None, attention="auto", devices=None,
               quantize: str | None = None, kv_cache: str | None = None,
               layer_loop: str = "auto") -> MemoryPlan | None:
    """Refuse (OutOfMemoryPlan, a ValueError) a plan that cannot fit the mesh's devices.

    Always checks the weights when device memory is known; with max_batch or max_length also
    the KV cache, prefill activations and decode working set of that workload.
    """
    sizes = mesh_sizes(mesh)
    if devices is None and hasattr(mesh, "devices"):
        devices = [d for d in np.asarray(mesh.devices).flat if _is_local(d)]
    dev, src = device_memory_limit(devices)
    if dev is None:  # nothing to check against (CPU, unless JAXFORMER_DEVICE_MEMORY is set)
        return None
    p = plan(config, sizes, dtype, batch=max_batch, max_length=max_length, rules=rules,
             attention=attention, device_memory=dev, quantize=quantize, kv_cache=kv_cache,
             layer_loop=layer_loop)
    p = dataclasses.replace(p, device_memory_source=src)
    if p.fits is False:
        what = "the weights" if not p.weights_fit else \
            f"batch {p.batch} x length {p.max_length}"
        raise OutOfMemoryPlan(f"{what} cannot fit device memory on this mesh:\n{p.explain()}")
    return p


def quantize_transient_bytes(config: ModelConfig, mesh=None, dtype="float32",
                             rules="default") -> int:
    """Quantizing a float checkpoint while loading holds one float stacked kernel (all layers
    of one linear) beside the quantized model: the largest such kernel per device."""
    sizes, table = mesh_sizes(mesh), _rules(rules)
    shapes, axes = abstract_params(config), param_axes(config)
    out = 0
    for path in covered(config):
        s, a = shapes, axes
        for k in path:
            s, a = s[k], a[k]
        n = int(np.prod(shard_shape(s["kernel"].shape, a["kernel"], sizes, table),
                        dtype=np.int64))
        out = max(out, n * _itemsize(dtype))
    return out


def check_quantize_at_load(p: MemoryPlan | None, config: ModelConfig, mesh, dtype,
                           rules="default") -> None:
    """Refuse (OutOfMemoryPlan) quantizing at load when the quantized plan `p` (from
    check_fits) plus the float kernel being quantized exceed device memory."""
    if p is None or p.device_memory is None:
        return
    extra = quantize_transient_bytes(config, mesh, dtype, rules)
    if p.total + extra > p.device_memory:
        raise OutOfMemoryPlan(
            f"quantizing while loading needs {fmt_bytes(extra)} per device for one float "
            f"stacked kernel beside the {p.quantize} model ({fmt_bytes(p.total)}), more than "
            f"the {fmt_bytes(p.device_memory)} of device memory: quantize the checkpoint once "
            f"on the host (jaxformer.quant.convert.quantize_checkpoint, or the converters' "
            f"--quantize) and load the quantized checkpoint, or use more devices\n{p.explain()}")


def _is_local(d) -> bool:
    import jax
    return getattr(d, "process_index", 0) == jax.process_index()


# ---- the paged KV cache's pool (serving) ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """A page pool per device: what is left after the weights and the serving step's
    temporaries, in pages of page_size tokens (page 0 is the null page)."""
    page_size: int
    page_bytes: int
    weights: int
    reserve: int
    device_memory: int | None
    num_pages: int | None
    # set by fit_pool when the devices' measured free memory capped num_pages
    measured: str = ""

    @property
    def tokens(self) -> int | None:
        """Tokens the pool holds (every sequence's cache, prefix cache included)."""
        return None if self.num_pages is None else max(0, self.num_pages - 1) * self.page_size

    def explain(self) -> str:
        head = (f"page pool: pages of {self.page_size} tokens, {fmt_bytes(self.page_bytes)} "
                f"each per device; {fmt_bytes(self.reserve)} held back for the step's "
                f"temporaries")
        if self.num_pages is None:
            return head + "; device memory unknown, so no page count"
        return head + (f"; {_count(self.num_pages)} pages = {_count(self.tokens)} tokens "
                       f"in {fmt_bytes(self.num_pages * self.page_bytes)}") + \
            (f" ({self.measured})" if self.measured else "")


def pool_plan(config: ModelConfig, mesh=None, dtype="float32", *, page_size: int = 16,
              slots: int = 64, prefill_tokens: int = 512, rules="default",
              attention: str = "auto", quantize: str | None = None,
              kv_cache: str | None = None, device_memory=None,
              margin: float = 0.05) -> PoolPlan:
    """Size a paged KV cache's pool (PagedConfig.num_pages) from the memory plan: device
    memory minus the weights, minus one prefill call of prefill_tokens tokens
    (activation_bytes), minus the decode step's per-slot vocabulary rows (float32 logits and
    two sampler copies, the penalty counts and seen flags: 17 bytes per vocabulary entry
    per slot), minus `margin` of the device for XLA's own buffers."""
    sizes, table = mesh_sizes(mesh), _rules(rules)
    quantize = name(quantize)
    weights = weights_bytes(config, sizes, dtype, table, quantize=quantize)
    page = kv_cache_bytes(config, sizes, dtype, 1, page_size, table, kv_cache)
    v = -(-config.padded_vocab_size // _axes_size(sizes, table.get("vocab")))
    b = -(-slots // _axes_size(sizes, table.get("cache_batch")))
    temps = activation_bytes(config, sizes, dtype, 1, prefill_tokens, table, attention) \
        + b * v * 17
    if device_memory is not None:
        dev = parse_bytes(device_memory)
    else:
        dev, _ = device_memory_limit()
    reserve = temps + (int(margin * dev) if dev else 0)
    pages = None if dev is None else max(0, (dev - weights - reserve) // page)
    return PoolPlan(page_size, page, weights, reserve, dev, pages)


def fit_pool(plan: PoolPlan, devices, margin: float = 0.05) -> PoolPlan:
    """The plan's pages capped by what `devices` (a loaded model's) have free now, where
    their memory_stats() say: bytes_limit - bytes_in_use - the plan's reserve, and the
    allocator's largest free block less `margin` of the limit. The pool's arrays are each
    one allocation per device, and a best-fit allocator must place each in one free block:
    after loading, freed temporaries leave holes between the weights, so memory free in
    total may hold no block as large as the pool (k and v are both counted against that
    block, the conservative case). Unchanged where no device reports stats (CPU)."""
    free = largest = limit = None
    for stats in filter(None, map(device_stats, devices)):
        lim = int(stats["bytes_limit"])
        f = lim - int(stats.get("bytes_in_use", 0))
        big = int(stats.get("largest_free_block_bytes", f))
        free = f if free is None else min(free, f)
        largest = big if largest is None else min(largest, big)
        limit = lim if limit is None else min(limit, lim)
    if free is None or plan.num_pages is None:
        return plan
    cap = min((free - plan.reserve) // plan.page_bytes,
              (largest - int(margin * limit)) // plan.page_bytes)
    cap = max(0, cap)
    if cap >= plan.num_pages:
        return plan
    return dataclasses.replace(
        plan, num_pages=cap,
        measured=f"capped from {_count(plan.num_pages)} pages by the devices' memory after "
                 f"loading: {fmt_bytes(free)} free, largest free block {fmt_bytes(largest)}")
