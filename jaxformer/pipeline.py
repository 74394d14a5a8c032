"""Pipeline parallelism over the `pipe` mesh axis, inside one compiled program.

Block weights are stacked on a leading `layers` axis that the rules map to `pipe`, so stage s
holds layers [s * L/S, (s + 1) * L/S) and their KV cache. The stages run under
`jax.shard_map` that is manual over `pipe` only: `data` and `tensor` stay automatic, so XLA
still places the tensor-parallel collectives inside every stage. Activations move stage to
stage with `ppermute`; `lax.axis_index("pipe")` selects stage-specific work. The batch is
split into M microbatches of interleaved rows (microbatch m = rows m, M + m, 2M + m, ...),
which keeps each microbatch split over `data` without moving data.

Full-sequence forward (logits, encode, prefill, and any other `Transformer.trunk` call while
the active mesh has stages): GPipe. Stage s runs microbatch t - s at tick t, for
M + S - 1 ticks; the bubble is (S - 1) / (M + S - 1), so large batches of prompts use up to
4 S microbatches (of at least 256 tokens each). Embedding and head run outside the staged
region on the pipe-replicated activations.

Decode (`make_decode_loop`): the circular schedule. M = S microbatches stay in flight across
steps in one `lax.while_loop`; at tick t stage s runs microbatch (t - s) mod S. Stage 0 embeds
the token, the last stage applies the head, samples and records, and a circular `ppermute`
hands the new token back to stage 0, which needs exactly that microbatch at tick t + 1:

    S = 3 stages, microbatches a b c; a1 = microbatch a's first decode step, ...

    tick       0    1    2    3    4    5    6    7    8
    stage 0   a1   b1   c1   a2   b2   c2   a3   b3   c3      embeds the token
    stage 1        a1   b1   c1   a2   b2   c2   a3   b3
    stage 2             a1   b1   c1   a2   b2   c2   a3      head, sample, record
                        |
                        +--> a's new token, ppermute 2 -> 0, fed as a2 at tick 3

Once the pipe is full every stage is busy every tick. Stage-specific work is computed by
every stage and selected by the stage index: a lax.cond would hold collectives that only one
stage runs (XLA may lay them over all devices and deadlock), and the last stage, which does
the most, sets the pace anyway. A microbatch whose rows are all done
(stop token, stop sequence, max_new_tokens) is no longer injected; the loop ends when no
microbatch is in flight. With fewer rows than stages (M < S) stage 0 idles S - M ticks per
round: a batch of one is inherently sequential over the stages.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import AxisType, Mesh
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
    """`run_stages` when the active mesh (sharding.use) has pipeline stages, else `default`
    (also inside a stage, where `pipe` is already manual)."""
    mesh, _ = shd.current()
    if num_stages(mesh) == 1:
        return default
    inside = dict(zip(mesh.axis_names, mesh.axis_types)).get(PIPE) == AxisType.Manual
    return default if inside else run_stages


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

    Inside, sharding constraints (sharding.shard) must name a mesh whose `pipe` axis is
    manual, like the context's, so the body runs under sharding.use(<that mesh>, rules).
    """
    data = shd.mesh_size(mesh, rules.get("batch"))
    types = tuple(AxisType.Manual if n == PIPE else t
                  for n, t in zip(mesh.axis_names, mesh.axis_types))
    inside = Mesh(mesh.devices, mesh.axis_names, axis_types=types)

    def smap(body, **specs):
        def inner(*args):
            with shd.use(inside, rules):
                return body(*args)
        return jax.shard_map(inner, mesh=mesh, axis_names={PIPE}, check_vma=False, **specs)

    return smap, data


