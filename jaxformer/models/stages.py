"""Pipeline stages of the layer stack over the `pipe` mesh axis, inside one compiled program.

Block weights are stacked on a leading `layers` axis that the rules map to `pipe`, so stage s
holds layers [s * L/S, (s + 1) * L/S) and their KV cache. The stages run under
`jax.shard_map` that is manual over `pipe` only: `data` and `tensor` stay automatic, so XLA
still places the tensor-parallel collectives inside every stage. Activations move stage to
stage with `ppermute`; `lax.axis_index("pipe")` selects stage-specific work. The batch is
split into M microbatches of interleaved rows (microbatch m = rows m, M + m, 2M + m, ...),
which keeps each microbatch split over `data` without moving data.

Full-sequence forward (logits, encode, prefill: any run of the layer stack while the active
mesh has stages): GPipe. Stage s runs microbatch t - s at tick t, for M + S - 1 ticks; the
bubble is (S - 1) / (M + S - 1), so large batches of prompts use up to 4 S microbatches (of
at least 256 tokens each). Embedding and head run outside the staged region on the
pipe-replicated activations. Prefill chunks over a paged KV pool (PagedEngine) run the
same schedule; every microbatch reads and writes the stage's pool through its rows' page
tables (page tables are shared by all stages, each stage holding its layers' pages). The
decode schedule that keeps S microbatches in flight across
steps is the runtime's (jaxformer/pipeline.py), built on the helpers here.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxformer import sharding as shd

PIPE = "pipe"
GPIPE_MICROBATCHES = 4  # full-sequence forwards use up to this many microbatches per stage
GPIPE_MIN_TOKENS = 256  # ... as long as each holds this many tokens


# ---- the stage split ---------------------------------------------------------------------
def num_stages(mesh) -> int:
    return 1 if mesh is None else int(dict(mesh.shape).get(PIPE, 1))


def check_split(num_layers: int, stages: int, rules=None) -> int:
    """Layers per stage; refuses uneven splits and rules that keep `layers` off `pipe`."""
    if rules is not None and stages > 1 and PIPE not in shd._as_tuple(rules.get("layers")):
        raise ValueError(f"pipeline: the mesh has pipe={stages} stages but the sharding rules "
                         f"map 'layers' to {rules.get('layers')!r}; pipeline parallelism needs "
                         f"'layers: pipe'")
    if num_layers % stages:
        raise ValueError(f"pipeline: num_layers={num_layers} cannot be split evenly over "
                         f"pipe={stages} stages; choose a pipe size that divides {num_layers}")
    return num_layers // stages


def num_microbatches(batch: int, limit: int, data: int = 1) -> int:
    """The largest M <= limit dividing `batch`, preferring microbatches that `data` divides."""
    cands = [m for m in range(min(limit, batch), 0, -1) if batch % m == 0]
    for m in cands:
        if (batch // m) % data == 0:
            return m
    return cands[0]


def pipe_spec(axes, rules) -> P:
    """The part of a logical-axes tuple's PartitionSpec that names `pipe` (other axes auto)."""
    return P(*(PIPE if a is not None and PIPE in shd._as_tuple(rules.get(a)) else None
               for a in axes))


def layers_fn(default):
    """`run_stages` when the context mesh (jax's abstract mesh) has pipeline stages, else
    `default` (also inside a stage, where `pipe` is already manual)."""
    if num_stages(shd.abstract_mesh()) == 1 or PIPE in shd.manual_axes():
        return default
    return run_stages


