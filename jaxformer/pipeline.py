"""The pipelined decode schedule over the `pipe` mesh axis (the stage split itself, and the
GPipe forward of prefill, are the layer stack's: models/stages.py).

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

Over a paged KV pool (PagedEngine's decode) the same schedule runs on the live slots: each
stage holds its layers' pages of the one pool, the page tables are the same on every stage,
and microbatch m reads and writes the pool through its rows' tables (rows m, M + m, ...);
the serving scheduler spreads live requests over the microbatches so none is a bubble.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxformer import cache as kvc
from jaxformer import sharding as shd
from jaxformer import decode_state as ds
from jaxformer.models import abstract_model, param_axes
from jaxformer.models.stack import run_blocks
from jaxformer.models.stages import (PIPE, _put, _stage_context, _take, check_split,
                                     num_microbatches, num_stages, pipe_spec)
from jaxformer.sampling import sample, top_logprobs


class _Packet(NamedTuple):
    """What stage s hands stage s + 1 each tick (the last stage hands stage 0 the token)."""
    h: jax.Array  # [b, 1, D] activations
    tok: jax.Array  # [b] int32 sampled token (last -> first)
    lengths: jax.Array  # [b] int32 cache slot being written (last -> first: the next one)
    valid: jax.Array  # [] int32 a real microbatch, not a bubble
    active: jax.Array  # [] int32 (last -> first) the microbatch wants another step
    done: jax.Array  # [b] bool rows that are done (last -> first: after this step)


def make_decode_loop(model, feats):
    """The pipelined twin of engine.make_decode_loop: jit(loop(params, state, until)).

    Same DecodeState in and out (cache donated) and exactly the tokens of the unpipelined
    loop: rows use the same per-row keys (by their own key and generated count), the same
    sampler and the same bookkeeping (decode_state.record), applied per microbatch.
    """
    return model.jit(decode_loop(model, feats), donate_argnums=(1,))


def decode_loop(model, feats):
    """make_decode_loop's function before jit: loop(params, state, until) -> state (traced;
    the paged engine runs it over the first rows of its slots).

    The state's cache is a contiguous KVCache [L, B, S, K, H] or a paged pool
    (cache.PagedKVCache, with the rows' page tables in state.pages): the pool is not split
    by microbatch; each microbatch reads and writes it through its rows' page tables, and
    bubbles and done rows write to the null page 0 (a done row's table may still name
    pages a prompt being prefilled or the prefix cache holds).
    """

    cfg, mesh, rules = model.config, model.mesh, model.rules
    S = num_stages(mesh)
    check_split(cfg.num_layers, S, rules)
    smap, data = _stage_context(mesh, rules)
    backend = model.run.attention
    pspecs = jax.tree.map(lambda a: pipe_spec(a, rules),
                          param_axes(cfg, model.run.quantize, model.stages),
                          is_leaf=lambda a: isinstance(a, tuple))
    cspec, pspec = pipe_spec(kvc.CACHE_AXES, rules), pipe_spec(kvc.PAGE_AXES, rules)
    sspec, psspec = pipe_spec(kvc.SCALE_AXES, rules), pipe_spec(kvc.PAGE_AXES[:-1], rules)

    def body(params, cache, book, req, until):
        s = lax.axis_index(PIPE)
        first, last = s == 0, s == S - 1
        net = _module(model, params)
        B = book.last.shape[0]
        M = num_microbatches(B, S, data)
        paged = book.pages is not None
        b = B // M
        take = lambda a, m: _take(a, m, M)
        rep = lambda a: shd.shard(a, (None,) * a.ndim)

        def record(args):
            """Last stage: head, sample and bookkeeping for microbatch m."""
            book, mb_step, h, m, lens, _ = args
            x = net.final_norm(h) if cfg.final_norm else h
            # Sampling and bookkeeping run on replicated rows (`rep`): XLA's SPMD partitioner
            # (jax 0.10) crashes on the sampler's sorts, gathers and scatters over data- or
            # tensor-sharded rows inside the pipe-manual region. They are small ([b, V]).
            logits = rep(net.head(x)[:, 0])  # [b, Vp] float32
            step = mb_step[m]
            sub = book._replace(step=step, **{
                f: rep(take(v, m)) for f, v in zip(book._fields, book)
                if f not in ("cache", "step", "req") and v is not None and v.ndim})
            rq = jax.tree.map(lambda a: rep(take(a, m)), req)
            keys = ds.row_keys(rq.key, sub.generated)
            tok, lp = sample(logits, rq.params, feats, keys, sub.seen, sub.counts)
            sub = sub._replace(lengths=lens + (~sub.done).astype(jnp.int32))
            sub = ds.record(sub, tok, lp, rq, top_logprobs(logits, rq.params, feats))
            book = book._replace(**{
                f: _put(v, m, getattr(sub, f), M) for f, v in zip(book._fields, book)
                if f not in ("cache", "step", "req") and v is not None and v.ndim})
            active = (sub.step < until) & ~sub.done.all()
            return (book, mb_step.at[m].set(sub.step), sub.last, sub.lengths,
                    active.astype(jnp.int32), sub.done)

        def skip(args):
            book, mb_step, _, _, lens, done = args
            return book, mb_step, jnp.zeros((b,), jnp.int32), lens, jnp.int32(0), done

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
            done = jnp.where(first & ~got, take(book.done, m), pkt.done)
            h = jnp.where(first, net.embed(tok[:, None], lens[:, None]), pkt.h)
            # A bubble writes its garbage keys at each row's next slot, which the row's next
            # real step overwrites before anything reads it: no select over the cache.
            at = jnp.where(valid, lens, take(slots, m))
            if paged:  # the whole pool, through the rows' tables (bubbles: the null page)
                pages = jnp.where((valid & ~done)[:, None], take(book.pages, m), 0)
                write, layer_of = kvc.Write.at(at, pages), None
            else:
                # cache [Ls * M, b, S, K, H]: layer l of microbatch m at l * M + m (below),
                # read and written in place by each layer
                write, layer_of = kvc.Write.at(at), lambda l: l * M + m
            h, cache = run_blocks(net.layers, h, at[:, None], at + 1, cache, write,
                                  backend=backend, cache_layer=layer_of)
            slots = jnp.where(valid, _put(slots, m, lens + 1, M), slots)
            # Every stage computes the last stage's work and keeps it only there: a lax.cond on
            # the stage would hold collectives that XLA may lay over all devices (deadlock),
            # and the slowest stage (the last) sets the tick anyway.
            args = (book, mb_step, h, m, lens, done)
            book, mb_step, out_tok, out_lens, out_act, out_done = jax.tree.map(
                lambda a, b: jnp.where(last & valid, a, b), record(args), skip(args))
            send = _Packet(h, out_tok, out_lens, valid.astype(jnp.int32), out_act, out_done)
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
                      jnp.zeros((b,), jnp.int32), jnp.int32(0), jnp.int32(0),
                      jnp.ones((b,), bool))
        mb_step = jnp.full((M,), book.step, jnp.int32)
        # cache [Ls, B, S, K, H] -> [Ls * M, b, S, K, H]: layer l of microbatch m at l * M + m,
        # so a layer reads and writes its microbatch's rows in place (one transpose per call
        # here instead of a copy of those rows per layer and tick).
        Ls = cache.k.shape[0]
        if not paged:
            cache = cache.map(lambda c: c.reshape(Ls, b, M, *c.shape[2:]).swapaxes(1, 2)
                              .reshape(Ls * M, b, *c.shape[2:]))
        inner = (cache, book.lengths, book, mb_step, active, pkt)
        _, _, inner = lax.while_loop(lambda c: c[1], round_, (jnp.int32(0), active.any(), inner))
        cache, _, book, mb_step, _, _ = inner
        if not paged:
            cache = cache.map(lambda c: c.reshape(Ls, M, b, *c.shape[2:]).swapaxes(1, 2)
                              .reshape(Ls, B, *c.shape[2:]))
        book = book._replace(step=mb_step.max())
        # the last stage's bookkeeping is the true one: stack per stage, slice outside
        return cache, jax.tree.map(lambda a: a[None], book)

    def loop(params, state, until):
        with model.traced():
            book, req = state._replace(cache=None, req=None), state.req
            if state.pages is None:
                cspecs = state.cache.map(lambda c: cspec if c.ndim == 5 else sspec)
            else:
                cspecs = state.cache.map(lambda c: pspec if c.ndim == 5 else psspec)
            fn = smap(body, in_specs=(pspecs, cspecs, P(), P(), P()),
                      out_specs=(cspecs, P(PIPE)))
            cache, stacked = fn(nnx.to_pure_dict(params), state.cache, book, req, until)
            book = jax.tree.map(lambda a: a[S - 1], stacked)
            return book._replace(cache=cache, req=req)

    return loop


def _module(model, pure: dict):
    """The model module over a (stage-local) plain parameter dict."""
    graphdef, abstract = abstract_model(model.config, model.stages, model.run.quant_spec)
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
