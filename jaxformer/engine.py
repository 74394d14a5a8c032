"""The Engine: one model on one mesh, driven a step at a time (JetStream's engine shape).

    engine = Engine(model, slots=8, max_length=1024)
    state = engine.init_state()                          # 8 free slots
    pre = engine.prefill([[1, 2, 3]], [Sampling()], max_new=[16], seeds=[0])  # a request
    state = engine.insert(state, pre, slots=[5])         # into slot 5
    state = engine.step(state, 4)                        # <= 4 tokens per live slot
    tokens = engine.tokens(state)                        # host [8, 4], -1 where none
    top = engine.top(state)          # each token's 20 most likely alternatives, when asked
    state = engine.free(state, [5])

`prefill` turns prompts into a decode state of their own rows (KV cache, first token,
stop state, sampling rows); `insert` copies its rows into slots of the fixed-size decode
batch; `step` runs the one decode loop (on the device, cache donated) for every live slot,
sampling each row with its own settings; `free` releases slots. generate(), streaming, beam
search and the pipelined decode are clients of these functions: one decode path.

Compiled functions live in the model's table (Model.compiled), keyed by everything that
changes the program: the sampling features, the batch and window shapes, the cache length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxformer import cache as kvc
from jaxformer import pipeline
from jaxformer import sharding as shd
from jaxformer.decode_state import (STOP_WINDOW, DecodeState, Request, new_window, record,
                                    row_keys, state_shardings)
from jaxformer.sampling import (GREEDY, Features, RowParams, Sampling, row_params, sample,
                                top_logprobs)
from jaxformer.sharding import to_global, to_host

if TYPE_CHECKING:  # the Model (model.py) drives an Engine; the Engine only reads it
    from jaxformer.model import Model

ALL_FEATURES = Features(sample=True, sort=True, min_p=True, penalties=True,
                        top_logprobs=True)
# A batch whose every row is Sampling.plain: the sampler is an argmax and a log-prob, with
# no lax.cond (PagedEngine's fixed windows compile it)
PLAIN = Features(sample=False, sort=False, min_p=False, penalties=False, top_logprobs=False)


# ---- the compiled pieces -------------------------------------------------------------------
def kv_shardings(model: Model) -> kvc.KVCache:
    """The cache's shardings (codes and scales for a quantized cache)."""
    axes = kvc.KVCache.axes(model.run.kv_cache)
    return jax.tree.map(lambda a: NamedSharding(model.mesh, shd.logical_to_spec(a, model.rules)),
                        axes, is_leaf=lambda a: isinstance(a, tuple))


def make_prefill(model: Model, feats: Features, window: int, cache_len: int, *,
                 pack_small: bool = True):
    """jit(prefill(params, ids [B, Tb], lengths [B], req) -> DecodeState of the B rows,
    after their first generated token, with a cache of cache_len slots); pack_small as in
    Model.jit."""
    cfg, backend = model.config, model.run.attention
    cache_sh = kv_shardings(model)
    state_sh = state_shardings(model.mesh, model.rules, cache_sh, feats.penalties, False,
                               feats.top_logprobs)

    def prefill(params, ids, lengths, req: Request):
        with model.traced():
            m = model.module(params)
            B, T = ids.shape
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            empty = kvc.init_cache(cfg, B, cache_len, model.run.dtype,
                                   kv_cache=model.run.kv_cache)
            cache = jax.lax.with_sharding_constraint(empty, cache_sh)
            R = kvc.prefill_rows(B, T, model.run.prefill_tokens, model.mesh.shape["data"],
                                 model.mesh.shape["pipe"])
            if R == B:
                x, cache = m.trunk(ids, positions, lengths, cache, kvc.Write.prefill(),
                                   backend=backend)
                last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B,1,D]
            else:
                cache, last = _prefill_in_chunks(m, ids, lengths, cache, R, backend)
            logits = m.head(last)[:, 0]
            seen = counts = None
            if feats.penalties:
                V = logits.shape[-1]
                valid = positions < lengths[:, None]
                seen = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].max(valid)
                counts = jnp.zeros((B, V), jnp.int32)
            zeros = jnp.zeros((B,), jnp.int32)
            state = new_window(DecodeState(
                cache=cache, last=zeros, lengths=lengths, done=jnp.zeros((B,), bool),
                generated=zeros, step=jnp.int32(0), out=None, logprobs=None,
                recent=jnp.full((B, STOP_WINDOW), -1, jnp.int32), seen=seen, counts=counts,
                req=req), window, feats.top_logprobs)
            tok, lp = sample(logits, req.params, feats, row_keys(req.key, zeros), seen, counts)
            top = top_logprobs(logits, req.params, feats)
            # in the slots' shardings (B divides as the cache's rows do): insert() and
            # init_state() reuse the donated buffers
            return jax.lax.with_sharding_constraint(record(state, tok, lp, req, top),
                                                    state_sh)

    return model.jit(prefill, pack_small=pack_small)