# ---- microbatch views: row i * M + m of a [B, ...] array is row i of microbatch m ---------
def _take(a, m, M, axis=0):
    """a [..., B, ...] (batch at `axis`) -> microbatch m [..., B/M, ...]."""
    shape = a.shape[:axis] + (a.shape[axis] // M, M) + a.shape[axis + 1:]
    return lax.dynamic_index_in_dim(a.reshape(shape), m, axis + 1, keepdims=False)


def _put(a, m, v, M, axis=0):
    shape = a.shape[:axis] + (a.shape[axis] // M, M) + a.shape[axis + 1:]
    out = lax.dynamic_update_index_in_dim(a.reshape(shape), v.astype(a.dtype), m, axis + 1)
    return out.reshape(a.shape)


def _stage_context(mesh, rules):
    """shard_map over `pipe` only, checks off (stage-varying values are the point).

    Inside, jax's context mesh is the same mesh with `pipe` manual, so the body's sharding
    constraints (sharding.shard) and kernels see the stage's view of it.
    """
    data = shd.mesh_size(mesh, rules.get("batch"))

    def smap(body, **specs):
        return jax.shard_map(body, mesh=mesh, axis_names={PIPE}, check_vma=False, **specs)

    return smap, data


# ---- GPipe full-sequence forward ---------------------------------------------------------
def run_stages(blocks, x, positions, kv_lengths, cache=None, at=None, *, backend="auto",
               layer_count: int, run_blocks):
    """The staged twin of stack.run_blocks (which runs each stage's blocks): same arguments
    and results. x [B, T, D]; positions [B, T]; kv_lengths [B]; cache None, a KVCache or a
    PagedKVCache (with at.pages), L on `pipe`; at: a cache.Write. Returns (x [B, T, D], new
    cache or None).
    """
    mesh, rules = shd.abstract_mesh(), shd.rules()
    S = num_stages(mesh)
    graphdef, state = nnx.split(blocks)
    check_split(layer_count, S, rules)
    smap, data = _stage_context(mesh, rules)
    B, T = x.shape[:2]
    # More microbatches shrink the bubble (S - 1) / (M + S - 1), while each keeps at least
    # GPIPE_MIN_TOKENS tokens so its matmuls stay efficient.
    M = num_microbatches(B, max(S, min(GPIPE_MICROBATCHES * S, B * T // GPIPE_MIN_TOKENS)),
                         data)

    # A paged pool (at.pages set) is shared by every row: each microbatch reads and writes
    # the whole pool through its rows' page tables, and a bubble tick writes to the null
    # page 0 only (its rows' tables masked), so no select over the pool is needed.
    paged = at is not None and at.pages is not None

    def body(state, x, positions, kv_lengths, cache, at):
        s = lax.axis_index(PIPE)
        stage = nnx.merge(graphdef, state)
        pick = lambda a, m: None if a is None else _take(a, m, M)

        def tick(t, carry):
            h_in, cache, out = carry
            m = t - s
            valid = (m >= 0) & (m < M)
            m = jnp.clip(m, 0, M - 1)
            h = jnp.where(s == 0, pick(x, m), h_in)
            at_m = None if at is None else jax.tree.map(lambda a: pick(a, m) if a.ndim else a, at)
            if paged:
                old = cache
                at_m = dataclasses.replace(at_m, pages=jnp.where(valid, at_m.pages, 0))
            else:
                old = None if cache is None else cache.map(lambda c: _take(c, m, M, axis=1))
            h, new = run_blocks(stage, h, pick(positions, m), pick(kv_lengths, m), old, at_m,
                                backend=backend)
            if paged:
                cache = new
            elif cache is not None:
                cache = jax.tree.map(lambda c, n, o: _put(c, m, jnp.where(valid, n, o), M,
                                                          axis=1), cache, new, old)
            keep = valid & (s == S - 1)
            out = _put(out, m, jnp.where(keep, h, _take(out, m, M)), M)
            h_next = lax.ppermute(h, PIPE, [(i, i + 1) for i in range(S - 1)])
            return h_next, cache, out

        h0 = jnp.zeros((B // M,) + x.shape[1:], x.dtype)
        _, cache, out = lax.fori_loop(0, M + S - 1, tick, (h0, cache, jnp.zeros_like(x)))
        # only the last stage holds the result; a masked psum hands it to every stage
        out = lax.psum(jnp.where(s == S - 1, out, jnp.zeros_like(out)), PIPE)
        return out, cache

    cspec = None if cache is None else cache.map(lambda _: P(PIPE))
    aspec = None if at is None else jax.tree.map(lambda _: P(), at)
    fn = smap(body, in_specs=(P(PIPE), P(), P(), P(), cspec, aspec), out_specs=(P(), cspec))
    return fn(state, x, positions, kv_lengths, cache, at)