# ---- GPipe full-sequence forward ---------------------------------------------------------
def run_stages(blocks, x, positions, kv_lengths, cache=None, start=None, *, backend="auto"):
    """The staged twin of models.transformer.run_blocks (same arguments and results).

    x [B, T, D]; positions [B, T]; kv_lengths [B]; cache None or (k, v) each [L, B, S, K, H]
    with L on `pipe`; start None or [B]. Returns (x [B, T, D], new (k, v) or None).
    """
    from jaxformer.models.transformer import run_blocks

    mesh, rules = shd.current()
    S = num_stages(mesh)
    graphdef, state = nnx.split(blocks)
    lead = jax.tree.leaves(state)[0].shape[0]  # stacked: L; unrolled: S per position
    L = len(blocks) * lead if isinstance(blocks, nnx.List) else lead
    check_split(L, S, rules)
    smap, data = _stage_context(mesh, rules)
    B, T = x.shape[:2]
    # More microbatches shrink the bubble (S - 1) / (M + S - 1), while each keeps at least
    # GPIPE_MIN_TOKENS tokens so its matmuls stay efficient.
    M = num_microbatches(B, max(S, min(GPIPE_MICROBATCHES * S, B * T // GPIPE_MIN_TOKENS)),
                         data)

    def body(state, x, positions, kv_lengths, cache, start):
        s = lax.axis_index(PIPE)
        stage = nnx.merge(graphdef, state)
        pick = lambda a, m: None if a is None else _take(a, m, M)

        def tick(t, carry):
            h_in, cache, out = carry
            m = t - s
            valid = (m >= 0) & (m < M)
            m = jnp.clip(m, 0, M - 1)
            h = jnp.where(s == 0, pick(x, m), h_in)
            old = None if cache is None else tuple(_take(c, m, M, axis=1) for c in cache)
            h, new = run_blocks(stage, h, pick(positions, m), pick(kv_lengths, m), old,
                                pick(start, m), backend=backend)
            if cache is not None:
                cache = tuple(_put(c, m, jnp.where(valid, n, o), M, axis=1)
                              for c, n, o in zip(cache, new, old))
            keep = valid & (s == S - 1)
            out = _put(out, m, jnp.where(keep, h, _take(out, m, M)), M)
            h_next = lax.ppermute(h, PIPE, [(i, i + 1) for i in range(S - 1)])
            return h_next, cache, out

        h0 = jnp.zeros((B // M,) + x.shape[1:], x.dtype)
        _, cache, out = lax.fori_loop(0, M + S - 1, tick, (h0, cache, jnp.zeros_like(x)))
        # only the last stage holds the result; a masked psum hands it to every stage
        out = lax.psum(jnp.where(s == S - 1, out, jnp.zeros_like(out)), PIPE)
        return out, cache

    cache = None if cache is None else tuple(cache)
    cspec = None if cache is None else tuple(P(PIPE) for _ in cache)
    fn = smap(body, in_specs=(P(PIPE), P(), P(), P(), cspec, P()), out_specs=(P(), cspec))
    return fn(state, x, positions, kv_lengths, cache, start)


# ---- circular decode ---------------------------------------------------------------------
class _Packet(NamedTuple):
    """What stage s hands stage s + 1 each tick (the last stage hands stage 0 the token)."""
    h: jax.Array  # [b, 1, D] activations
    tok: jax.Array  # [b] int32 sampled token (last -> first)
    lengths: jax.Array  # [b] int32 cache slot being written (last -> first: the next one)
    valid: jax.Array  # [] int32 a real microbatch, not a bubble
    active: jax.Array  # [] int32 (last -> first) the microbatch wants another step


def make_decode_loop(model, feats):
    """The pipelined twin of generate.make_decode_loop: jit(loop(params, state, req, until)).

    Same DecodeState in and out (cache donated) and exactly the tokens of the unpipelined
    loop: rows use the same per-row keys (by global row index and step), the same sampler
    and the same bookkeeping (generate._record), applied per microbatch.
    """
    from jaxformer import cache as kvc
    gen = importlib.import_module("jaxformer.generate")  # the package re-exports generate()
    from jaxformer.models import param_axes
    from jaxformer.models.transformer import run_blocks
    from jaxformer.sampling import RowParams, sample

    cfg, mesh, rules = model.config, model.mesh, model.rules
    S = num_stages(mesh)
    check_split(cfg.num_layers, S, rules)
    smap, data = _stage_context(mesh, rules)
    backend = model.run.attention
    pspecs = jax.tree.map(lambda a: pipe_spec(a, rules),
                          param_axes(cfg, model.run.quantize, model.stages),
                          is_leaf=lambda a: isinstance(a, tuple))
    cspec = pipe_spec(kvc.CACHE_AXES, rules)
    sspec = pipe_spec(kvc.SCALE_AXES, rules)

    def body(params, cache, book, req, until):
        s = lax.axis_index(PIPE)
        first, last = s == 0, s == S - 1
        net = _module(model, params)
        B = book.last.shape[0]
        M = num_microbatches(B, S, data)
        b = B // M
        take = lambda a, m: _take(a, m, M)
        rep = lambda a: shd.shard(a, (None,) * a.ndim)

        def record(args):
            """Last stage: head, sample and bookkeeping for microbatch m."""
            book, mb_step, h, m, lens = args
            x = net.final_norm(h) if cfg.final_norm else h
            # Sampling and bookkeeping run on replicated rows (`rep`): XLA's SPMD partitioner
            # (jax 0.10) crashes on the sampler's sorts, gathers and scatters over data- or
            # tensor-sharded rows inside the pipe-manual region. They are small ([b, V]).
            logits = rep(net.head(x)[:, 0])  # [b, Vp] float32
            step = mb_step[m]
            rows = jnp.arange(b) * M + m
            keys = gen._row_keys(req.key, step, B)[rows]
            sub = book._replace(step=step, cache=None, **{
                f: rep(take(v, m)) for f, v in zip(book._fields, book)
                if f not in ("cache", "step") and v is not None and v.ndim})
            rq = req._replace(params=RowParams(*(rep(take(a, m)) for a in req.params)),
                              stop_ids=rep(take(req.stop_ids, m)),
                              stop_seqs=rep(take(req.stop_seqs, m)))
            tok, lp = sample(logits, rq.params, feats, keys, sub.seen, sub.counts)
            sub = sub._replace(lengths=lens + (~sub.done).astype(jnp.int32))
            sub = gen._record(sub, tok, lp, rq)
            book = book._replace(**{
                f: _put(v, m, getattr(sub, f), M) for f, v in zip(book._fields, book)
                if f not in ("cache", "step") and v is not None and v.ndim})
            active = (sub.step < until) & ~sub.done.all()
            return (book, mb_step.at[m].set(sub.step), sub.last, sub.lengths,
                    active.astype(jnp.int32))

        def skip(args):
            book, mb_step, _, _, lens = args
            return book, mb_step, jnp.zeros((b,), jnp.int32), lens, jnp.int32(0)

        def tick(t, carry):
            cache, slots, book, mb_step, active, pkt = carry
            tau = t - s
            m = jnp.clip(tau % S, 0, M - 1)
            # stage 0: the packet from the last stage is microbatch m's new token (or a bubble)
            got = pkt.valid > 0
            act_m = jnp.where(got, pkt.active > 0, active[m])
            active = jnp.where(first & got, active.at[m].set(act_m), active)
            inject = (tau >= 0) & (tau % S < M) & act_m
            valid = jnp.where(first, inject, got)
            tok = jnp.where(got, pkt.tok, take(book.last, m))
            lens = jnp.where(first & ~got, take(book.lengths, m), pkt.lengths)
            h = jnp.where(first, net.embed(tok[:, None], lens[:, None]), pkt.h)
            # A bubble writes its garbage keys at each row's next slot, which the row's next
            # real step overwrites before anything reads it: no select over the cache.
            at = jnp.where(valid, lens, take(slots, m))
            # cache [Ls * M, b, S, K, H]: layer l of microbatch m at l * M + m (below), read
            # and written in place by each layer
            h, cache = run_blocks(net.layers, h, at[:, None], at + 1, cache, at,
                                  backend=backend, cache_layer=lambda l: l * M + m)
            slots = jnp.where(valid, _put(slots, m, lens + 1, M), slots)
            # Every stage computes the last stage's work and keeps it only there: a lax.cond on
            # the stage would hold collectives that XLA may lay over all devices (deadlock),
            # and the slowest stage (the last) sets the tick anyway.
            args = (book, mb_step, h, m, lens)
            book, mb_step, out_tok, out_lens, out_act = jax.tree.map(
                lambda a, b: jnp.where(last & valid, a, b), record(args), skip(args))
            send = _Packet(h, out_tok, out_lens, valid.astype(jnp.int32), out_act)
            pkt = lax.ppermute(send, PIPE, [(i, (i + 1) % S) for i in range(S)])
            return cache, slots, book, mb_step, active, pkt

        def round_(carry):
            t, _, inner = carry
            inner = lax.fori_loop(t, t + S, tick, inner)
            *_, active, pkt = inner
            busy = (pkt.valid > 0) | (first & active.any())
            busy = lax.pmax(busy.astype(jnp.int32), PIPE) > 0
            return t + S, busy, inner

        rows_done = book.done.reshape(b, M).all(0)
        active = (book.step < until) & ~rows_done  # [M], identical on every stage
        D = cfg.hidden_size
        pkt = _Packet(jnp.zeros((b, 1, D), model.run.dtype), jnp.zeros((b,), jnp.int32),
                      jnp.zeros((b,), jnp.int32), jnp.int32(0), jnp.int32(0))
        mb_step = jnp.full((M,), book.step, jnp.int32)
        # cache [Ls, B, S, K, H] -> [Ls * M, b, S, K, H]: layer l of microbatch m at l * M + m,
        # so a layer reads and writes its microbatch's rows in place (one transpose per call
        # here instead of a copy of those rows per layer and tick).
        Ls = cache[0].shape[0]
        cache = tuple(c.reshape(Ls, b, M, *c.shape[2:]).swapaxes(1, 2)
                      .reshape(Ls * M, b, *c.shape[2:]) for c in cache)
        inner = (cache, book.lengths, book, mb_step, active, pkt)
        _, _, inner = lax.while_loop(lambda c: c[1], round_, (jnp.int32(0), active.any(), inner))
        cache, _, book, mb_step, _, _ = inner
        cache = tuple(c.reshape(Ls, M, b, *c.shape[2:]).swapaxes(1, 2)
                      .reshape(Ls, B, *c.shape[2:]) for c in cache)
        book = book._replace(step=mb_step.max())
        # the last stage's bookkeeping is the true one: stack per stage, slice outside
        return cache, jax.tree.map(lambda a: a[None], book)

    def loop(params, state, req, until):
        with model.traced():
            book = state._replace(cache=None)
            cache = kvc.as_tuple(state.cache)
            cspecs = tuple(cspec if c.ndim == 5 else sspec for c in cache)  # codes, scales
            fn = smap(body, in_specs=(pspecs, cspecs, P(), P(), P()),
                      out_specs=(cspecs, P(PIPE)))
            cache, stacked = fn(nnx.to_pure_dict(params), cache, book, req, until)
            book = jax.tree.map(lambda a: a[S - 1], stacked)
            return book._replace(cache=kvc.KVCache(*cache))

    return model.jit(loop, donate_argnums=(1,))


def _module(model, pure: dict):
    """The model module over a (stage-local) plain parameter dict."""
    from jaxformer.models import abstract_model

    graphdef, abstract = abstract_model(model.config, model.stages, model.run.quantize)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
