"""The chunk-prefill program of a PagedEngine (paged_engine.py): prompt chunks of several
sequences run into the page pool in one call, the chunk that ends a prompt samples its first
token and makes its slot live, and, for rows that ask, each position's prompt log-probs.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformer import cache as kvc
from jaxformer.decode_state import DecodeState, Request, row_keys, stopped
from jaxformer.sampling import (TOP_LOGPROBS, Features, chosen_logprob, sample,
                                top_k_logprobs, top_logprobs)

if TYPE_CHECKING:
    from jaxformer.model import Model


# rows b x G of [V] logits one block of the prompt log-prob scan holds (_prompt_logprobs)
PROMPT_LOGIT_ROWS = 64


def make_chunk_prefill(model: Model, feats: Features, num_pages: int, page_size: int,
                       shardings: DecodeState):
    """jit(fn(params, state, ids [b, C], starts [b], lens [b], slots [b], pages [b, M],
    last [b], gen0 [b], gen_from [b], hist [b, STOP_WINDOW], echo [b], following [b], req
    rows [b]) -> (state, first tokens [b], their logprobs [b], their alternatives (ids
    [b, K], log-probs [b, K]), prompt log-probs (_prompt_logprobs: [b, C], [b, C, K],
    [b, C, K]))); alternatives and prompt log-probs are zeros without top_logprobs compiled
    in or where no row asks. The state (its pool) is donated and returned in
    `shardings` (PagedEngine.shardings). Rows with slot -1 are padding. gen_from: the first
    position of each row's generated tokens (penalty counts); hist: its last generated
    tokens, right-aligned, -1 padded (the stop window)."""
    del num_pages, page_size  # part of the compile key through the state's shapes

    def fn(params, state: DecodeState, ids, starts, lens, slots, pages, last, gen0, gen_from,
           hist, echo, following, req: Request):
        with model.traced():
            m = model.module(params)
            b, C = ids.shape
            positions = starts[:, None] + jnp.arange(C, dtype=jnp.int32)[None]
            x, pool = m.trunk(ids, positions, starts + lens, state.cache,
                              kvc.Write.at(starts, pages), backend=model.run.attention)
            h = jnp.take_along_axis(x, (lens - 1)[:, None, None], axis=1)  # [b, 1, D]
            logits = m.head(h)[:, 0]
            B = state.last.shape[0]
            at = jnp.where(slots >= 0, slots, B)  # padding rows scatter out of range: dropped
            seen, counts = state.seen, state.counts
            if feats.penalties:  # a resumed request's generated tokens count again
                valid = jnp.arange(C)[None] < lens[:, None]
                first = (starts == 0)[:, None]
                rows = jnp.arange(b)[:, None]
                rows_seen = jnp.where(first, False, seen[jnp.clip(at, 0, B - 1)])
                rows_seen = rows_seen.at[rows, ids].max(valid)
                seen = seen.at[at].set(rows_seen, mode="drop")
                gen = (valid & (positions >= gen_from[:, None])).astype(jnp.int32)
                rows_counts = jnp.where(first, 0, counts[jnp.clip(at, 0, B - 1)])
                counts = counts.at[at].set(rows_counts.at[rows, ids].add(gen), mode="drop")
            tok, lp = sample(logits, req.params, feats, row_keys(req.key, gen0),
                             None if seen is None else seen[jnp.clip(at, 0, B - 1)],
                             None if counts is None else counts[jnp.clip(at, 0, B - 1)])
            top = top_logprobs(logits, req.params, feats)
            if top is None:
                top = (jnp.zeros((b, TOP_LOGPROBS), jnp.int32),
                       jnp.zeros((b, TOP_LOGPROBS), jnp.float32))
            # prompt log-probs come with top log-probs compiled in (a plain call has none)
            prompt = _prompt_logprobs(m, x, ids, following, echo) if feats.top_logprobs \
                else _no_prompt_logprobs(b, C)
            live = jnp.where(last, at, B)  # only a prompt's last chunk makes its slot live
            recent = jnp.concatenate([hist[:, 1:], tok[:, None]], axis=1)
            done = stopped(tok, recent, req) | (req.max_new <= gen0 + 1)
            put = lambda a, v: a.at[live].set(v.astype(a.dtype), mode="drop")  # noqa: E731
            if counts is not None:
                counts = counts.at[live, tok].add(1, mode="drop")
                seen = seen.at[live, tok].set(True, mode="drop")
            state = state._replace(
                cache=pool, last=put(state.last, tok), lengths=put(state.lengths, starts + lens),
                done=put(state.done, done), generated=put(state.generated, gen0 + 1),
                recent=put(state.recent, recent), seen=seen, counts=counts,
                pages=state.pages.at[at].set(pages, mode="drop"),
                req=jax.tree.map(put, state.req, req))
            return state, tok, lp, top, prompt

    rep = NamedSharding(model.mesh, P())
    return model.jit(fn, donate_argnums=(1,),
                     out_shardings=(shardings, rep, rep, (rep, rep), (rep, rep, rep)))


def _prompt_logprobs(m, x, ids, following, want):
    """x [b, C, D] a chunk's hidden states, ids [b, C], following [b] -> (log-probs [b, C],
    ids [b, C, K], log-probs [b, C, K]): at each position, the log-prob of the token after
    it (the next id, `following` at the last column) and the K most likely tokens
    (sampling.top_k_logprobs). Only when some row is `want` [b] (a lax.cond; zeros
    otherwise), G columns at a time: a scan, so one block's [b, G, V] logits (at most
    PROMPT_LOGIT_ROWS rows of V, whatever the call's shape) are the temporaries the branch
    adds to the call."""
    b, C, D = x.shape
    K, G = TOP_LOGPROBS, math.gcd(C, max(1, PROMPT_LOGIT_ROWS // b))
    targets = jnp.concatenate([ids[:, 1:], following[:, None]], axis=1)  # [b, C]

    def run(x):
        def block(_, inp):
            xg, tg = inp  # [b, G, D], [b, G]
            logits = m.head(xg)
            flat = logits.reshape(b * G, logits.shape[-1])
            chosen = chosen_logprob(flat, tg.reshape(-1))
            t_ids, t_lps = top_k_logprobs(flat)
            return None, (chosen.reshape(b, G), t_ids.reshape(b, G, K), t_lps.reshape(b, G, K))

        blocks = (x.reshape(b, C // G, G, D).swapaxes(0, 1),
                  targets.reshape(b, C // G, G).swapaxes(0, 1))
        _, out = jax.lax.scan(block, None, blocks)  # [C / G, b, G, ...] each
        return tuple(a.swapaxes(0, 1).reshape((b, C) + a.shape[3:]) for a in out)

    return jax.lax.cond(want.any(), run, lambda x: _no_prompt_logprobs(b, C), x)


def _no_prompt_logprobs(b: int, C: int) -> tuple:
    """_prompt_logprobs' zeros: (log-probs [b, C], ids [b, C, K], log-probs [b, C, K])."""
    K = TOP_LOGPROBS
    return (jnp.zeros((b, C), jnp.float32), jnp.zeros((b, C, K), jnp.int32),
            jnp.zeros((b, C, K), jnp.float32))
