"""The one attention dispatch every layer calls.

`attention(q, k, v, q_positions, kv_lengths, causal=, scale=, backend=)` with the shapes of
kernels/reference.py. backend:
  "xla"    the pure-jnp reference (any device, any dtype);
  "cudnn"  jax.nn.dot_product_attention(implementation="cudnn") (NVIDIA GPUs, fp16/bf16);
  "pallas" the Mosaic GPU kernels of this package (Hopper): flash_attention.py for T > 1,
           decode_attention.py (flash-decoding) for T == 1;
  "auto"   pallas where supported, else xla, logging the reason once.
Kernels run under shard_map on the active mesh (batch on `data`, heads on `tensor`).

Masks. pallas is exact for any q_positions and kv_lengths. cudnn is exact for T == 1
(decode), for non-causal calls, and for causal calls with T == S under the prefill contract
q_positions[b] == arange(T) (cuDNN's own causal mask); any other causal T > 1 call gets an
explicit [B, 1, T, S] mask. Rows that see no key at all (kv_length 0) are padding: their
output differs between backends (reference: mean of V; kernels: 0).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxformer import sharding
from jaxformer.cache import read_layer
from jaxformer.kernels import decode_attention, flash_attention, paged_attention as paged
from jaxformer.kernels.masking import check_mods
from jaxformer.kernels.reference import attention_mask, attention_reference

log = logging.getLogger(__name__)
BACKENDS = ("auto", "xla", "cudnn", "pallas")
# "auto" reads a quantized cache with the decode kernel when at least this many query heads
# share each kv head (GQA: there the kernel beats the dots, benchmarks/attention.py); below,
# with XLA's dots (reference.py), which turn a one-head product into a reduction that reads
# the codes faster than the kernel does (docs/benchmarks.md).
QUANT_KERNEL_MIN_GROUP = 2
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


# ---- where can the kernels run? ---------------------------------------------------------
def _devices():
    """The context mesh's kind of device (its abstract device), else the default devices."""
    mesh = sharding.abstract_mesh()
    if mesh is not None and mesh.abstract_device is not None:
        return [mesh.abstract_device]
    return jax.devices()


def is_hopper(device) -> bool:
    if device.platform != "gpu":
        return False
    kind = str(getattr(device, "device_kind", ""))
    if "H100" in kind or "H200" in kind or "H800" in kind or "GH200" in kind:
        return True
    return str(getattr(device, "compute_capability", "")) == "9.0"


def pallas_unsupported(q, k, v, quantized: bool = False) -> str | None:
    """Why the Pallas kernels cannot take this call (None: they can). quantized: k and v
    are a quantized cache's codes (only the decode kernel reads those)."""
    dev = _devices()[0]
    if not is_hopper(dev):
        return (f"the Pallas Mosaic GPU kernels need a Hopper GPU (sm_90); this is "
                f"{dev.platform} {getattr(dev, 'device_kind', '')}".rstrip())
    if q.shape[1] == 1:
        return decode_attention.check_supported(q, k, v, quantized)
    if quantized:
        return f"only the decode kernel (T == 1) reads a quantized KV cache, T = {q.shape[1]}"
    return flash_attention.check_supported(q, k, v)


def cudnn_unsupported(q, k, v) -> str | None:
    dev = _devices()[0]
    if dev.platform != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU; this is {dev.platform}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs bfloat16 or float16, got {jnp.dtype(q.dtype).name}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"cuDNN attention needs head_dim <= 256 and a multiple of 8, got {q.shape[-1]}"
    if q.shape[2] % k.shape[2]:
        return f"kv heads {k.shape[2]} must divide query heads {q.shape[2]}"
    return None