def _prefill_in_chunks(m, ids, lengths, cache: kvc.KVCache, R: int, backend):
    """The trunk over ids [B, T] R rows at a time (a scan, so one chunk's temporaries are
    live at once); each chunk writes its keys and values straight into rows [i R, (i + 1) R)
    of the B-row cache. Returns (cache, last [B, 1, D]): the hidden state at each row's last
    prompt token."""
    B, T = ids.shape
    n = B // R
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T))

    def chunk(cache, inputs):
        ids_c, len_c, i = inputs
        x, cache = m.trunk(ids_c, positions, len_c, cache, kvc.Write.prefill(i * R),
                           backend=backend)
        return cache, jnp.take_along_axis(x, (len_c - 1)[:, None, None], axis=1)  # [R,1,D]

    cache, last = jax.lax.scan(chunk, cache, (ids.reshape(n, R, T), lengths.reshape(n, R),
                                              jnp.arange(n, dtype=jnp.int32)))
    return cache, last.reshape((B,) + last.shape[2:])


def forward_step(model: Model, m, last, lengths, cache, pages=None, done=None):
    """The one-token forward every decode client shares: feed last [B] at slot lengths [B]
    -> (float32 logits [B, Vp], new cache). With a paged cache, pages [B, M] are the rows'
    page tables; rows that are done write to the null page, never into pages a prompt
    being prefilled or a prefix-cache entry holds. Traced, inside model.traced()."""
    if pages is not None and done is not None:
        pages = jnp.where(done[:, None], 0, pages)
    x, cache = m.trunk(last[:, None], lengths[:, None], lengths + 1, cache,
                       kvc.Write.at(lengths, pages), backend=model.run.attention)
    return m.head(x)[:, 0], cache


def decode_step(model: Model, params, state: DecodeState, feats: Features) -> DecodeState:
    """One token for every row: feed `last` at slot `lengths`, sample, record (traced)."""
    logits, cache = forward_step(model, model.module(params), state.last, state.lengths,
                                 state.cache, state.pages, state.done)
    req = state.req
    tok, lp = sample(logits, req.params, feats, row_keys(req.key, state.generated),
                     state.seen, state.counts)
    state = state._replace(cache=cache,
                           lengths=state.lengths + (~state.done).astype(jnp.int32))
    return record(state, tok, lp, req, top_logprobs(logits, req.params, feats))


def make_decode_loop(model: Model, feats: Features):
    """jit(loop(params, state, until)): decode until every row is done or the window's
    column `until` is reached; the state (its cache) is donated."""
    if model.mesh.shape["pipe"] > 1:  # microbatches in flight across steps
        return pipeline.make_decode_loop(model, feats)

    def loop(params, state: DecodeState, until):
        with model.traced():
            cond = lambda s: (s.step < until) & ~s.done.all()  # noqa: E731
            body = lambda s: decode_step(model, params, s, feats)  # noqa: E731
            return jax.lax.while_loop(cond, body, state)

    return model.jit(loop, donate_argnums=(1,))


def _insert(state: DecodeState, src: DecodeState, slots):
    """src's first b rows into rows `slots` [b] of state (cache rows: their first S'
    slots); src's other rows (a prefill's padding) are dropped."""
    b = slots.shape[0]
    rows = jax.tree.map(lambda a: a[:b] if a.ndim else a, src._replace(cache=None))
    src = rows._replace(cache=src.cache.map(lambda c: c[:, :b]))
    put = lambda dst, new: dst.at[slots].set(new.astype(dst.dtype))  # noqa: E731
    cache = state.cache.put_rows(src.cache, slots)
    rows = {f: put(getattr(state, f), getattr(src, f)) for f in
            ("last", "lengths", "done", "generated", "recent", "seen", "counts")
            if getattr(state, f) is not None}
    req = jax.tree.map(put, state.req, src.req)
    if state.top_ids is not None:
        rows.update(top_ids=state.top_ids.at[slots].set(-1),
                    top_lps=state.top_lps.at[slots].set(0.0))
    # the window keeps the other slots' tokens; the inserted rows' first token is read from
    # the prefill's own window
    return state._replace(cache=cache, out=state.out.at[slots].set(-1),
                          logprobs=state.logprobs.at[slots].set(0.0), req=req, **rows)


