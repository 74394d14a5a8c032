"""Text generation: prefill, decode_step, and the on-device decode loop.

Prompts are right-padded into a [B, Tb] batch (Tb a power-of-two bucket, so compiles stay
few); row b's keys fill cache slots [0, len_b) and each decode step writes slot len_b of its
own row, so rows of any lengths decode together and each gets exactly the tokens it would get
alone. The loop (lax.while_loop) runs on the device with the cache donated; it stops a row at
its stop token / stop sequence / max_new_tokens and stops the whole batch when every row is
done. Streaming calls the same compiled loop for a few steps at a time.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxformer import cache as kvc
from jaxformer import sharding as shd
from jaxformer.engine import Model, ParamsJit, bucket, to_global, to_host
from jaxformer.sampling import GREEDY, Features, RowParams, Sampling, row_params, sample

STOP_WINDOW = 8  # longest stop sequence (in tokens) matched on the device


@dataclasses.dataclass
class GenerateOutput:
    """tokens: new token ids per prompt (a stop token, when hit, is included);
    texts: decoded new text (stop tokens and stop strings cut), when a tokenizer is present;
    logprobs: per-token log-probabilities, when asked; stats: timings."""
    tokens: list[list[int]]
    texts: list[str] | None = None
    logprobs: list[list[float]] | None = None
    stats: dict | None = None


class DecodeState(NamedTuple):
    cache: kvc.KVCache
    last: jax.Array  # [B] int32 token to feed next
    lengths: jax.Array  # [B] int32 tokens in the cache
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32 tokens generated so far (all rows)
    out: jax.Array  # [B, M] int32 generated tokens
    logprobs: jax.Array  # [B, M] float32
    recent: jax.Array  # [B, STOP_WINDOW] int32 last tokens, for stop sequences
    seen: jax.Array | None  # [B, Vp] bool, prompt or generated (penalties only)
    counts: jax.Array | None  # [B, Vp] int32 generated (penalties only)


class Request(NamedTuple):
    """Per-row constants of one generate() call (device arrays)."""
    params: RowParams
    stop_ids: jax.Array  # [B, Ms] int32, -1 padded
    stop_seqs: jax.Array  # [B, Mq, STOP_WINDOW] int32, right-aligned, -1 padded
    max_new: jax.Array  # [] int32
    key: jax.Array  # PRNG key data


# ---- the compiled pieces -------------------------------------------------------------------
def _row_keys(key, step, batch):
    base = jax.random.fold_in(jax.random.wrap_key_data(key), step)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(batch))


def _stopped(tok, recent, req: Request):
    hit = (tok[:, None] == req.stop_ids).any(-1)
    seqs = req.stop_seqs  # [B, Mq, W]
    match = ((seqs == recent[:, None, :]) | (seqs < 0)).all(-1) & (seqs >= 0).any(-1)
    return hit | match.any(-1)


def _record(state: DecodeState, tok, logprob, req: Request) -> DecodeState:
    """Store this step's token for the rows still running and update their stop state."""
    live = ~state.done
    tok = jnp.where(live, tok, 0)
    out = state.out.at[:, state.step].set(jnp.where(live, tok, -1))
    logprobs = state.logprobs.at[:, state.step].set(jnp.where(live, logprob, 0.0))
    recent = jnp.concatenate([state.recent[:, 1:], tok[:, None]], axis=1)
    step = state.step + 1
    done = state.done | (live & (_stopped(tok, recent, req) | (step >= req.max_new)))
    seen, counts = state.seen, state.counts
    if counts is not None:
        rows = jnp.arange(tok.shape[0])
        counts = counts.at[rows, tok].add(live.astype(jnp.int32))
        seen = seen.at[rows, tok].max(live)
    return state._replace(last=tok, done=done, step=step, out=out, logprobs=logprobs,
                          recent=recent, seen=seen, counts=counts)