# ---- implementations (per shard) -------------------------------------------------------
# jit-wrapped so that identical calls (every layer of an unrolled model) trace to one jaxpr,
# which jax lowers once: the Mosaic GPU kernel is built once, not once per layer.
@functools.partial(jax.jit, static_argnames=("causal", "scale", "static_window", "softcap"))
def _pallas(q, k, v, q_positions, kv_lengths, layer=None, k_scale=None, v_scale=None,
            alibi_slopes=None, window=None, span_lo=None, span_lim=None, *, causal, scale,
            static_window=None, softcap=None):
    """window: a traced int32 scalar (per layer), or static_window: a Python int;
    span_lo, span_lim: attention's spans (T > 1 only)."""
    mods = {"window": static_window if static_window is not None else window,
            "softcap": softcap, "alibi_slopes": alibi_slopes}
    if q.shape[1] == 1:
        return decode_attention.decode_attention(q, k, v, q_positions, kv_lengths,
                                                 causal=causal, scale=scale, layer=layer,
                                                 k_scale=k_scale, v_scale=v_scale, **mods)
    spans = None if span_lo is None else (span_lo, span_lim)
    return flash_attention.flash_attention(q, k, v, q_positions, kv_lengths, causal=causal,
                                           scale=scale, spans=spans, **mods)


def _cudnn(q, k, v, q_positions, kv_lengths, span_lo=None, span_lim=None, *, causal, scale):
    B, T = q.shape[:2]
    S = k.shape[1]
    kv_len = jnp.clip(kv_lengths.astype(jnp.int32), 0, S)
    kw = {"scale": scale, "implementation": "cudnn"}
    if span_lo is not None:  # packed rows: an explicit block-diagonal mask
        mask = attention_mask(q_positions, kv_len, S, causal, spans=(span_lo, span_lim))
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], **kw)
    if T == 1:
        # One query: causality is just a shorter valid length.
        if causal:
            kv_len = jnp.clip(jnp.minimum(kv_len, q_positions[:, 0].astype(jnp.int32) + 1), 0, S)
        return jax.nn.dot_product_attention(
            q, k, v, query_seq_lengths=jnp.ones((B,), jnp.int32),
            key_value_seq_lengths=kv_len, **kw)
    q_len = jnp.full((B,), T, jnp.int32)
    if not causal:
        return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_len,
                                            key_value_seq_lengths=kv_len, **kw)
    if T == S:  # prefill contract: q_positions == arange(T)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=q_len,
                                            key_value_seq_lengths=kv_len, **kw)
    mask = attention_mask(q_positions, kv_len, S, causal=True)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, **kw)


