"""Beam search on the device (the FasterTransformer / Hugging Face kind).

Each prompt keeps `num_beams` running hypotheses; every step takes the best 2 x num_beams
continuations of all beams, files those that end (stop token, or the last allowed step)
among the best num_beams as finished hypotheses scored by
sum(log-probs) / generated_length ** length_penalty, and continues the best num_beams that
did not end. A prompt stops once its finished set is full and the best running beam,
normalised by the current length, cannot beat the worst finished one (Hugging Face's
early_stopping=False heuristic), so results match transformers' beam search.
The cache rows of each prompt's beams are reordered by parent beam every step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import cache as kvc
from jaxformer.engine import forward_step, kv_shardings
from jaxformer.sharding import to_global, to_host

if TYPE_CHECKING:  # the Model (model.py) calls generate(), which calls beam search
    from jaxformer.model import Model

NEG = -1.0e9


class BeamState(NamedTuple):
    cache: kvc.KVCache  # [L, B*nb, S, K, H]
    last: jax.Array  # [B*nb] tokens to feed
    lengths: jax.Array  # [B*nb] tokens in the cache
    step: jax.Array  # [] generated so far
    seqs: jax.Array  # [B, nb, M] running hypotheses
    scores: jax.Array  # [B, nb] running sum of log-probs
    fin_seqs: jax.Array  # [B, nb, M]
    fin_scores: jax.Array  # [B, nb] normalised
    fin_lens: jax.Array  # [B, nb]
    fin_flag: jax.Array  # [B, nb] slot holds a finished hypothesis
    open_: jax.Array  # [B] improvement still possible
    all_hit: jax.Array  # [] every candidate of the last step ended


def _gather(x, idx):
    """x [B, n, ...], idx [B, k] -> [B, k, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _advance(state: BeamState, logprobs, stop_ids, max_new, length_penalty, nb):
    """One beam step from log-probs [B*nb, V] of the running beams."""
    B = state.scores.shape[0]
    V = logprobs.shape[-1]
    i = state.step
    acc = logprobs.reshape(B, nb, V) + state.scores[..., None]
    top_vals, top_idx = jax.lax.top_k(acc.reshape(B, nb * V), 2 * nb)
    parent, tok = top_idx // V, (top_idx % V).astype(jnp.int32)
    cand = _gather(state.seqs, parent).at[:, :, i].set(tok)  # [B, 2nb, M]
    hits = (tok[..., None] == stop_ids[:, None, :]).any(-1) | (i + 1 >= max_new)
    # finished hypotheses: the candidates among the best nb that ended
    rank = jnp.arange(2 * nb)[None]
    norm = top_vals / (i + 1).astype(jnp.float32) ** length_penalty
    norm = norm + jnp.where(hits & (rank < nb) & state.open_[:, None], 0.0, NEG)
    m_scores = jnp.concatenate([state.fin_scores, norm], 1)
    keep = jax.lax.top_k(m_scores, nb)[1]
    fin_seqs = _gather(jnp.concatenate([state.fin_seqs, cand], 1), keep)
    fin_scores = _gather(m_scores, keep)
    fin_lens = _gather(jnp.concatenate([state.fin_lens, jnp.full((B, 2 * nb), i + 1)], 1), keep)
    fin_flag = _gather(jnp.concatenate([state.fin_flag, hits & (rank < nb)
                                        & state.open_[:, None]], 1), keep)
    # running beams: the best nb candidates that did not end
    run_vals = top_vals + jnp.where(hits, NEG, 0.0)
    sel = jax.lax.top_k(run_vals, nb)[1]
    seqs, scores = _gather(cand, sel), _gather(run_vals, sel)
    src = (jnp.arange(B)[:, None] * nb + _gather(parent, sel)).reshape(-1)  # [B*nb]
    # early-stop heuristic (transformers' early_stopping=False)
    best = scores[:, 0] / (i + 1).astype(jnp.float32) ** length_penalty
    worst = jnp.where(fin_flag, fin_scores.min(1, keepdims=True), NEG)
    open_ = state.open_ & (best[:, None] > worst).any(1)
    state = state._replace(
        cache=state.cache.map(lambda c: c[:, src]),
        last=seqs[:, :, i].reshape(-1), step=i + 1, seqs=seqs, scores=scores,
        fin_seqs=fin_seqs, fin_scores=fin_scores, fin_lens=fin_lens, fin_flag=fin_flag,
        open_=open_, all_hit=hits.all())
    return state


def make_beam_search(model: Model, nb: int, max_new: int, cache_len: int,
                     length_penalty: float):
    cfg, backend = model.config, model.run.attention
    cache_sh = kv_shardings(model)

    def run(params, ids, lengths, stop_ids):
        with model.traced():
            m = model.module(params)
            B, T = ids.shape
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            empty = kvc.init_cache(cfg, B, cache_len, model.run.dtype,
                                   kv_cache=model.run.kv_cache)
            empty = jax.lax.with_sharding_constraint(empty, cache_sh)
            x, cache = m.trunk(ids, positions, lengths, empty, kvc.Write.prefill(),
                               backend=backend)
            last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
            logprobs = jax.nn.log_softmax(m.head(last)[:, 0], -1)
            rep = lambda a: jnp.repeat(a, nb, axis=1)  # noqa: E731  [L, B, ...] -> [L, B*nb, ...]
            state = BeamState(
                cache=cache.map(rep),
                last=jnp.zeros((B * nb,), jnp.int32), lengths=jnp.repeat(lengths, nb),
                step=jnp.int32(0), seqs=jnp.full((B, nb, max_new), -1, jnp.int32),
                scores=jnp.tile(jnp.asarray([0.0] + [NEG] * (nb - 1), jnp.float32), (B, 1)),
                fin_seqs=jnp.full((B, nb, max_new), -1, jnp.int32),
                fin_scores=jnp.full((B, nb), NEG, jnp.float32),
                fin_lens=jnp.zeros((B, nb), jnp.int32), fin_flag=jnp.zeros((B, nb), bool),
                open_=jnp.ones((B,), bool), all_hit=jnp.array(False))
            state = _advance(state, jnp.repeat(logprobs, nb, axis=0), stop_ids, max_new,
                             length_penalty, nb)

            def body(s: BeamState):
                logits, c = forward_step(model, m, s.last, s.lengths, s.cache)
                lp = jax.nn.log_softmax(logits, -1)
                s = s._replace(cache=c, lengths=s.lengths + 1)
                return _advance(s, lp, stop_ids, max_new, length_penalty, nb)

            cond = lambda s: (s.step < max_new) & s.open_.any() & ~s.all_hit  # noqa: E731
            state = jax.lax.while_loop(cond, body, state)
            return state.fin_seqs[:, 0], state.fin_lens[:, 0], state.fin_scores[:, 0]

    return model.jit(run)


def beam_search(run, num_beams: int, length_penalty: float):
    """Host side for generate() (its GenerateRun): returns (tokens per prompt, scores)."""
    model: Model = run.model
    key = ("beam", num_beams, run.max_new, run.cache_len, float(length_penalty))
    fn = model.compiled.get(key, lambda: make_beam_search(
        model, num_beams, run.max_new, run.cache_len, float(length_penalty)))
    B = run.batch
    Tb = kvc.bucket(max(len(p) for p in run.prompt_ids), model.config.max_position_embeddings)
    ids = np.zeros((B, Tb), np.int32)
    lengths = np.ones((B,), np.int32)
    for b, p in enumerate(run.prompt_ids):
        ids[b, : len(p)] = p
        lengths[b] = len(p)
    stop_ids, _ = run.engine_stop_arrays()
    s1, s2 = model._batch_sharding(B, 1), model._batch_sharding(B, 2)
    seqs, lens, scores = fn(model.params, to_global(ids, s2), to_global(lengths, s1),
                            to_global(stop_ids, s2))
    seqs, lens, scores = to_host(seqs), to_host(lens), to_host(scores)
    return ([seqs[b, : lens[b]].tolist() for b in range(run.rows)],
            scores[: run.rows].tolist())