def make_prefill(model: Model, feats: Features, max_new: int, cache_len: int, *,
                 pack_small: bool = True):
    cfg, backend = model.config, model.run.attention
    cache_sh = kv_shardings(model)

    def prefill(params, ids, lengths, req: Request):
        """ids [B, Tb], lengths [B] -> DecodeState after the first generated token."""
        with model.traced():
            m = model.module(params)
            B, T = ids.shape
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            empty = kvc.init_cache(cfg, B, cache_len, model.run.dtype,
                                   kv_cache=model.run.kv_cache)
            empty = jax.lax.with_sharding_constraint(empty, cache_sh)
            R = kvc.prefill_rows(B, T, model.run.prefill_tokens, model.mesh.shape["data"],
                             model.mesh.shape["pipe"])
            if R == B:
                x, cache = m.trunk(ids, positions, lengths, kvc.as_tuple(empty), None,
                                   backend=backend)
                last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B,1,D]
            else:
                cache, last = _prefill_in_chunks(m, ids, lengths, kvc.as_tuple(empty), R,
                                                 backend)
            logits = m.head(last)[:, 0]
            seen = counts = None
            if feats.penalties:
                V = logits.shape[-1]
                valid = positions < lengths[:, None]
                seen = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].max(valid)
                counts = jnp.zeros((B, V), jnp.int32)
            state = DecodeState(
                cache=kvc.KVCache(*cache), last=jnp.zeros((B,), jnp.int32), lengths=lengths,
                done=jnp.zeros((B,), bool), step=jnp.int32(0),
                out=jnp.full((B, max_new), -1, jnp.int32),
                logprobs=jnp.zeros((B, max_new), jnp.float32),
                recent=jnp.full((B, STOP_WINDOW), -1, jnp.int32), seen=seen, counts=counts)
            tok, lp = sample(logits, req.params, feats, _row_keys(req.key, 0, B), seen, counts)
            return _record(state, tok, lp, req)

    return model.jit(prefill, pack_small=pack_small)


def _prefill_in_chunks(m, ids, lengths, cache: tuple, R: int, backend):
    """The trunk over ids [B, T] R rows at a time (a scan, so one chunk's temporaries are
    live at once); each chunk writes its keys and values straight into rows [i R, (i + 1) R)
    of the B-row cache (kvc.PrefillRows). Returns (cache, last [B, 1, D]): the hidden state
    at each row's last prompt token."""
    B, T = ids.shape
    n = B // R
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T))

    def chunk(cache, inputs):
        ids_c, len_c, i = inputs
        x, cache = m.trunk(ids_c, positions, len_c, cache, kvc.PrefillRows(i * R),
                           backend=backend)
        return cache, jnp.take_along_axis(x, (len_c - 1)[:, None, None], axis=1)  # [R,1,D]

    cache, last = jax.lax.scan(chunk, cache, (ids.reshape(n, R, T), lengths.reshape(n, R),
                                              jnp.arange(n, dtype=jnp.int32)))
    return tuple(cache), last.reshape((B,) + last.shape[2:])


def decode_step(model: Model, params, state: DecodeState, req: Request, feats: Features):
    """One token for every row: feed `last` at slot `lengths`, sample, record (traced)."""
    m = model.module(params)
    B = state.last.shape[0]
    pos = state.lengths[:, None]
    x, cache = m.trunk(state.last[:, None], pos, state.lengths + 1, kvc.as_tuple(state.cache),
                       state.lengths, backend=model.run.attention)
    logits = m.head(x)[:, 0]
    tok, lp = sample(logits, req.params, feats, _row_keys(req.key, state.step, B),
                     state.seen, state.counts)
    state = state._replace(cache=kvc.KVCache(*cache),
                           lengths=state.lengths + (~state.done).astype(jnp.int32))
    return _record(state, tok, lp, req)


def make_decode_loop(model: Model, feats: Features):
    if model.mesh.shape["pipe"] > 1:  # [pipeline] microbatches in flight across steps
        from jaxformer import pipeline
        return pipeline.make_decode_loop(model, feats)

    def loop(params, state: DecodeState, req: Request, until):
        """Decode until every row is done or `until` tokens have been generated."""
        with model.traced():
            cond = lambda s: (s.step < until) & ~s.done.all()  # noqa: E731
            body = lambda s: decode_step(model, params, s, req, feats)  # noqa: E731
            return jax.lax.while_loop(cond, body, state)

    return model.jit(loop, donate_argnums=(1,))


def kv_shardings(model: Model) -> kvc.KVCache:
    """The cache's shardings (codes and scales for a quantized cache)."""
    axes = kvc.cache_axes(model.run.kv_cache)
    return kvc.KVCache(*(None if a is None else
                         NamedSharding(model.mesh, shd.logical_to_spec(a, model.rules))
                         for a in axes))


# ---- host side ----------------------------------------------------------------------------
def _encode_prompts(model: Model, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of strings or a list of token-id lists")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; this model has none, so pass "
                                 "token ids")
            ids = model.tokenizer.encode(p)
            bos = model.tokenizer.bos_id
            if bos is not None and model.config.bos_token_id is not None:
                ids = [bos] + ids
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


def _samplings(sampling, n: int) -> list[Sampling]:
    if sampling is None:
        return [GREEDY] * n
    if isinstance(sampling, Sampling):
        return [sampling] * n
    s = [GREEDY if x is None else x for x in sampling]  # None in a list: a greedy row
    if len(s) != n or not all(isinstance(x, Sampling) for x in s):
        raise ValueError(f"sampling must be None, a Sampling, or one Sampling (or None for "
                         f"greedy) per prompt ({n}); got {sampling!r}")
    return s