# ---- shard_map over the active mesh -----------------------------------------------------
def _sharded(fn, q, k, v, q_positions, kv_lengths, layer=None, scales=(), slopes=None,
             window=None, spans=None):
    """Run fn per shard: batch on `data`, heads on `tensor` (where the sizes divide).

    k, v [B, S, K, H], or [L, B, S, K, H] with `layer` (int32 scalar) naming the layer;
    scales: () or a quantized cache's (k_scale, v_scale), k's shape without H, sharded
    with it; slopes: None or ALiBi slopes [N], sharded with the query heads; window: None
    or a traced int32 scalar, replicated; spans: None or (lo, lim) [B, T], sharded with
    the rows. fn(q, k, v, q_positions, kv_lengths, layer, *scales), with alibi_slopes=,
    window=, span_lo= and span_lim= where given."""
    mesh = sharding.abstract_mesh()
    span_lo, span_lim = (None, None) if spans is None else spans
    kw = {name: a for name, a in (("alibi_slopes", slopes), ("window", window),
                                  ("span_lo", span_lo), ("span_lim", span_lim))
          if a is not None}
    if mesh is None:
        return fn(q, k, v, q_positions, kv_lengths, layer, *scales, **kw)
    stacked = layer is not None
    lead = (None,) if stacked else ()
    kv_axis = 3 if stacked else 2
    shape = dict(mesh.shape)
    dp, tp = shape.get("data", 1), shape.get("tensor", 1)
    B, _, N, _ = q.shape
    K = k.shape[kv_axis]
    G = N // K
    b_ax = "data" if dp > 1 and B % dp == 0 else None
    h_ax = "tensor" if tp > 1 and N % tp == 0 else None
    kv_ax, pick_kv = None, False
    if h_ax is not None:
        if K % tp == 0:
            kv_ax = h_ax
        elif G % (N // tp) == 0:
            pick_kv = True  # each shard's query heads share one kv head: slice it locally
        else:
            h_ax = None
    if b_ax is None and h_ax is None:
        return fn(q, k, v, q_positions, kv_lengths, layer, *scales, **kw)
    n_scales = len(scales)

    def body(q, k, v, q_positions, kv_lengths, layer, *rest):
        scales, kw = rest[:n_scales], dict(zip(kw_names, rest[n_scales:]))
        if pick_kv:
            kvh = (jax.lax.axis_index("tensor") * (N // tp)) // G
            k, v, *scales = (jax.lax.dynamic_slice_in_dim(a, kvh, 1, axis=kv_axis)
                             for a in (k, v, *scales))
        return fn(q, k, v, q_positions, kv_lengths, layer, *scales, **kw)

    names = {a for a in ("data", "tensor") if a in shape} - set(mesh.manual_axes)
    qspec = P(b_ax, None, h_ax, None)
    kvspec = P(*lead, b_ax, None, kv_ax, None)
    scale_specs = (P(*lead, b_ax, None, kv_ax),) * len(scales)
    kw_names, extra = tuple(kw), tuple(kw.values())
    extra_specs = tuple(P(h_ax) if name == "alibi_slopes" else
                        P(b_ax, None) if name.startswith("span_") else P()
                        for name in kw_names)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(qspec, kvspec, kvspec, P(b_ax, None), P(b_ax), P() if stacked else None,
                  *scale_specs, *extra_specs),
        out_specs=qspec, axis_names=names, check_vma=False,
    )(q, k, v, q_positions, kv_lengths, layer, *scales, *extra)


def attention(q, k, v, q_positions, kv_lengths, *, causal: bool, scale: float,
              backend: str = "auto", layer=None, k_scale=None, v_scale=None,
              window=None, softcap: float | None = None, alibi_slopes=None, spans=None):
    """Masked attention. q [B,T,N,H], k/v [B,S,K,H], q_positions [B,T], kv_lengths [B].

    With `layer` (an int32 scalar), k and v are a stacked cache [L, B, S, K, H] and the call
    attends over layer `layer`: the decode kernel reads it in place, other paths slice it.
    With k_scale and v_scale ([B, S, K], or [L, B, S, K] with `layer`), k and v are the codes
    of a quantized cache (cache.py). Decode (T == 1) runs the Pallas decode kernel, which
    converts the code tiles it streams in shared memory and folds the scales into the
    score and probability columns; "auto" takes it where
    supported and QUANT_KERNEL_MIN_GROUP query heads share a kv head, else (and with "xla")
    XLA dots that read the codes once (reference.py). cudnn reads float caches only.
    window W (a Python int, or an int32 scalar that may differ per layer): a query at
    position p sees keys p - W < s only (the kernels never load the kv blocks wholly before
    the window); softcap C: scores -> C tanh(scores / C) after
    scaling, before the mask; alibi_slopes [N] f32: scores += slopes[n] * (s - p). xla and
    pallas take all three; cudnn none.
    spans (lo, lim) [B, T] int32 (packed rows, cache.Write.packed): query t sees only keys
    lo[b, t] <= s <= lim[b, t]; xla and pallas (T > 1) skip what lies outside, cudnn gets
    an explicit mask; not with a cache (layer) or a quantized one.
    Returns [B, T, N, H] in q's dtype. An explicit backend that cannot take the call raises
    ValueError naming what is unsupported; "auto" falls back to "xla" and logs why, once.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    bad = check_mods(window, softcap, alibi_slopes, q.shape[2])
    if bad is not None:
        raise ValueError(f"attention: {bad}")
    mods = {"window": window, "softcap": softcap}
    # the kernels take a Python int window as a constant, a traced one as an operand
    static_w = int(window) if isinstance(window, (int, np.integer)) else None
    kmods = {"static_window": static_w, "softcap": softcap}
    dyn_w = None if static_w is not None else window
    if backend == "cudnn" and any(x is not None for x in (window, softcap, alibi_slopes)):
        raise ValueError("attention backend 'cudnn' does not take window, softcap "
                         "or alibi_slopes; use 'auto', 'pallas' or 'xla'")
    if spans is not None:
        if layer is not None or k_scale is not None:
            raise ValueError("attention: spans (packed rows) attend within the new keys, not "
                             "over a cache")
        if tuple(spans[0].shape) != tuple(q.shape[:2]) or \
                tuple(spans[1].shape) != tuple(q.shape[:2]):
            raise ValueError(f"attention: spans must be two [B, T] = {tuple(q.shape[:2])} "
                             f"arrays, got {[tuple(a.shape) for a in spans]}")

    def one_layer(a, layer):  # what the support checks look at: one layer's shapes
        return a if layer is None else jax.ShapeDtypeStruct(a.shape[1:], a.dtype)

    if k_scale is not None:
        if backend == "cudnn":
            raise ValueError(f"attention backend 'cudnn' does not read a quantized KV cache "
                             f"({jnp.dtype(k.dtype).name} codes); use 'auto', 'pallas' or "
                             f"'xla'")
        if backend in ("auto", "pallas"):
            reason = pallas_unsupported(q, one_layer(k, layer), one_layer(v, layer), True)
            if backend == "pallas" and reason is not None:
                raise ValueError(f"attention backend 'pallas' does not support this call: "
                                 f"{reason}")
            group = q.shape[2] // k.shape[-2]
            if backend == "pallas" or (reason is None and group >= QUANT_KERNEL_MIN_GROUP):
                def fn(q, k, v, q_positions, kv_lengths, layer, k_scale, v_scale,
                       alibi_slopes=None, window=None):
                    return _pallas(q, k, v, q_positions, kv_lengths, layer, k_scale, v_scale,
                                   alibi_slopes, window, causal=causal, scale=scale, **kmods)
                return _sharded(fn, q, k, v, q_positions, kv_lengths, layer,
                                (k_scale, v_scale), alibi_slopes, dyn_w)
        if layer is not None:
            k, v, k_scale, v_scale = (read_layer(a, layer) for a in (k, v, k_scale, v_scale))
        return attention_reference(q, k, v, q_positions, kv_lengths, causal=causal,
                                   scale=scale, k_scale=k_scale, v_scale=v_scale,
                                   alibi_slopes=alibi_slopes, **mods)

    if backend == "auto":
        reason = pallas_unsupported(q, one_layer(k, layer), one_layer(v, layer))
        if reason is None and spans is not None and q.shape[1] == 1:
            reason = "spans (packed rows) need T > 1 (the prefill kernel)"
        if reason is not None:
            _log_once(f"attention backend 'auto' uses xla: {reason}")
        backend = "xla" if reason is not None else "pallas"
    if layer is not None and not (backend == "pallas" and q.shape[1] == 1):
        k, v, layer = read_layer(k, layer), read_layer(v, layer), None
    if backend == "xla":
        return attention_reference(q, k, v, q_positions, kv_lengths, causal=causal, scale=scale,
                                   alibi_slopes=alibi_slopes, spans=spans, **mods)
    check = pallas_unsupported if backend == "pallas" else cudnn_unsupported
    reason = check(q, one_layer(k, layer), one_layer(v, layer))
    if reason is None and backend == "pallas" and spans is not None and q.shape[1] == 1:
        reason = "spans (packed rows) need T > 1 (the prefill kernel)"
    if reason is not None:
        raise ValueError(f"attention backend {backend!r} does not support this call: {reason}")

    if backend == "pallas":
        def fn(q, k, v, q_positions, kv_lengths, layer, alibi_slopes=None, window=None,
               span_lo=None, span_lim=None):
            return _pallas(q, k, v, q_positions, kv_lengths, layer, alibi_slopes=alibi_slopes,
                           window=window, span_lo=span_lo, span_lim=span_lim, causal=causal,
                           scale=scale, **kmods)
    else:
        def fn(q, k, v, q_positions, kv_lengths, layer, span_lo=None, span_lim=None):
            return _cudnn(q, k, v, q_positions, kv_lengths, span_lo, span_lim, causal=causal,
                          scale=scale)
    return _sharded(fn, q, k, v, q_positions, kv_lengths, layer, slopes=alibi_slopes,
                    window=dyn_w, spans=spans)


# ---- paged KV pools (kernels/paged_attention.py) ------------------------------------------
@functools.partial(jax.jit, static_argnames=("scale", "static_window", "softcap"))
def _paged_pallas(q, k_pool, v_pool, pages, q_positions, kv_lengths, layer, k_scale=None,
                  v_scale=None, alibi_slopes=None, window=None, *, scale, static_window=None,
                  softcap=None):
    """window: a traced int32 scalar (per layer), or static_window: a Python int."""
    mods = {"window": static_window if static_window is not None else window,
            "softcap": softcap, "alibi_slopes": alibi_slopes}
    if q.shape[1] > 1:
        return paged.paged_prefill_attention(q, k_pool, v_pool, pages, q_positions,
                                             kv_lengths, scale=scale, layer=layer, **mods)
    return paged.paged_decode_attention(q, k_pool, v_pool, pages, q_positions, kv_lengths,
                                        scale=scale, layer=layer, k_scale=k_scale,
                                        v_scale=v_scale, **mods)


def _sharded_paged(fn, q, k_pool, v_pool, pages, q_positions, kv_lengths, layer, scales=(),
                   slopes=None, window=None):
    """Run fn per shard of the active mesh: rows on `data` with the pool's pages, kv heads
    on `tensor` (or, tensor > K, each shard slices the one kv head its query heads read).

    Data parallelism: each data shard owns its own P / data pages, and the page ids in its
    rows' page tables are local to that shard (0 .. P / data - 1). The pool [L, P, ps, K, H]
    is sharded P on `data`, K on `tensor`; pages [B, M] and the rows on `data`. slopes:
    None or ALiBi slopes [N], sharded with the query heads; window: None or a traced int32
    scalar, replicated. fn(..., layer, *scales) with alibi_slopes= and window= where given."""
    mesh = sharding.abstract_mesh()
    kw = {name: a for name, a in (("alibi_slopes", slopes), ("window", window))
          if a is not None}
    if mesh is None:
        return fn(q, k_pool, v_pool, pages, q_positions, kv_lengths, layer, *scales, **kw)
    shape = dict(mesh.shape)
    dp, tp = shape.get("data", 1), shape.get("tensor", 1)
    B, _, N, _ = q.shape
    Pn, K = k_pool.shape[1], k_pool.shape[3]
    G = N // K
    if dp > 1 and (B % dp or Pn % dp):
        raise ValueError(f"paged attention over data = {dp} shards needs batch rows {B} and "
                         f"pool pages {Pn} divisible by {dp} (each shard owns its pages)")
    b_ax = "data" if dp > 1 else None
    h_ax = "tensor" if tp > 1 and N % tp == 0 else None
    kv_ax, pick_kv = None, False
    if h_ax is not None:
        if K % tp == 0:
            kv_ax = h_ax
        elif G % (N // tp) == 0:
            pick_kv = True
        else:
            h_ax = None
    if b_ax is None and h_ax is None:
        return fn(q, k_pool, v_pool, pages, q_positions, kv_lengths, layer, *scales, **kw)
    n_scales = len(scales)
    kw_names, extra = tuple(kw), tuple(kw.values())

    def body(q, k_pool, v_pool, pages, q_positions, kv_lengths, layer, *rest):
        scales, kw = rest[:n_scales], dict(zip(kw_names, rest[n_scales:]))
        if pick_kv:
            kvh = (jax.lax.axis_index("tensor") * (N // tp)) // G
            k_pool, v_pool, *scales = (jax.lax.dynamic_slice_in_dim(a, kvh, 1, axis=3)
                                       for a in (k_pool, v_pool, *scales))
        return fn(q, k_pool, v_pool, pages, q_positions, kv_lengths, layer, *scales, **kw)

    names = {a for a in ("data", "tensor") if a in shape} - set(mesh.manual_axes)
    qspec = P(b_ax, None, h_ax, None)
    pool = P(None, b_ax, None, kv_ax, None)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(qspec, pool, pool, P(b_ax, None), P(b_ax, None), P(b_ax), P(),
                  *((P(None, b_ax, None, kv_ax),) * len(scales)),
                  *(P(h_ax) if name == "alibi_slopes" else P() for name in kw_names)),
        out_specs=qspec, axis_names=names, check_vma=False,
    )(q, k_pool, v_pool, pages, q_positions, kv_lengths, layer, *scales, *extra)


def paged_attention(q, k_pool, v_pool, pages, q_positions, kv_lengths, *, scale: float,
                    backend: str = "auto", layer=None, k_scale=None, v_scale=None,
                    window=None, softcap: float | None = None, alibi_slopes=None):
    """Causal attention of q [B, T, N, H] over each row's pages of a KV pool.

    Layout (kernels/paged_attention.py): pools [L, P, ps, K, H] read at `layer` (int32
    scalar; None: one layer's [P, ps, K, H]), quantized codes with k_scale, v_scale (the
    pools' shape without H), pages [B, M] int32, q_positions [B, T], kv_lengths [B].
    backend "auto" / "pallas" on Hopper: the paged decode kernel for T == 1; for T > 1
    (prefill chunks, float pools) the rows' pages gathered into a contiguous cache and the
    flash prefill kernel ("pallas" raises ValueError where neither can run; "auto" falls
    back to the reference and logs why once); "xla" and every other case (CPU, quantized
    prefill chunks): the reference, which gathers the rows' pages. "cudnn" is refused.
    Sharded over the active mesh as _sharded_paged says (data shards own their pages).
    window (a Python int or an int32 scalar), softcap, alibi_slopes [N]: as attention(),
    over the keys' positions in their sequence (every backend takes them).
    Returns [B, T, N, H] in q's dtype.
    """
    if backend not in ("auto", "xla", "pallas"):
        raise ValueError(f"paged attention backend must be auto, xla or pallas, got "
                         f"{backend!r}")
    layered = layer is not None
    paged.check_paged(q, k_pool, v_pool, pages, q_positions, kv_lengths, k_scale, v_scale,
                      layered=layered)
    bad = check_mods(window, softcap, alibi_slopes, q.shape[2])
    if bad is not None:
        raise ValueError(f"paged attention: {bad}")
    # the kernels take a Python int window as a constant, a traced one as an operand
    static_w = int(window) if isinstance(window, (int, np.integer)) else None
    dyn_w = None if static_w is not None else window
    if not layered:
        k_pool, v_pool = k_pool[None], v_pool[None]
        if k_scale is not None:
            k_scale, v_scale = k_scale[None], v_scale[None]
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    quant = k_scale is not None
    reason = None
    if backend != "xla":
        dev = _devices()[0]
        if not is_hopper(dev):
            reason = (f"the paged kernel needs a Hopper GPU (sm_90); this is {dev.platform} "
                      f"{getattr(dev, 'device_kind', '')}".rstrip())
        elif q.shape[1] != 1:  # prefill chunk: the gathered pages through the flash kernel
            one = jax.ShapeDtypeStruct((q.shape[0],) + k_pool.shape[2:], k_pool.dtype)
            reason = ("only the decode kernel (T == 1) reads a quantized pool" if quant else
                      flash_attention.check_supported(q, one, one))
        else:
            reason = paged.check_supported(q, k_pool, v_pool, quant)
        if backend == "pallas" and reason is not None:
            raise ValueError(f"paged attention backend 'pallas' does not support this call: "
                             f"{reason}")
        if reason is not None:
            _log_once(f"paged attention backend 'auto' uses xla: {reason}")
    scales = (k_scale, v_scale) if quant else ()
    if backend != "xla" and reason is None:
        def fn(q, kp, vp, pages, pos, kvl, layer, *sc, alibi_slopes=None, window=None):
            ks, vs = sc if sc else (None, None)
            return _paged_pallas(q, kp, vp, pages, pos, kvl, layer, ks, vs, alibi_slopes,
                                 window, scale=scale, static_window=static_w, softcap=softcap)
    else:
        def fn(q, kp, vp, pages, pos, kvl, layer, *sc, alibi_slopes=None, window=None):
            ks, vs = sc if sc else (None, None)
            w = static_w if static_w is not None else window
            return paged.paged_attention_reference(q, kp, vp, pages, pos, kvl, scale=scale,
                                                   layer=layer, k_scale=ks, v_scale=vs,
                                                   window=w, softcap=softcap,
                                                   alibi_slopes=alibi_slopes)
    return _sharded_paged(fn, q, k_pool, v_pool, pages.astype(jnp.int32),
                          q_positions.astype(jnp.int32), kv_lengths.astype(jnp.int32), layer,
                          scales, alibi_slopes, dyn_w)
