"""Continuous batching over a paged KV cache, with chunked prefill and prefix caching.

    sched = PagedScheduler(model, SchedulerConfig(slots=64, max_length=4096),
                           PagedConfig(page_size=16, num_pages=8192))

The same callers' side as Scheduler (submit / stream / result / abort from any thread). Each
tick the loop:
1. takes new requests and aborts;
2. builds one prefill call under a token budget: the next chunk of every prompt being
   prefilled, then new requests admitted into free slots while the pool has the pages their
   prompt needs (a prompt's cached prefix, found by its hashed full blocks, is shared and not
   computed again), so a long prompt never stalls the running requests for more than one
   chunk;
3. gives every decoding request the pages its next tokens need, preempting the most recently
   admitted requests (their pages released, themselves back at the head of the queue, later
   recomputed from prompt + tokens so far, mostly from the prefix cache) when the pool runs
   short;
4. runs the decode loop and hands each request its tokens; finished, aborted and failed
   requests release their pages at once (full blocks stay cached until evicted).
A request whose prompt the whole pool could never hold fails alone with the reason.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxformer.decode_state import STOP_WINDOW
from jaxformer.engine import EngineConfig
from jaxformer.paged_engine import Chunk, PagedEngine
from jaxformer.serving.pages import BlockTable, PagePool
from jaxformer.serving.scheduler import (FAILED, RUNNING, WAITING, Handle, Scheduler,
                                         SchedulerConfig, asks_top, log)


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    """page_size: tokens per page; num_pages: pages in the pool (page 0 is the null page);
    prefill_tokens: tokens one tick's prefill call holds at most, padding included (the
    chunked-prefill budget: rows x columns of the call); chunk: tokens of one prompt per
    prefill call at most; min_chunk: the fewest columns a call is padded to (at most chunk;
    calls take
    power-of-two shapes between the two: PagedEngine.shapes()); prefix_caching: share full
    blocks."""
    page_size: int = 16
    num_pages: int = 1024
    prefill_tokens: int = 512
    chunk: int = 256
    min_chunk: int = 16
    prefix_caching: bool = True

    def __post_init__(self):
        for f in ("page_size", "num_pages", "prefill_tokens", "chunk", "min_chunk"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 1:
                raise ValueError(f"PagedConfig.{f}: must be an integer > 1, got {v!r}")


class PagedScheduler(Scheduler):
    """Scheduler over a PagedEngine (module docstring)."""

    def __init__(self, model, config: SchedulerConfig = SchedulerConfig(),
                 paged: PagedConfig = PagedConfig()):
        self.paged = paged
        super().__init__(model, config)
        self.pool = PagePool(paged.num_pages, paged.page_size, paged.prefix_caching)
        self._tables: dict[int, BlockTable] = {}
        self._next: dict[int, int] = {}  # request id -> first prompt position not prefilled
        self._prefilling: list[int] = []  # slots whose prompt is being prefilled, in order
        self._live: list[int] = []  # decoding slots, in admission order
        self._dirty: dict[int, list[int]] = {}  # slot -> page table to send before a step
        # slot -> (cached tokens, prompt length): penalty state to rebuild before its prefill
        self._history: dict[int, tuple[list[int], int]] = {}
        self.preemptions = 0

    def _make_engine(self) -> PagedEngine:
        c, p = self.config, self.paged
        return PagedEngine(self.model, EngineConfig(
            slots=c.slots, max_length=c.max_length, window=c.steps_per_tick,
            stop_ids=c.stop_ids, stop_strings=c.stop_strings, page_size=p.page_size,
            num_pages=p.num_pages), chunk=min(p.chunk, p.prefill_tokens), min_chunk=p.min_chunk,
            prefill_tokens=p.prefill_tokens)

    def warmup(self) -> dict:
        """Compile every shape the loop calls (PagedEngine.shapes(), returned) before the
        first request, so serving never compiles in steady state. Call before start()."""
        if self._state is None:
            self._state = self.engine.init_state()
        self._state = self.engine.warmup(self._state)
        return self.engine.shapes()

    @staticmethod
    def _seq(h: Handle) -> list[int]:
        """What a request's cache must hold before its next token: the prompt, and for a
        preempted request the tokens it generated before."""
        return h.prompt + h.tokens

    # ---- prefill ------------------------------------------------------------------------
    def _admit(self) -> None:
        if self._state is None:
            self._state = self.engine.init_state()
        budget = self.paged.prefill_tokens
        chunks = []
        for slot in self._prefilling:
            if budget <= 0 or not self._chunk(slot, budget, chunks):
                break
            budget -= len(chunks[-1].ids)
        free = self._free_slots()
        while budget > 0 and free and self._waiting and self._room(chunks):
            h = self._waiting[0]
            if not self._place(h, free[0]):
                break
            self._waiting.popleft()
            self._chunk(free.pop(0), budget, chunks)  # the room for one more was checked
            budget -= len(chunks[-1].ids)
        if not chunks:
            return
        try:
            if self._dirty:  # page tables before the call: a chunk reads its earlier pages
                self._state = self.engine.set_pages(self._state, self._dirty)
                self._dirty = {}
            for slot, (seq, n_prompt) in self._history.items():
                self._state = self.engine.set_history(self._state, slot, seq, n_prompt)
            self._history = {}
            self._state, out = self.engine.prefill_chunks(self._state, chunks)
            done = np.asarray(self._state.done)
        except Exception as e:  # noqa: BLE001 - the failure belongs to these requests
            log.warning("prefill of %d chunks failed: %s", len(chunks), e)
            self._state = None
            self._fail_running(f"prefill failed: {e}")
            return
        for r, ch in enumerate(chunks):
            h = self._slots[ch.slot]
            self._next[h.id] = ch.start + len(ch.ids)
            self._computed(ch.slot, h, self._next[h.id])
            if ch.sampling.prompt_logprobs:
                h._prompt_logprobs(ch.start, len(ch.ids), [a[r] for a in out.prompt])
            if ch.last:
                self._prefilling.remove(ch.slot)
                self._live.append(ch.slot)
                h._emit([int(out.tokens[r])], [float(out.logprobs[r])],
                        (out.top[0][r:r + 1], out.top[1][r:r + 1]))
                if done[ch.slot]:
                    self._finish(ch.slot)

    def _place(self, h: Handle, slot: int) -> bool:
        """Give a waiting request a slot and the pages for its whole sequence plus one token
        (its cached prefix shared); False while the pool cannot (it stays waiting)."""
        seq, ps = self._seq(h), self.paged.page_size
        if -(-(len(seq) + 1) // ps) > self.paged.num_pages - 1:
            self._waiting.popleft()
            h._end(FAILED, f"{len(seq)} tokens need more pages than the pool's "
                           f"{self.paged.num_pages - 1} of {ps} tokens")
            return False
        table = BlockTable(ps)
        # prompt log-probs come from prefill: such a request computes its whole prompt
        start = 0 if h.sampling.prompt_logprobs else table.match_prefix(self.pool, seq)
        need = table.needed_pages(len(seq) + 1)
        if not self.pool.can_allocate(need):
            table.release(self.pool)
            return False
        table.append(self.pool.allocate(need))
        self._tables[h.id], self._next[h.id] = table, start
        s = h.sampling
        if start and (s.repetition_penalty != 1 or s.presence_penalty or s.frequency_penalty):
            # prefill skips the cached prefix: its tokens still count for the penalties
            self._history[slot] = (seq[:start], len(h.prompt))
        self._slots[slot] = h
        self._prefilling.append(slot)
        h.status = RUNNING
        return True

    def _room(self, chunks: list) -> bool:
        """Whether one more chunk (of the fewest columns) still makes a compiled shape."""
        return self.engine.fits([len(c.ids) for c in chunks] + [1])

    def _chunk(self, slot: int, budget: int, chunks: list) -> bool:
        """Add the next chunk of the slot's prompt: at most budget tokens, and as many as
        keep the call a compiled shape (PagedEngine.fits). False when none fits."""
        h = self._slots[slot]
        seq, start = self._seq(h), self._next[h.id]
        have = [len(c.ids) for c in chunks]
        n = min(len(seq) - start, budget, self.paged.chunk)
        while n > 0 and not self.engine.fits(have + [n]):
            n = max(c for c in [0] + self.engine.chunk_lengths() if c < n)
        if n <= 0:
            return False
        chunks.append(Chunk(slot, seq[start:start + n], start, self._tables[h.id].pages,
                            start + n == len(seq), h.sampling, h.max_new, h.seed,
                            h.ignore_eos, generated=len(h.tokens), prompt_len=len(h.prompt),
                            recent=h.tokens[-(STOP_WINDOW - 1):],
                            following=seq[start + n] if start + n < len(seq) else -1))
        return True

    def _computed(self, slot: int, h: Handle, n: int) -> None:
        """The first n tokens of the request's sequence have K/V in its pages: publish its
        full blocks (a block already cached elsewhere switches the table to that page)."""
        table = self._tables[h.id]
        before = list(table.pages)
        table.mark_computed(self._seq(h)[:n], self.pool)
        if table.pages != before:
            self._dirty[slot] = list(table.pages)

    # ---- decode -------------------------------------------------------------------------
    def _decode(self) -> None:
        if not self._live:
            return
        if not self._grow():
            return
        try:
            if self._dirty:
                self._state = self.engine.set_pages(self._state, self._dirty)
                self._dirty = {}
            top = max(self._live)  # decode only the slots up to the last live one
            rows = next(r for r in self.engine.decode_rows() if r > top)
            self._state = self.engine.step(self._state, self.config.steps_per_tick, rows=rows)
            toks, lps = self.engine.tokens(self._state)
            alts = self.engine.top(self._state) if asks_top(self._slots) else None
            done = np.asarray(self._state.done)
        except Exception as e:  # noqa: BLE001
            log.warning("decode step failed: %s", e)
            self._state = None
            self._fail_running(f"decode failed: {e}")
            return
        for slot in list(self._live):
            h = self._slots[slot]
            got = toks[slot] >= 0
            h._emit(toks[slot][got].tolist(), lps[slot][got].tolist(),
                    None if alts is None else (alts[0][slot][got], alts[1][slot][got]))
            self._computed(slot, h, len(self._seq(h)) - 1)  # the last token is fed next
            if done[slot]:
                self._finish(slot)

    def _grow(self) -> bool:
        """Pages for the next steps of every live request, preempting the most recently
        admitted ones while the pool is short. False when nothing is left to decode."""
        steps, ps = self.config.steps_per_tick, self.paged.page_size
        for slot in list(self._live):
            h = self._slots[slot]
            if h is None or slot not in self._live:
                continue
            table = self._tables[h.id]
            fed = len(self._seq(h)) - 1
            need = table.needed_pages(min(fed + steps, len(h.prompt) + h.max_new))
            while need and not self.pool.can_allocate(need):
                victim = (self._prefilling or self._live)[-1]
                if victim == slot and len(self._live) == 1 and not self._prefilling:
                    self._release(h, FAILED, f"the page pool ({self.paged.num_pages} pages of "
                                             f"{ps}) cannot hold this request")
                    break
                self._preempt(victim)
                if victim == slot:
                    break
            else:
                if need:
                    table.append(self.pool.allocate(need))
                    self._dirty[slot] = list(table.pages)
        return bool(self._live)

    def _preempt(self, slot: int) -> None:
        """Back to the head of the queue, pages released; recomputed when re-admitted."""
        h = self._slots[slot]
        self.preemptions += 1
        self._drop(slot, h)
        h.status = WAITING
        self._waiting.appendleft(h)

    # ---- endings ------------------------------------------------------------------------
    def _drop(self, slot: int, h: Handle) -> None:
        self._tables.pop(h.id).release(self.pool)
        self._next.pop(h.id, None)
        for order in (self._prefilling, self._live):
            if slot in order:
                order.remove(slot)
        self._dirty.pop(slot, None)
        self._history.pop(slot, None)
        self._slots[slot] = None
        if self._state is not None:
            self._state = self.engine.free(self._state, [slot])

    def _finish(self, slot: int) -> None:
        h = self._slots[slot]
        self._drop(slot, h)
        h._end("finished", "length" if len(h.tokens) >= h.max_new else "stop")

    def _release(self, h: Handle, status: str, reason: str) -> None:
        self._drop(self._slots.index(h), h)
        h._end(status, reason)

    def _fail_running(self, reason: str) -> None:
        for slot, h in enumerate(self._slots):
            if h is not None:
                self._tables.pop(h.id).release(self.pool)
                self._slots[slot] = None
                h._end(FAILED, reason)
        self._next, self._prefilling, self._live, self._dirty = {}, [], [], {}
        self._history = {}
