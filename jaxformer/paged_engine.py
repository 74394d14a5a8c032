"""The Engine over a paged KV cache: one pool of pages for every slot, page tables per row.

    engine = PagedEngine(model, EngineConfig(slots=64, max_length=4096, page_size=64,
                                             num_pages=2048))
    state = engine.init_state()
    state, first, logprob = engine.prefill_chunks(state, [Chunk(slot=3, ids=prompt[:512],
                                                   start=0, pages=[5, 9, ...], ...)])
    state = engine.step(state, 4)                        # as Engine.step

A prompt is prefilled in chunks of at most `chunk` tokens, each chunk attending over its
sequence's pages (cached prefix included) and itself, writing its keys and values into the
pages the scheduler gave it (serving/pages.py decides which); the chunk that ends a prompt
samples the request's first token and makes its slot live. Pages hold what they hold: the
same prefix computed once serves every sequence whose table points at its pages. Decode
steps read each live row's pages; done and free rows write to the null page 0.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxformer import cache as kvc
from jaxformer import sharding as shd
from jaxformer.decode_state import STOP_WINDOW, DecodeState, Request, new_window, row_keys, \
    stopped
from jaxformer.engine import Engine, EngineConfig, row_key_data
from jaxformer.sampling import GREEDY, Features, Sampling, sample
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


def pool_shardings(model: Model) -> kvc.PagedKVCache:
    axes = kvc.PagedKVCache.axes(model.run.kv_cache)
    return jax.tree.map(lambda a: NamedSharding(model.mesh, shd.logical_to_spec(a, model.rules)),
                        axes, is_leaf=lambda a: isinstance(a, tuple))


def make_chunk_prefill(model: Model, feats: Features, num_pages: int, page_size: int):
    """jit(fn(params, state, ids [b, C], starts [b], lens [b], slots [b], pages [b, M],
    last [b], req rows [b]) -> (state, first tokens [b], their logprobs [b])); the state
    (its pool) is donated. Rows with slot -1 are padding."""
    del num_pages, page_size  # part of the compile key through the state's shapes

    def fn(params, state: DecodeState, ids, starts, lens, slots, pages, last, gen0,
           req: Request):
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
            if feats.penalties:
                valid = jnp.arange(C)[None] < lens[:, None]
                first = (starts == 0)[:, None]
                rows_seen = jnp.where(first, False, seen[jnp.clip(at, 0, B - 1)])
                rows_seen = rows_seen.at[jnp.arange(b)[:, None], ids].max(valid)
                seen = seen.at[at].set(rows_seen, mode="drop")
                counts = counts.at[at].set(jnp.where(first, 0, counts[jnp.clip(at, 0, B - 1)]),
                                           mode="drop")
            tok, lp = sample(logits, req.params, feats, row_keys(req.key, gen0),
                             None if seen is None else seen[jnp.clip(at, 0, B - 1)],
                             None if counts is None else counts[jnp.clip(at, 0, B - 1)])
            live = jnp.where(last, at, B)  # only a prompt's last chunk makes its slot live
            recent = jnp.full((b, STOP_WINDOW), -1, jnp.int32).at[:, -1].set(tok)
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
            return state, tok, lp

    return model.jit(fn, donate_argnums=(1,))


class PagedEngine(Engine):
    """Engine whose slots share one pool of `num_pages` pages of `page_size` tokens."""

    def __init__(self, model: Model, config: EngineConfig, *, chunk: int = 256):
        super().__init__(model, config)
        if config.page_size is None:
            raise ValueError("PagedEngine needs EngineConfig.page_size and num_pages")
        if model.mesh.shape["pipe"] > 1 or model.mesh.shape["data"] > 1:
            raise ValueError("a paged KV cache runs on tensor-parallel meshes (pipe = data = "
                             "1); data parallelism is one PagedEngine per replica "
                             "(serving.replicas.ReplicaScheduler)")
        self.chunk = chunk
        self.width = -(-config.max_length // config.page_size)  # page-table columns M

    def init_state(self) -> DecodeState:
        """Every slot free, the pool zeros (one allocation, in its shardings)."""
        c, m = self.config, self.model
        B, V = c.slots, m.config.padded_vocab_size
        pool = kvc.PagedKVCache.abstract(m.config, c.num_pages, c.page_size, m.run.dtype,
                                         m.run.kv_cache)
        pool = jax.jit(lambda: pool.map(lambda a: jnp.zeros(a.shape, a.dtype)),
                       out_shardings=pool_shardings(m))()
        zeros = np.zeros((B,), np.int32)
        pen = c.features.penalties
        req = self.request([GREEDY] * B, [1] * B, np.zeros((B, 2), np.uint32), B)
        state = DecodeState(
            cache=pool, last=jnp.asarray(zeros), lengths=jnp.asarray(zeros),
            done=jnp.ones((B,), bool), generated=jnp.asarray(zeros), step=jnp.int32(0),
            out=None, logprobs=None, recent=jnp.full((B, STOP_WINDOW), -1, jnp.int32),
            seen=jnp.zeros((B, V), bool) if pen else None,
            counts=jnp.zeros((B, V), jnp.int32) if pen else None, req=req,
            pages=jnp.zeros((B, self.width), jnp.int32))
        return new_window(state, c.window)

    def prefill_chunks(self, state: DecodeState, chunks: Sequence[Chunk]):
        """Run prompt chunks (rows padded to a power of two, tokens to `chunk`) into the
        pool: returns (state, first tokens [n], their logprobs [n]) on host; entries of
        rows whose chunk is not their prompt's last are meaningless."""
        n = len(chunks)
        b = 1 << max(0, n - 1).bit_length()
        C = kvc.bucket(max(len(ch.ids) for ch in chunks), self.chunk)
        if max(len(ch.ids) for ch in chunks) > C:
            raise ValueError(f"a chunk of {max(len(ch.ids) for ch in chunks)} tokens exceeds "
                             f"the engine's chunk of {self.chunk}")
        ids = np.zeros((b, C), np.int32)
        starts, lens = np.zeros((b,), np.int32), np.ones((b,), np.int32)
        slots = np.full((b,), -1, np.int32)
        pages = np.zeros((b, self.width), np.int32)
        last = np.zeros((b,), bool)
        gen0 = np.zeros((b,), np.int32)
        for r, ch in enumerate(chunks):
            ids[r, : len(ch.ids)] = ch.ids
            starts[r], lens[r], slots[r], last[r] = ch.start, len(ch.ids), ch.slot, ch.last
            gen0[r] = ch.generated
            pages[r, : len(ch.pages)] = ch.pages
        keys = row_key_data([ch.seed for ch in chunks], b)
        req = self.request([ch.sampling for ch in chunks], [ch.max_new for ch in chunks],
                           keys, b, ignore_eos=False,
                           eos_rows=[ch.ignore_eos for ch in chunks])
        rep = lambda a: to_global(a, self.model._batch_sharding(b, a.ndim))  # noqa: E731
        c = self.config
        fn = self.model.compiled.get(
            ("chunk prefill", c.features, c.num_pages, c.page_size),
            lambda: make_chunk_prefill(self.model, c.features, c.num_pages, c.page_size))
        state, tok, lp = fn(self.model.params, state, rep(ids), rep(starts), rep(lens),
                            rep(slots), rep(pages), rep(last), rep(gen0), req)
        return state, to_host(tok)[:n], to_host(lp)[:n]

    def set_pages(self, state: DecodeState, rows: dict[int, Sequence[int]]) -> DecodeState:
        """Slots' page tables ({slot: pages}) after the scheduler changed them (pages for
        more tokens, or a block switched to its prefix-cache copy)."""
        slots = np.asarray(list(rows), np.int32)
        table = np.zeros((len(rows), self.width), np.int32)
        for i, pages in enumerate(rows.values()):
            table[i, : len(pages)] = pages
        return self._call("set pages", _set_rows, state, jnp.asarray(slots),
                          jnp.asarray(table))

    def free(self, state: DecodeState, slots) -> DecodeState:
        """Free slots: done, and their page tables cleared (their pages may be reused)."""
        return self._call("free paged", _free_paged, state,
                          jnp.asarray(np.asarray(slots, np.int32)))


def _set_rows(state: DecodeState, slots, rows):
    return state._replace(pages=state.pages.at[slots].set(rows))


def _free_paged(state: DecodeState, slots):
    return state._replace(done=state.done.at[slots].set(True),
                          pages=state.pages.at[slots].set(0))