def _stop_arrays(model: Model, samplings, batch, ignore_eos):
    eos = model.config.eos_token_id
    if eos is None and model.tokenizer is not None:
        eos = model.tokenizer.eos_id
    ids, seqs = [], []
    for s in samplings + [GREEDY] * (batch - len(samplings)):
        row = list(s.stop_token_ids) + ([eos] if eos is not None and not ignore_eos else [])
        ids.append(row)
        row_seqs = []
        for text in s.stop_strings:
            if model.tokenizer is None:
                raise ValueError("stop_strings need a tokenizer; this model has none")
            toks = model.tokenizer.encode(text)
            if 0 < len(toks) <= STOP_WINDOW:
                row_seqs.append(toks)  # longer ones are still cut on the host
        seqs.append(row_seqs)
    ms = max(1, max(len(r) for r in ids))
    stop_ids = np.full((batch, ms), -1, np.int32)
    for b, r in enumerate(ids):
        stop_ids[b, : len(r)] = r
    mq = max(1, max(len(r) for r in seqs))
    stop_seqs = np.full((batch, mq, STOP_WINDOW), -1, np.int32)
    for b, r in enumerate(seqs):
        for j, toks in enumerate(r):
            stop_seqs[b, j, STOP_WINDOW - len(toks):] = toks
    return stop_ids, stop_seqs


class _Run:
    """One generate() call: inputs placed on the mesh, compiled functions chosen."""

    def __init__(self, model: Model, prompts, max_new_tokens, sampling, seed, ignore_eos):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if model.config.arch != "decoder":
            raise ValueError("generate() needs a decoder model; use encode() for encoders")
        self.model = model
        self.prompt_ids = _encode_prompts(model, prompts)
        n = len(self.prompt_ids)
        self.samplings = _samplings(sampling, n)
        beams = {(s.num_beams, s.length_penalty) for s in self.samplings}
        if len(beams) > 1 and any(s.num_beams > 1 for s in self.samplings):
            raise ValueError("beam search needs one num_beams and length_penalty for the "
                             f"whole batch, got {sorted(beams)}")
        self.num_beams, self.length_penalty = beams.pop()
        longest = max(len(p) for p in self.prompt_ids)
        limit = model.config.max_position_embeddings
        if longest + max_new_tokens > limit:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} "
                             f"exceeds the model's maximum of {limit} positions")
        for p in self.prompt_ids:
            model.check_ids(np.asarray([p]), "prompt token ids")
        data = shd.mesh_size(model.mesh, model.rules.get("cache_batch"))
        B = kvc.cache_rows(n, data)
        Tb = bucket(longest, limit)
        self.max_new = int(max_new_tokens)
        self.cache_len = kvc.cache_slots(Tb, longest, self.max_new, limit)
        ids = np.zeros((B, Tb), np.int32)
        lengths = np.ones((B,), np.int32)
        for b, p in enumerate(self.prompt_ids):
            ids[b, : len(p)] = p
            lengths[b] = len(p)
        rp, self.feats = row_params(self.samplings, B)
        stop_ids, stop_seqs = _stop_arrays(model, self.samplings, B, ignore_eos)
        s1, s2, s3 = (model._batch_sharding(B, k) for k in (1, 2, 3))
        self.ids, self.lengths = to_global(ids, s2), to_global(lengths, s1)
        key = np.asarray(jax.random.key_data(jax.random.key(seed)))
        rep = NamedSharding(model.mesh, shd.P())
        self.req = Request(
            params=RowParams(*(to_global(a, s1) for a in rp)),
            stop_ids=to_global(stop_ids, s2), stop_seqs=to_global(stop_seqs, s3),
            max_new=to_global(np.int32(self.max_new), rep), key=to_global(key, rep))
        self.rows = n

    def compiled(self, name, factory, *args):
        cache = self.model.__dict__.setdefault("_compiled", {})
        k = (name,) + args
        if k not in cache:
            cache[k] = factory(self.model, *args)
        return cache[k]

    def prefill(self) -> DecodeState:
        f = self.compiled("prefill", make_prefill, self.feats, self.max_new, self.cache_len)
        args = (self.model.params, self.ids, self.lengths, self.req)
        self._compile_decode_first(f, args)
        return f(*args)

    def _compile_decode_first(self, prefill: ParamsJit, args) -> None:
        """Compile prefill and the decode loop for these shapes before the first prefill
        allocates the KV cache; the calls that follow reuse both executables (jit caches
        a lowering and its compilation, and these are the calls' own).

        XLA's autotuner times candidate kernels on scratch copies of their operands while
        it compiles, and over a quantized cache the decode loop's attention fusions take
        the whole stacked cache as an operand. Compiled after prefill, beside the resident
        cache, llama-7b's int8 cache of 128 x 1024 tokens peaked at 72.8 GB and did not
        compile in the default 75% of an 80 GB H100; compiled first, its scratch copies
        share the card with the weights alone.
        """
        key = ("decode compiled", self.feats, self.ids.shape, self.max_new, self.cache_len,
               tuple(a.shape for a in jax.tree.leaves(self.req)))
        done = self.model.__dict__.setdefault("_compiled", {})
        if key in done:
            return
        lowered = prefill.lower(*args)
        compiled = lowered.compile()
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             lowered.out_info, compiled.output_shardings)
        decode = self.compiled("decode", make_decode_loop, self.feats)
        decode.lower(self.model.params, state, self.req,
                     jax.ShapeDtypeStruct((), jnp.int32)).compile()
        done[key] = True

    def decode(self, state: DecodeState, until: int) -> DecodeState:
        f = self.compiled("decode", make_decode_loop, self.feats)
        return f(self.model.params, state, self.req, jnp.int32(until))

    def finish(self, out: np.ndarray, logprobs: np.ndarray, want_logprobs: bool, stats):
        tokens, texts, lps = [], [], []
        tok = self.model.tokenizer
        for b in range(self.rows):
            n = int((out[b] >= 0).sum())
            tokens.append(out[b, :n].tolist())
            lps.append(logprobs[b, :n].tolist())
            if tok is not None:
                texts.append(self._text(tokens[-1], self.samplings[b]))
        return GenerateOutput(tokens, texts if tok is not None else None,
                              lps if want_logprobs else None, stats)

    def _text(self, ids, s: Sampling) -> str:
        tok = self.model.tokenizer
        stops = set(s.stop_token_ids) | {tok.eos_id, self.model.config.eos_token_id}
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        text = tok.decode(ids)
        for stop in s.stop_strings:
            i = text.find(stop)
            if i >= 0:
                text = text[:i]
        return text


