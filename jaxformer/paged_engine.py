"""The Engine over a paged KV cache: one pool of pages for every slot, page tables per row.

    engine = PagedEngine(model, EngineConfig(slots=64, max_length=4096, page_size=64,
                                             num_pages=2048))
    state = engine.init_state()
    state, out = engine.prefill_chunks(
        state, [Chunk(slot=3, ids=prompt[:512], start=0, pages=[5, 9, ...], ...)])
    state = engine.step(state, 4)                        # as Engine.step

A prompt is prefilled in chunks of at most `chunk` tokens, each chunk attending over its
sequence's pages (cached prefix included) and itself, writing its keys and values into the
pages the scheduler gave it (serving/pages.py decides which); the chunk that ends a prompt
samples the request's first token and makes its slot live. Pages hold what they hold: the
same prefix computed once serves every sequence whose table points at its pages. Decode
steps read each live row's pages; done and free rows write to the null page 0.

Meshes: kv heads on `tensor`; on pipe = S > 1 the pool's layers are on `pipe` (each stage
holds its layers' pages, the page tables are the same on every stage), a chunk call runs
through the stages as the GPipe forward (models/stages.py) and decode is pipeline.py's
circular schedule over S microbatches of the slots (slot i in microbatch i % S), so slots
must be a multiple of S. Data parallelism is one PagedEngine per replica.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxformer import cache as kvc
from jaxformer import pipeline
from jaxformer import sharding as shd
from jaxformer.decode_state import STOP_WINDOW, DecodeState, new_window
from jaxformer.engine import PLAIN, Engine, EngineConfig, decode_step, row_key_data
from jaxformer.paged_prefill import make_chunk_prefill
from jaxformer.sampling import GREEDY, TOP_LOGPROBS, Features, Sampling
from jaxformer.sharding import to_global, to_host

if TYPE_CHECKING:
    from jaxformer.model import Model


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One row of a prefill-chunk call: `ids` are the prompt tokens at positions
    [start, start + len(ids)) of the request in `slot`, whose page table is `pages`;
    last: this chunk ends the prompt (sample the first token, make the slot live)."""
    slot: int
    ids: Sequence[int]
    start: int
    pages: Sequence[int]
    last: bool
    sampling: Sampling = GREEDY
    max_new: int = 16
    seed: int = 0
    ignore_eos: bool = False
    generated: int = 0  # tokens the request generated before (a preempted one resumes)
    # a resumed request's sequence is prompt + generated tokens: positions from prompt_len
    # on are generated (they count for presence / frequency penalties; None: all prompt),
    # and its last generated tokens (at most STOP_WINDOW - 1) continue its stop window
    prompt_len: int | None = None
    recent: Sequence[int] = ()
    # the sequence's token after this chunk (-1: none): what its last position predicts,
    # for prompt log-probs (sampling.prompt_logprobs)
    following: int = -1


class ChunkOut(NamedTuple):
    """prefill_chunks' results, host arrays of n rows (one per chunk). A row whose chunk
    does not end its prompt has no first token (its entries are meaningless), nor
    alternatives a row that did not ask (Sampling.top_logprobs)."""
    tokens: np.ndarray  # [n] int32 first generated token
    logprobs: np.ndarray  # [n] its log-prob
    top: tuple  # (ids [n, K] int32, log-probs [n, K]) its K most likely alternatives
    # for rows with sampling.prompt_logprobs (None when no row has): (log-probs [n, C],
    # ids [n, C, K], log-probs [n, C, K]); column c is the chunk's position start + c
    # predicting the token after it (the chunk's next id, then `following`)
    prompt: tuple | None


def pool_shardings(model: Model) -> kvc.PagedKVCache:
    axes = kvc.PagedKVCache.axes(model.run.kv_cache)
    return jax.tree.map(lambda a: NamedSharding(model.mesh, shd.logical_to_spec(a, model.rules)),
                        axes, is_leaf=lambda a: isinstance(a, tuple))