def _free(state: DecodeState, slots):
    return state._replace(done=state.done.at[slots].set(True))


def _free_all(state: DecodeState):
    return state._replace(done=jnp.ones_like(state.done))


# ---- host-side request arrays -------------------------------------------------------------
def stop_arrays(model: Model, samplings: Sequence[Sampling], batch: int, ignore_eos=False,
                widths: tuple[int, int] | None = None, eos_rows=None):
    """(stop_ids [B, Ms], stop_seqs [B, Mq, W]) host arrays: each row's stop ids (plus the
    model's eos unless ignore_eos) and its stop strings' token sequences of at most
    STOP_WINDOW tokens (longer ones are cut on the host). widths: fixed (Ms, Mq)."""
    eos = model.config.eos_token_id
    if eos is None and model.tokenizer is not None:
        eos = model.tokenizer.eos_id
    ids, seqs = [], []
    skip = list(eos_rows) if eos_rows is not None else [ignore_eos] * len(samplings)
    for i, s in enumerate(list(samplings) + [GREEDY] * (batch - len(samplings))):
        no_eos = skip[i] if i < len(skip) else True
        ids.append(list(s.stop_token_ids) + ([eos] if eos is not None and not no_eos
                                             else []))
        row_seqs = []
        for text in s.stop_strings:
            if model.tokenizer is None:
                raise ValueError("stop_strings need a tokenizer; this model has none")
            toks = model.tokenizer.encode(text)
            if 0 < len(toks) <= STOP_WINDOW:
                row_seqs.append(toks)
        seqs.append(row_seqs)
    ms = max(1, max(len(r) for r in ids)) if widths is None else widths[0]
    mq = max(1, max(len(r) for r in seqs)) if widths is None else widths[1]
    if max(len(r) for r in ids) > ms or max(len(r) for r in seqs) > mq:
        raise ValueError(f"a request has more than {ms} stop token ids or {mq} stop strings")
    stop_ids = np.full((batch, ms), -1, np.int32)
    for b, r in enumerate(ids):
        stop_ids[b, : len(r)] = r
    stop_seqs = np.full((batch, mq, STOP_WINDOW), -1, np.int32)
    for b, r in enumerate(seqs):
        for j, toks in enumerate(r):
            stop_seqs[b, j, STOP_WINDOW - len(toks):] = toks
    return stop_ids, stop_seqs


def key_data(seed: int) -> np.ndarray:
    """jax.random.key_data(jax.random.key(seed)) of the default (threefry) keys, computed
    on the host: [2] uint32, the seed's high and low 32 bits. No device op per request."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.asarray([s >> 32, s & 0xFFFFFFFF], np.uint32)


def row_key_data(seeds: Sequence[int], batch: int) -> np.ndarray:
    """[B, 2] uint32 key data: row b's key is jax.random.key(seeds[b]) (padding rows 0)."""
    seeds = list(seeds) + [0] * (batch - len(seeds))
    return np.stack([key_data(s) for s in seeds])


@functools.partial(jax.jit, static_argnums=1)
def _folded_rows(key, batch: int):
    return jax.vmap(lambda b: jax.random.key_data(jax.random.fold_in(
        jax.random.wrap_key_data(key), b)))(jnp.arange(batch))


def generate_key_data(seed: int, batch: int) -> np.ndarray:
    """generate()'s [B, 2] row keys: row b draws from fold_in(key(seed), b) (one compiled
    call for every row)."""
    return np.asarray(_folded_rows(key_data(seed), batch))