def generate(model: Model, prompts, max_new_tokens: int = 32, sampling=None, seed: int = 0,
             *, ignore_eos: bool = False, stream: bool = False, chunk: int = 8):
    """Generate up to max_new_tokens for each prompt (strings or token-id lists).

    sampling: None (greedy), a Sampling for every prompt, or a list with one per prompt.
    Same seed, same output, on any mesh. With stream=True returns an iterator of
    per-chunk lists of new token ids per prompt (then a final GenerateOutput).
    """
    run = _Run(model, prompts, max_new_tokens, sampling, seed, ignore_eos)
    want_lp = any(s.logprobs for s in run.samplings)
    if run.num_beams > 1:
        if stream:
            raise ValueError("beam search (num_beams > 1) cannot stream: the best hypothesis "
                             "is known only at the end")
        from jaxformer.beam import beam_search
        t0 = time.perf_counter()
        tokens, scores = beam_search(run, run.num_beams, run.length_penalty)
        dt = time.perf_counter() - t0
        out = np.full((run.rows, run.max_new), -1, np.int32)
        for b, t in enumerate(tokens):
            out[b, : len(t)] = t
        n = sum(map(len, tokens))
        result = run.finish(out, np.zeros(out.shape, np.float32), False,
                            dict(total_s=dt, new_tokens=n, tokens_per_s=n / dt))
        result.stats["beam_scores"] = scores
        return result
    if stream:
        return _stream(run, chunk, want_lp)
    t0 = time.perf_counter()
    state = run.prefill()
    jax.block_until_ready(state.last)
    t1 = time.perf_counter()
    state = run.decode(state, run.max_new)
    out, lps = to_host(state.out), to_host(state.logprobs)
    t2 = time.perf_counter()
    n = int((out[: run.rows] >= 0).sum())
    stats = dict(prefill_s=t1 - t0, decode_s=t2 - t1, new_tokens=n,
                 tokens_per_s=n / max(t2 - t0, 1e-9))
    return run.finish(out, lps, want_lp, stats)


def _stream(run: _Run, chunk: int, want_lp: bool) -> Iterator:
    t0 = time.perf_counter()
    state = run.prefill()
    sent = 0
    while True:
        step = int(to_host(state.step))
        out = to_host(state.out)
        if step > sent:
            yield [[int(t) for t in out[b, sent:step] if t >= 0] for b in range(run.rows)]
            sent = step
        if step >= run.max_new or bool(to_host(state.done)[: run.rows].all()):
            break
        state = run.decode(state, min(step + chunk, run.max_new))
    out, lps = to_host(state.out), to_host(state.logprobs)
    n = int((out[: run.rows] >= 0).sum())
    dt = time.perf_counter() - t0
    yield run.finish(out, lps, want_lp, dict(total_s=dt, new_tokens=n, tokens_per_s=n / dt))
