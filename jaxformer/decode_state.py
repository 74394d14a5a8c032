"""The decode batch's state and per-row bookkeeping, shared by every decode schedule
(engine.py's loop and pipeline.py's circular one).

A decode batch is B slots. Each live slot holds one request: its rows of the KV cache, the
token to feed next, how many tokens it has generated, its stop state and its sampling
settings (`Request`, per row, so requests with different settings share one compiled step).
A slot that is free or finished is `done`: it still runs through the step (shapes are
fixed) but records nothing and does not advance.

`out` / `logprobs` are a window of W tokens per row that a call of the decode loop fills
from column `step`; generate() sizes it to the whole generation, the Engine to its tokens
per step call. With top_logprobs compiled in (Features.top_logprobs; every serving engine),
`top_ids` / `top_lps` hold each token's K = TOP_LOGPROBS most likely alternatives beside it,
filled in steps where some row asks (sampling.top_logprobs).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxformer import sharding as shd
from jaxformer.cache import KVCache
from jaxformer.sampling import TOP_LOGPROBS, RowParams

STOP_WINDOW = 8  # longest stop sequence (in tokens) matched on the device


class Request(NamedTuple):
    """Per-row constants of the requests in a batch (device arrays, B rows)."""
    params: RowParams  # sampling settings, [B] each
    stop_ids: jax.Array  # [B, Ms] int32, -1 padded
    stop_seqs: jax.Array  # [B, Mq, STOP_WINDOW] int32, right-aligned, -1 padded
    max_new: jax.Array  # [B] int32 tokens a row may generate in all
    key: jax.Array  # [B, 2] uint32 PRNG key data per row


class DecodeState(NamedTuple):
    cache: KVCache
    last: jax.Array  # [B] int32 token to feed next
    lengths: jax.Array  # [B] int32 tokens in the cache
    done: jax.Array  # [B] bool
    generated: jax.Array  # [B] int32 tokens generated so far per row
    step: jax.Array  # [] int32 next column of the window
    out: jax.Array  # [B, W] int32 tokens of this window (-1: none)
    logprobs: jax.Array  # [B, W] float32
    recent: jax.Array  # [B, STOP_WINDOW] int32 last tokens, for stop sequences
    seen: jax.Array | None  # [B, Vp] bool, prompt or generated (penalties only)
    counts: jax.Array | None  # [B, Vp] int32 generated (penalties only)
    req: Request
    pages: jax.Array | None = None  # [B, M] int32 page tables (a paged cache), 0-padded
    top_ids: jax.Array | None = None  # [B, W, K] int32 alternatives of each token (-1: none)
    top_lps: jax.Array | None = None  # [B, W, K] float32 their log-probs


def state_shardings(mesh: Mesh, rules, cache, penalties: bool, paged: bool,
                    top: bool = False) -> DecodeState:
    """The one set of shardings an engine keeps its slots' DecodeState in: `cache` (the
    cache's own), per-slot rows [B, ...] on the cache's batch axis, the [B, V] penalty rows
    also on the vocabulary's, the step counter replicated. jit keys its programs on input
    shardings, so every compiled call returning the state returns it in exactly these (its
    out_shardings): whichever call produced the state, the next one finds its program.
    Shape-free: B must divide over the batch axis and V over the vocabulary's."""
    named = lambda *axes: NamedSharding(mesh, shd.logical_to_spec(axes, rules))  # noqa: E731
    r1, r2, r3 = (named("cache_batch", *(None,) * (n - 1)) for n in (1, 2, 3))
    pen = named("cache_batch", "act_vocab") if penalties else None
    req = Request(params=RowParams(*[r1] * len(RowParams._fields)), stop_ids=r2,
                  stop_seqs=r3, max_new=r1, key=r2)
    return DecodeState(cache=cache, last=r1, lengths=r1, done=r1, generated=r1, step=named(),
                       out=r2, logprobs=r2, recent=r2, seen=pen, counts=pen, req=req,
                       pages=r2 if paged else None, top_ids=r3 if top else None,
                       top_lps=r3 if top else None)


def row_keys(key, generated):
    """Per-row PRNG keys for the next token: key [B, 2] uint32 data, generated [B] -> [B]
    keys. A row's draws depend on its own key and position only, never on its slot or on
    what else shares the batch."""
    return jax.vmap(lambda k, g: jax.random.fold_in(jax.random.wrap_key_data(k), g))(
        key, generated)


def stopped(tok, recent, req: Request):
    """[B] bool: tok hit a stop id, or the recent tokens end with a stop sequence."""
    hit = (tok[:, None] == req.stop_ids).any(-1)
    seqs = req.stop_seqs  # [B, Mq, W]
    match = ((seqs == recent[:, None, :]) | (seqs < 0)).all(-1) & (seqs >= 0).any(-1)
    return hit | match.any(-1)


def record(state: DecodeState, tok, logprob, req: Request, top=None) -> DecodeState:
    """Store this step's token [B] for the rows still running and update their stop state.
    `req` is the state's own, or (pipeline) the rows of one microbatch; top: (ids [B, K],
    log-probs [B, K]) alternatives (sampling.top_logprobs), for a state that keeps them
    (None there: a program compiled without them leaves those columns as new_window set
    them)."""
    live = ~state.done
    tok = jnp.where(live, tok, 0)
    out = state.out.at[:, state.step].set(jnp.where(live, tok, -1))
    logprobs = state.logprobs.at[:, state.step].set(jnp.where(live, logprob, 0.0))
    top_ids, top_lps = state.top_ids, state.top_lps
    if top_ids is not None and top is not None:
        ids, lps = top
        top_ids = top_ids.at[:, state.step].set(jnp.where(live[:, None], ids, -1))
        top_lps = top_lps.at[:, state.step].set(jnp.where(live[:, None], lps, 0.0))
    recent = jnp.concatenate([state.recent[:, 1:], tok[:, None]], axis=1)
    generated = state.generated + live.astype(jnp.int32)
    done = state.done | (live & (stopped(tok, recent, req) | (generated >= req.max_new)))
    seen, counts = state.seen, state.counts
    if counts is not None:
        rows = jnp.arange(tok.shape[0])
        counts = counts.at[rows, tok].add(live.astype(jnp.int32))
        seen = seen.at[rows, tok].max(live)
    return state._replace(last=jnp.where(live, tok, state.last), done=done,
                          generated=generated, step=state.step + 1, out=out,
                          logprobs=logprobs, recent=recent, seen=seen, counts=counts,
                          top_ids=top_ids, top_lps=top_lps)


def new_window(state: DecodeState, width: int | None = None,
               top: bool | None = None) -> DecodeState:
    """The state with an empty token window (of `width` columns, default the current; with
    the top-log-prob columns when `top`, default: when the state has them)."""
    B = state.last.shape[0]
    W = state.out.shape[1] if width is None else width
    top = state.top_ids is not None if top is None else top
    K = TOP_LOGPROBS
    return state._replace(step=jnp.int32(0), out=jnp.full((B, W), -1, jnp.int32),
                          logprobs=jnp.zeros((B, W), jnp.float32),
                          top_ids=jnp.full((B, W, K), -1, jnp.int32) if top else None,
                          top_lps=jnp.zeros((B, W, K), jnp.float32) if top else None)