class PagedEngine(Engine):
    """Engine whose slots share one pool of `num_pages` pages of `page_size` tokens."""

    def __init__(self, model: Model, config: EngineConfig, *, chunk: int = 256,
                 min_chunk: int = 16, prefill_tokens: int | None = None):
        super().__init__(model, config)
        if config.page_size is None:
            raise ValueError("PagedEngine needs EngineConfig.page_size and num_pages")
        if model.mesh.shape["data"] > 1:
            raise ValueError("a paged KV cache runs on pipe x tensor meshes (data = 1); data "
                             "parallelism is one PagedEngine per replica "
                             "(serving.replicas.ReplicaScheduler)")
        S = model.mesh.shape["pipe"]
        if config.slots % S:
            raise ValueError(f"EngineConfig.slots: {config.slots} is not a multiple of "
                             f"pipe={S}; on pipe > 1 the paged decode runs its slots as "
                             f"{S} microbatches (one per stage, slot i in microbatch i % {S})")
        self.stages = S
        self.chunk, self.min_chunk = chunk, min(min_chunk, chunk)
        self.prefill_tokens = prefill_tokens or chunk * config.slots
        self.width = -(-config.max_length // config.page_size)  # page-table columns M

    # ---- the compiled shapes ----------------------------------------------------------------
    def chunk_lengths(self) -> list[int]:
        """Token columns C a prefill-chunk call is padded to: powers of two from min_chunk,
        and chunk."""
        out, c = [], self.min_chunk
        while c < self.chunk:
            out.append(c)
            c *= 2
        return out + [self.chunk]

    def chunk_rows(self, C: int) -> list[int]:
        """Row counts b of a chunk call of C columns: powers of two with b * C within the
        prefill-token budget (at least one row), at most the slots."""
        out, b = [1], 2
        while b * C <= self.prefill_tokens and b <= self.config.slots:
            out.append(b)
            b *= 2
        return out

    def chunk_shape(self, lengths: Sequence[int]) -> tuple[int, int]:
        """(b, C) of the call that runs chunks of these lengths."""
        C = next(c for c in self.chunk_lengths() if c >= max(lengths))
        b = 1 << max(0, len(lengths) - 1).bit_length()
        return b, C

    def fits(self, lengths: Sequence[int]) -> bool:
        """Whether one chunk call can run chunks of these lengths (a compiled shape)."""
        if max(lengths) > self.chunk:
            return False
        b, C = self.chunk_shape(lengths)
        return b in self.chunk_rows(C)

    def decode_rows(self) -> list[int]:
        """Row counts the decode loop is compiled for: it runs the first r slots, r the
        least of these holding every live slot (powers of four from 4, and slots), so a
        lightly loaded batch does not pay for its free slots. On S > 1 pipeline stages they
        start at 4 rounded up to a multiple of S, so every r is one and the pipelined
        decode always runs S microbatches (slot i in microbatch i % S)."""
        out, r = [], -(-4 // self.stages) * self.stages
        while r < self.config.slots:
            out.append(r)
            r *= 4
        return out + [self.config.slots]

    def shapes(self) -> dict:
        """Every shape a serving loop calls, for warmup() and the docs."""
        chunks = [(b, C) for C in self.chunk_lengths() for b in self.chunk_rows(C)]
        out = {"chunk prefill (rows, tokens)": chunks, "decode rows": self.decode_rows()}
        if self.plain_prefill:
            out["plain chunk prefill (rows, tokens)"] = chunks
        if self.plain_windows:
            out[f"plain window of {self.config.window} steps, rows"] = self.decode_rows()
        return out

    @property
    def plain_windows(self) -> bool:
        """Whether step(plain=True) runs the fixed-length plain window (EngineConfig), and
        a chunk call whose rows are all plain the plain chunk program (prefill_chunks)."""
        return self.config.plain_windows and self.stages == 1

    @property
    def plain_prefill(self) -> bool:
        """Whether a plain chunk program is compiled beside the general one: where plain
        windows run, and the general one is not already plain (no sampling features)."""
        return self.plain_windows and self.config.features != PLAIN

    def _chunk_programs(self) -> tuple[bool, ...]:
        """The `plain` flags of the chunk programs warm-up compiles."""
        return (False, True) if self.plain_prefill else (False,)

    def precompile(self, state: DecodeState, workers: int) -> None:
        """Compile every chunk and decode shape of shapes() on `workers` threads, without
        running them: XLA compiles without holding the GIL, so the programs compile side by
        side (tracing them does hold it), and warmup()'s calls then find them compiled.
        state: any state of init_state()'s shapes (only its shapes and shardings are read)."""
        params = self.model.params
        jobs = [(self._chunk_fn(plain), (params, state, *self._chunk_args([], b, C)))
                for plain in self._chunk_programs() for C in self.chunk_lengths()
                for b in self.chunk_rows(C)]
        jobs += [(self._rows_loop(r), (params, state, jnp.int32(1)))
                 for r in self.decode_rows()]
        if self.plain_windows:
            jobs += [(self._rows_loop(r, plain=True), (params, state, jnp.int32(1)))
                     for r in self.decode_rows()]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for done in [pool.submit(lambda f, a: f.lower(*a).compile(), f, a) for f, a in jobs]:
                done.result()

    def warmup(self, state: DecodeState) -> DecodeState:
        """Compile (and run once, on padding rows that write only to the null page) every
        shape of shapes(), so steady-state serving never compiles."""
        for plain in self._chunk_programs():
            for C in self.chunk_lengths():
                for b in self.chunk_rows(C):
                    state, *_ = self._chunk_fn(plain)(self.model.params, state,
                                                      *self._chunk_args([], b, C))
        for r in self.decode_rows():
            state = self.step(state, 1, rows=r)
            if self.plain_windows:
                state = self.step(state, self.config.window, rows=r, plain=True)
        state = self.set_pages(state, {0: []})
        state = self.set_history(state, 0, [], 0)
        jax.block_until_ready(self.window(state)[:3])
        if state.top_ids is not None:
            jax.block_until_ready(self.window(state, top=True)[3])
        return self.free(state, [0])

    def init_state(self) -> DecodeState:
        """Every slot free, the pool zeros (one allocation, in its shardings)."""
        c, m = self.config, self.model
        B, V = c.slots, m.config.padded_vocab_size
        pool = kvc.PagedKVCache.abstract(m.config, c.num_pages, c.page_size, m.run.dtype,
                                         m.run.kv_cache)
        pool = jax.jit(lambda: pool.map(lambda a: jnp.zeros(a.shape, a.dtype)),
                       out_shardings=self.shardings.cache)()
        pen, top = c.features.penalties, c.features.top_logprobs
        zeros = np.zeros((B,), np.int32)
        rows = DecodeState(
            cache=None, last=zeros, lengths=zeros, done=np.ones((B,), bool), generated=zeros,
            step=np.int32(0), out=np.full((B, c.window), -1, np.int32),
            logprobs=np.zeros((B, c.window), np.float32),
            recent=np.full((B, STOP_WINDOW), -1, np.int32),
            seen=np.zeros((B, V), bool) if pen else None,
            counts=np.zeros((B, V), np.int32) if pen else None, req=None,
            pages=np.zeros((B, self.width), np.int32),
            top_ids=np.full((B, c.window, TOP_LOGPROBS), -1, np.int32) if top else None,
            top_lps=np.zeros((B, c.window, TOP_LOGPROBS), np.float32) if top else None)
        sh = self.shardings._replace(cache=None, req=None)
        state = jax.tree.map(to_global, rows, sh)._replace(
            cache=pool, req=self.request([GREEDY] * B, [1] * B, np.zeros((B, 2), np.uint32), B))
        # every array in its own sharding (rows made on each process, to_global), then
        # through a compiled call, which returns the state as every later call does: in
        # self.shardings, so no program compiles for a second set of input shardings
        return self.free(state, [])

    def _cache_shardings(self):
        return pool_shardings(self.model)

    def prefill_chunks(self, state: DecodeState, chunks: Sequence[Chunk], *,
                       on_host: bool = True):
        """Run prompt chunks into the pool (one call of a compiled shape: fits() must
        hold): returns (state, ChunkOut of the chunks, on host). on_host=False: the
        ChunkOut of the call's b >= n rows (those past n are padding) as device arrays,
        their copy to host started, for the caller to read later without stalling the
        device's queue. Chunks that are all Sampling.plain (and ask for no prompt
        log-probs) run the plain chunk program where plain_windows: an argmax sampler and
        no lax.cond, so XLA:GPU never stops the host inside the call."""
        lengths = [len(ch.ids) for ch in chunks]
        if not self.fits(lengths):
            raise ValueError(f"{len(chunks)} chunks of up to {max(lengths)} tokens are no "
                             f"compiled shape (chunk {self.chunk}, prefill_tokens "
                             f"{self.prefill_tokens})")
        b, C = self.chunk_shape(lengths)
        fn, args = self._chunk_fn(self.plain_chunks(chunks)), self._chunk_args(chunks, b, C)
        state, tok, lp, top, prompt = fn(self.model.params, state, *args)
        # the prompt log-probs cross to the host only when a chunk asked for them
        prompt = prompt if any(ch.sampling.prompt_logprobs for ch in chunks) else None
        if not on_host:
            return state, ChunkOut(*_copy_started(tok, lp), _copy_started(*top),
                                   None if prompt is None else _copy_started(*prompt))
        n = len(chunks)
        cut = lambda t: None if t is None else tuple(to_host(a)[:n] for a in t)  # noqa: E731
        return state, ChunkOut(to_host(tok)[:n], to_host(lp)[:n], cut(top), cut(prompt))

    def plain_chunks(self, chunks: Sequence[Chunk]) -> bool:
        """Whether prefill_chunks runs these chunks in the plain chunk program (no host
        stops inside): all Sampling.plain, none asking for prompt log-probs."""
        return self.plain_prefill and all(
            ch.sampling.plain and not ch.sampling.prompt_logprobs for ch in chunks)

    def _chunk_fn(self, plain: bool = False):
        c = self.config
        feats = PLAIN if plain else c.features
        return self.model.compiled.get(
            ("chunk prefill", feats, c.num_pages, c.page_size, self.shardings),
            lambda: make_chunk_prefill(self.model, feats, c.num_pages, c.page_size,
                                       self.shardings))

    def _chunk_args(self, chunks: Sequence[Chunk], b: int, C: int) -> tuple:
        """The chunk call's arguments after (params, state), on the device."""
        ids = np.zeros((b, C), np.int32)
        starts, lens = np.zeros((b,), np.int32), np.ones((b,), np.int32)
        slots = np.full((b,), -1, np.int32)
        pages = np.zeros((b, self.width), np.int32)
        last = np.zeros((b,), bool)
        gen0 = np.zeros((b,), np.int32)
        gen_from = np.full((b,), np.iinfo(np.int32).max, np.int32)
        hist = np.full((b, STOP_WINDOW), -1, np.int32)
        echo, following = np.zeros((b,), bool), np.full((b,), -1, np.int32)
        for r, ch in enumerate(chunks):
            echo[r], following[r] = ch.sampling.prompt_logprobs, ch.following
            ids[r, : len(ch.ids)] = ch.ids
            starts[r], lens[r], slots[r], last[r] = ch.start, len(ch.ids), ch.slot, ch.last
            gen0[r] = ch.generated
            if ch.prompt_len is not None:
                gen_from[r] = ch.prompt_len
            tail = list(ch.recent)[-(STOP_WINDOW - 1):]
            if tail:
                hist[r, STOP_WINDOW - len(tail):] = tail
            pages[r, : len(ch.pages)] = ch.pages
        keys = row_key_data([ch.seed for ch in chunks], b)
        req = self.request([ch.sampling for ch in chunks], [ch.max_new for ch in chunks],
                           keys, b, ignore_eos=False,
                           eos_rows=[ch.ignore_eos for ch in chunks])
        rep = lambda a: to_global(a, self.model._batch_sharding(b, a.ndim))  # noqa: E731
        return (rep(ids), rep(starts), rep(lens), rep(slots), rep(pages), rep(last),
                rep(gen0), rep(gen_from), rep(hist), rep(echo), rep(following), req)

    def step(self, state: DecodeState, steps: int = 1, *, until: int | None = None,
             rows: int | None = None, plain: bool = False) -> DecodeState:
        """As Engine.step; rows (one of decode_rows(), default all): run only the first
        `rows` slots (every live slot must be among them). plain (with plain_windows): a
        new window of exactly config.window steps (`steps` must be that) in the PLAIN
        sampler, for live rows that are all Sampling.plain: rows that finish idle to the
        window's end rather than end the loop early."""
        rows = self.config.slots if rows is None else rows
        if rows not in self.decode_rows():
            raise ValueError(f"step: rows {rows} is not one of {self.decode_rows()}")
        if plain:
            if not self.plain_windows or until is not None or steps != self.config.window:
                raise ValueError(f"step: a plain window needs plain_windows, pipe = 1 and "
                                 f"steps = the window ({self.config.window}), no until")
            return self._rows_loop(rows, plain=True)(self.model.params, state, jnp.int32(0))
        if until is None:
            if steps > state.out.shape[1]:
                raise ValueError(f"step: {steps} steps exceed the window of "
                                 f"{state.out.shape[1]} tokens")
            state = self._call("new_window", new_window, state)
            until = steps
        return self._rows_loop(rows)(self.model.params, state, jnp.int32(until))

    def _rows_loop(self, rows: int, plain: bool = False):
        feats, sh = (PLAIN if plain else self.config.features), self.shardings
        steps = self.config.window if plain else None
        return self.model.compiled.get(
            ("decode rows", feats, rows, steps, sh),
            lambda: make_rows_loop(self.model, feats, rows, sh, steps))

    def set_pages(self, state: DecodeState, rows: dict[int, Sequence[int]]) -> DecodeState:
        """Slots' page tables ({slot: pages}) after the scheduler changed them (pages for
        more tokens, or a block switched to its prefix-cache copy)."""
        slots, table = self._padded_rows(list(rows))
        for i, pages in enumerate(rows.values()):
            table[i, : len(pages)] = pages
        return self._call("set pages", _set_rows, state, jnp.asarray(slots),
                          jnp.asarray(table))

    def _padded_rows(self, slots):
        """(slots [B] padded with the out-of-range slot B, zero tables [B, M]): one shape
        for these small calls, whatever the count."""
        n = self.config.slots
        padded = np.full((n,), n, np.int32)
        padded[: len(slots)] = slots
        return padded, np.zeros((n, self.width), np.int32)

    def set_history(self, state: DecodeState, slot: int, seq: Sequence[int],
                    prompt_len: int) -> DecodeState:
        """The slot's penalty state (seen tokens, generated-token counts) from the tokens
        its cache already holds, `seq` (prompt, then generated tokens from prompt_len on):
        for a request whose prefill starts past a cached prefix. One program (seq padded
        to max_length); a no-op without penalties compiled in."""
        if state.seen is None:
            return state
        L = self.config.max_length
        if len(seq) > L:
            raise ValueError(f"set_history: {len(seq)} tokens exceed max_length {L}")
        ids = np.zeros((L,), np.int32)
        ids[: len(seq)] = seq
        return self._call("set history", _set_history, state, jnp.int32(slot),
                          jnp.asarray(ids), jnp.int32(len(seq)), jnp.int32(prompt_len))

    def free(self, state: DecodeState, slots) -> DecodeState:
        """Free slots: done, and their page tables cleared (their pages may be reused)."""
        padded, _ = self._padded_rows(list(slots))
        return self._call("free paged", _free_paged, state, jnp.asarray(padded))

    def window(self, state: DecodeState, top: bool = False) -> tuple:
        """Copies of the window's (tokens [B, W], logprobs [B, W], done [B], and with top
        the alternatives (ids [B, W, K], log-probs [B, W, K]) where compiled in, else None)
        on the device, their copy to host started: what tokens() and top() read, kept past
        the state's donation to the next call, so the host can read a window while the
        device runs the next one."""
        top = top and state.top_ids is not None
        fn = self.model.compiled.get(("window", top, self.shardings), lambda: jax.jit(
            _window_top if top else _window))
        out = _copy_started(*fn(state))
        return (*out[:3], tuple(out[3:]) if top else None)


def _window(state: DecodeState):
    return tuple(jnp.copy(a) for a in (state.out, state.logprobs, state.done))


def _window_top(state: DecodeState):
    return _window(state) + (jnp.copy(state.top_ids), jnp.copy(state.top_lps))


def _copy_started(*arrays) -> tuple:
    """arrays, each one's copy to host begun (to_host later finds it there): a copy of an
    array spread over several processes is left to to_host's gather."""
    for a in arrays:
        if a.is_fully_addressable:
            a.copy_to_host_async()
    return arrays


def _set_rows(state: DecodeState, slots, rows):
    return state._replace(pages=state.pages.at[slots].set(rows, mode="drop"))


def _set_history(state: DecodeState, slot, ids, n, prompt_len):
    """ids [L] int32, the first n valid: seen = every id, counts = ids at positions >=
    prompt_len (the generated ones), as the decode loop would have left them."""
    pos = jnp.arange(ids.shape[0])
    valid = pos < n
    V = state.seen.shape[1]
    seen = jnp.zeros((V,), bool).at[ids].max(valid)
    counts = jnp.zeros((V,), jnp.int32).at[ids].add((valid & (pos >= prompt_len))
                                                    .astype(jnp.int32))
    return state._replace(seen=state.seen.at[slot].set(seen),
                          counts=state.counts.at[slot].set(counts))


def _free_paged(state: DecodeState, slots):
    return state._replace(done=state.done.at[slots].set(True, mode="drop"),
                          pages=state.pages.at[slots].set(0, mode="drop"))


def make_rows_loop(model: Model, feats: Features, rows: int, shardings: DecodeState,
                   steps: int | None = None):
    """jit(fn(params, state, until)): the decode loop (engine.make_decode_loop) over the
    first `rows` slots of the state (the pool whole), the other rows untouched; the state
    is donated and returned in `shardings`. On pipe > 1 the pipelined circular schedule
    (pipeline.decode_loop). steps (pipe = 1): a new window of exactly that many steps
    instead (`until` unused), a loop whose trip count XLA knows, so it never asks the host
    whether to go on."""
    staged = pipeline.decode_loop(model, feats) if model.mesh.shape["pipe"] > 1 else None
    if steps is not None and staged is not None:
        raise ValueError("a fixed-length decode window runs on pipe = 1 only")

    def fn(params, state: DecodeState, until):
        B = state.last.shape[0]
        if steps is not None:
            state = new_window(state)
        head = lambda a: a[:rows] if a.ndim and a.shape[0] == B else a  # noqa: E731
        part = jax.tree.map(head, state._replace(cache=None))._replace(cache=state.cache)
        if staged is not None:
            part = staged(params, part, until)
        elif steps is not None:
            with model.traced():
                body = lambda _, s: decode_step(model, params, s, feats)  # noqa: E731
                part = jax.lax.fori_loop(0, steps, body, part)
        else:
            with model.traced():
                cond = lambda s: (s.step < until) & ~s.done.all()  # noqa: E731
                body = lambda s: decode_step(model, params, s, feats)  # noqa: E731
                part = jax.lax.while_loop(cond, body, part)
        put = lambda a, p: a.at[:rows].set(p) if a.ndim and a.shape[0] == B else p  # noqa
        merged = jax.tree.map(put, state._replace(cache=None), part._replace(cache=None))
        return merged._replace(cache=part.cache)

    return model.jit(fn, donate_argnums=(1,), out_shardings=shardings)