# ---- the Engine ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The compiled shapes of an Engine: every field changes its programs.

    slots: rows of the decode batch; max_length: cache slots per row (prompt + generated);
    window: token columns one step call can fill; features: which sampling processing is
    compiled in (default all, so any request fits); stop_ids / stop_strings: the most stop
    token ids (eos included) and stop strings a request may have. plain_windows
    (PagedEngine, pipe = 1): also compile, per decode row count, a window of exactly
    `window` steps with the PLAIN sampler, for batches of Sampling.plain rows: no lax.cond
    and no data-dependent loop exit, which XLA:GPU evaluates on the host (it copies the
    predicate back and waits, every step), so its dispatch returns at once and the host's
    bookkeeping overlaps the device.
    """
    slots: int
    max_length: int
    window: int = 16
    features: Features = ALL_FEATURES
    stop_ids: int = 8
    stop_strings: int = 4
    page_size: int | None = None  # a paged KV cache (PagedEngine): tokens per page
    num_pages: int | None = None  # ... and pages in its pool (page 0 the null page)
    plain_windows: bool = False

    def __post_init__(self):
        for f in ("slots", "max_length", "window", "stop_ids", "stop_strings"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"EngineConfig.{f}: must be a positive integer, got {v!r}")
        for f in ("page_size", "num_pages"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 1):
                raise ValueError(f"EngineConfig.{f}: must be None or an integer > 1, "
                                 f"got {v!r}")
        if (self.page_size is None) != (self.num_pages is None):
            raise ValueError("EngineConfig.page_size and num_pages go together")


class Engine:
    """prefill / insert / step / free for one model on its mesh (module docstring)."""

    def __init__(self, model: Model, config: EngineConfig):
        if model.config.arch != "decoder":
            raise ValueError("Engine needs a decoder model; use encode() for encoders")
        limit = model.config.max_position_embeddings
        if config.max_length > limit:
            raise ValueError(f"EngineConfig.max_length: {config.max_length} exceeds the "
                             f"model's maximum of {limit} positions")
        data = shd.mesh_size(model.mesh, model.rules.get("cache_batch"))
        if config.slots % data:
            raise ValueError(f"EngineConfig.slots: {config.slots} is not a multiple of the "
                             f"data-parallel size {data}")
        self.model, self.config = model, config

    # ---- host helpers -------------------------------------------------------------------
    def request(self, samplings: Sequence[Sampling], max_new: Sequence[int], key_data,
                batch: int, ignore_eos: bool = False, widths=None, eos_rows=None) -> Request:
        """Device Request rows for `batch` rows (rows past the samplings are padding);
        eos_rows: ignore_eos per row instead of one value."""
        m = self.model
        rp, _ = row_params(samplings, batch)
        widths = widths or (self.config.stop_ids, self.config.stop_strings)
        stop_ids, stop_seqs = stop_arrays(m, samplings, batch, ignore_eos, widths, eos_rows)
        mx = np.zeros((batch,), np.int32)
        mx[: len(max_new)] = max_new
        s1, s2, s3 = (m._batch_sharding(batch, k) for k in (1, 2, 3))
        return Request(params=RowParams(*(to_global(a, s1) for a in rp)),
                       stop_ids=to_global(stop_ids, s2), stop_seqs=to_global(stop_seqs, s3),
                       max_new=to_global(mx, s1), key=to_global(np.asarray(key_data), s2))

    @functools.cached_property
    def shardings(self) -> DecodeState:
        """The slots' DecodeState shardings, one set per engine (state_shardings): the
        calls that return the slots' state return it in these."""
        m = self.model
        f = self.config.features
        return state_shardings(m.mesh, m.rules, self._cache_shardings(), f.penalties,
                               self.config.page_size is not None, f.top_logprobs)

    def _cache_shardings(self):
        return kv_shardings(self.model)

    def _compiled(self, name, factory, *key):
        return self.model.compiled.get((name,) + key, lambda: factory(self.model, *key))

    # ---- the API --------------------------------------------------------------------------
    def init_state(self) -> DecodeState:
        """A decode batch of free slots."""
        c = self.config
        one = self.prefill([[0]], [GREEDY], max_new=[1], seeds=[0], rows=c.slots,
                           cache_len=c.max_length)
        return self._call("free_all", _free_all, one)

    def prefill(self, prompts: Sequence[Sequence[int]], samplings: Sequence[Sampling],
                max_new: Sequence[int], seeds: Sequence[int] | None = None, **kwargs
                ) -> DecodeState:
        """Prompts (token-id lists) -> a DecodeState of their rows after the first token.

        max_new: tokens each may generate in all. seeds (one per prompt) or key_data
        [rows, 2]: the rows' PRNG keys. rows: the batch it is padded to (default: a power
        of two); cache_len: its cache slots (default: the prompt bucket, the least that
        insert() needs); ignore_eos; widths: (stop ids, stop strings) per row.
        """
        fn, args = self.prefill_call(prompts, samplings, max_new, seeds, **kwargs)
        self.compile_decode(fn, args)
        return fn(*args)

    def prefill_call(self, prompts, samplings, max_new, seeds=None, *, key_data=None,
                     rows: int | None = None, cache_len: int | None = None,
                     ignore_eos: bool = False, widths=None):
        """(the compiled prefill, its arguments) that prefill() calls: for lowering it,
        measuring it or timing it."""
        m, c = self.model, self.config
        limit = m.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        Tb = kvc.bucket(longest, limit)
        B = rows or kvc.cache_rows(len(prompts), shd.mesh_size(m.mesh,
                                                                m.rules.get("cache_batch")))
        S = cache_len or min(Tb, c.max_length)
        if longest > S:
            raise ValueError(f"a prompt of {longest} tokens does not fit the engine's "
                             f"{S} cache slots")
        ids = np.zeros((B, Tb), np.int32)
        lengths = np.ones((B,), np.int32)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
            lengths[b] = len(p)
        if key_data is None:
            key_data = row_key_data(seeds if seeds is not None else [0] * len(prompts), B)
        req = self.request(samplings, max_new, key_data, B, ignore_eos, widths)
        s1, s2 = m._batch_sharding(B, 1), m._batch_sharding(B, 2)
        args = (m.params, to_global(ids, s2), to_global(lengths, s1), req)
        return self._compiled("prefill", make_prefill, c.features, c.window, S), args

    def decode_loop(self):
        """The compiled decode loop, loop(params, state, until) (make_decode_loop)."""
        return self._compiled("decode", make_decode_loop, self.config.features)

    def compile_decode(self, prefill, args) -> None:
        """Compile prefill and the decode loop for these shapes before the first prefill
        allocates its KV cache; the calls that follow reuse both executables.

        XLA's autotuner times candidate kernels on scratch copies of their operands while
        it compiles, and over a quantized cache the decode loop's attention fusions take the
        whole stacked cache as an operand: compiled after prefill, beside the resident
        cache, a large cache may not leave the autotuner room (docs/performance.md).
        """
        key = ("decode compiled", self.config.features,
               tuple((a.shape, a.dtype) for a in jax.tree.leaves(args[1:])))
        if key in self.model.compiled:
            return
        lowered = prefill.lower(*args)
        compiled = lowered.compile()
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             lowered.out_info, compiled.output_shardings)
        self.decode_loop().lower(self.model.params, state, jax.ShapeDtypeStruct((), jnp.int32)).compile()
        self.model.compiled.put(key, True)

    def insert(self, state: DecodeState, prefilled: DecodeState, slots) -> DecodeState:
        """prefilled's first len(slots) rows into decode slots `slots` (one per row; the
        rest, a prefill's padding rows, are dropped). Their first tokens stay in
        prefilled's own window (tokens(prefilled))."""
        slots = np.asarray(slots, np.int32)
        n = prefilled.last.shape[0]
        if slots.ndim != 1 or not 0 < len(slots) <= n or slots.min() < 0 \
                or slots.max() >= self.config.slots or len(set(slots.tolist())) < len(slots):
            raise ValueError(f"insert: need 1 to {n} distinct slots in "
                             f"[0, {self.config.slots}), got {slots.tolist()}")
        return self._call("insert", _insert, state, prefilled, jnp.asarray(slots))

    def step(self, state: DecodeState, steps: int = 1, *, until: int | None = None
             ) -> DecodeState:
        """Up to `steps` tokens for every live slot, in a new window (`until`: continue the
        current window up to that column instead). Read them with tokens()."""
        loop = self.decode_loop()
        if until is None:
            if steps > state.out.shape[1]:
                raise ValueError(f"step: {steps} steps exceed the window of "
                                 f"{state.out.shape[1]} tokens")
            state = self._call("new_window", new_window, state)
            until = steps
        return loop(self.model.params, state, jnp.int32(until))

    def free(self, state: DecodeState, slots) -> DecodeState:
        """Mark slots free (done): they record nothing until a request is inserted."""
        return self._call("free", _free, state, jnp.asarray(np.asarray(slots, np.int32)))

    def tokens(self, state: DecodeState) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [B, W] int32, -1 where none; logprobs [B, W]) of the window, on host."""
        return to_host(state.out), to_host(state.logprobs)

    def top(self, state: DecodeState) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids [B, W, K] int32, log-probs [B, W, K]) of each window token's K most likely
        alternatives (sampling.top_logprobs), on host; None without them compiled in.
        Meaningful for rows that asked (Sampling.top_logprobs), where out >= 0."""
        if state.top_ids is None:
            return None
        return to_host(state.top_ids), to_host(state.top_lps)

    def _call(self, name, fn, *args):
        """fn(state, ...) -> the slots' state, compiled once per model and set of shardings;
        the state donated, returned in self.shardings."""
        sh = self.shardings
        return self.model.compiled.get((name, sh), lambda: jax.jit(
            fn, donate_argnums=(0,), out_shardings=sh))(*args)
