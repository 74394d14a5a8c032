"""Continuous batching over a paged KV cache, with chunked prefill and prefix caching.

    sched = PagedScheduler(model, SchedulerConfig(slots=64, max_length=4096),
                           PagedConfig(page_size=16, num_pages=8192))

The same callers' side as Scheduler (submit / stream / result / abort from any thread). Each
tick the loop:
1. takes new requests and aborts;
2. builds one prefill call of a compiled shape, rows x columns within a token budget: the
   shape that prefills the most prompt tokens (padding costs as much as a token), filled
   with the next chunk of every prompt being prefilled, then of new requests admitted into
   free slots while the pool has the pages their prompt needs (a prompt's cached prefix,
   found by its hashed full blocks, is shared and not computed again), so a long prompt
   never stalls the running requests for more than one chunk;
3. gives every decoding request the pages its next tokens need, preempting the most recently
   admitted requests (their pages released, themselves back at the head of the queue, later
   recomputed from prompt + tokens so far, mostly from the prefix cache) when the pool runs
   short;
4. runs the decode loop and hands each request its tokens; finished, aborted and failed
   requests release their pages at once (full blocks stay cached until evicted).
A request whose prompt the whole pool could never hold fails alone with the reason.

With PagedConfig.overlap the host does not wait for a call's tokens before queueing the
next: each tick dispatches its prefill and decode calls, then reads the calls of the tick
before (and this tick's first tokens) while the device runs this tick's decode window, so
the host's work per tick (emitting tokens, publishing blocks, admission) hides behind the
device's. What the host does not know yet is bounded: a row's unread tokens count as
generated when its pages are grown (`_lag`), a row that finished is freed when its window
is read (it idles, done on the device, one window meanwhile), and before preempting, every
unread call is read (finished rows give their pages back; a victim must hold all its
tokens to be recomputed from them). Only plain calls (the plain window and the plain chunk
program, which never stop the host) are read late: a general call's dispatch waits inside
it on the device anyway, so its tokens are read at once (after any unread ones).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from jaxformer.decode_state import STOP_WINDOW
from jaxformer.engine import EngineConfig
from jaxformer.paged_engine import Chunk, PagedEngine
from jaxformer.serving.pages import BlockTable, PagePool
from jaxformer.serving.request import FAILED, RUNNING, WAITING, Handle, asks_top
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig, log
from jaxformer.sharding import to_host


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    """page_size: tokens per page; num_pages: pages in the pool (page 0 is the null page);
    prefill_tokens: tokens one tick's prefill call holds at most, padding included (the
    chunked-prefill budget: rows x columns of the call); chunk: tokens of one prompt per
    prefill call at most; min_chunk: the fewest columns a call is padded to (at most chunk;
    calls take power-of-two shapes between the two: PagedEngine.shapes()); prefix_caching:
    share full blocks; overlap: read each plain call's tokens while the device runs the next
    call (the host's work per tick hidden behind the device's; a finished request's slot is
    reused one tick later), None: where plain windows run; plain_windows: a tick whose live
    requests are all Sampling.plain, one of them with a whole window still to go, runs
    EngineConfig.plain_windows' decode window (no host syncs inside; compiled at warm-up
    beside the general one), and a prefill call of plain chunks the plain chunk program
    (PagedEngine.prefill_chunks), None: on GPUs, where those syncs cost (XLA:CPU runs
    control flow on the host anyway)."""
    page_size: int = 16
    num_pages: int = 1024
    prefill_tokens: int = 512
    chunk: int = 256
    min_chunk: int = 16
    prefix_caching: bool = True
    overlap: bool | None = None
    plain_windows: bool | None = None

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
        # prompt tokens prefilled, and the rows x columns the calls computed for them
        self.prefill_real = self.prefill_computed = 0
        # overlap: calls whose tokens the host has not read yet, oldest first, each
        # (kind, device arrays, {slot: handle} as dispatched, chunks); request id -> tokens
        # its row generated on the device that its handle does not hold yet
        self._unread: list[tuple] = []
        self._lag: dict[int, int] = {}

    def _make_engine(self) -> PagedEngine:
        c, p = self.config, self.paged
        plain = p.plain_windows if p.plain_windows is not None else \
            self.model.mesh.devices.flat[0].platform == "gpu"
        return PagedEngine(self.model, EngineConfig(
            slots=c.slots, max_length=c.max_length, window=c.steps_per_tick,
            stop_ids=c.stop_ids, stop_strings=c.stop_strings, page_size=p.page_size,
            num_pages=p.num_pages, plain_windows=plain), chunk=min(p.chunk, p.prefill_tokens),
            min_chunk=p.min_chunk, prefill_tokens=p.prefill_tokens)

    def warmup(self, compile_workers: int = 1) -> dict:
        """Compile every shape the loop calls (PagedEngine.shapes(), returned) before the
        first request, so serving never compiles in steady state; compile_workers > 1
        compiles the shapes on that many threads first (PagedEngine.precompile). Call
        before start()."""
        if self._state is None:
            self._state = self.engine.init_state()
        if compile_workers > 1:
            self.engine.precompile(self._state, compile_workers)
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
        free = self._free_slots()
        # what is left to prefill of the prompts being prefilled, then of the waiting
        # requests that free slots could take (their cached prefix not yet deducted)
        rest = [len(self._seq(self._slots[s])) - self._next[self._slots[s].id]
                for s in self._prefilling]
        rest += [len(self._seq(h)) for h in itertools.islice(self._waiting, len(free))]
        if not rest:
            return
        b, C = self._call_shape(rest)
        chunks = []
        for slot in self._prefilling[:b]:
            self._chunk(slot, C, chunks)
        while len(chunks) < b and free and self._waiting:
            h = self._waiting[0]
            if not self._place(h, free[0]):
                break
            self._waiting.popleft()
            self._chunk(free.pop(0), C, chunks)
        if not chunks:
            return
        lengths = [len(ch.ids) for ch in chunks]
        rows, cols = self.engine.chunk_shape(lengths)
        self.prefill_real += sum(lengths)
        self.prefill_computed += rows * cols
        try:
            if self._dirty:  # page tables before the call: a chunk reads its earlier pages
                self._state = self.engine.set_pages(self._state, self._dirty)
                self._dirty = {}
            for slot, (seq, n_prompt) in self._history.items():
                self._state = self.engine.set_history(self._state, slot, seq, n_prompt)
            self._history = {}
            # a general call's tokens are read at once: its requests have none unread
            overlap = self._overlap and self.engine.plain_chunks(chunks)
            self._state, out = self.engine.prefill_chunks(self._state, chunks,
                                                          on_host=not overlap)
            done = self.engine.window(self._state)[2] if overlap else \
                np.asarray(self._state.done)
        except Exception as e:  # noqa: BLE001 - the failure belongs to these requests
            self._failed("prefill", f"prefill of {len(chunks)} chunks", e)
            return
        owners = {ch.slot: self._slots[ch.slot] for ch in chunks}
        for ch in chunks:
            h = owners[ch.slot]
            self._next[h.id] = ch.start + len(ch.ids)
            self._computed(ch.slot, h, self._next[h.id])
            if ch.last:
                self._prefilling.remove(ch.slot)
                self._live.append(ch.slot)
        if overlap:  # read at the end of this tick, once the next decode call is queued
            for ch in chunks:
                if ch.last:
                    self._lag[owners[ch.slot].id] = 1
            self._unread.append(("chunks", (out, done), owners, chunks))
        else:
            self._read_chunks((out, done), owners, chunks)

    def _read_chunks(self, arrays, owners: dict, chunks: Sequence[Chunk]) -> None:
        """Each finished prompt's first token (and its alternatives) to its request, and
        the prompt log-probs of the chunks that asked for them."""
        out, done = arrays
        toks, lps, done = _host(out.tokens), _host(out.logprobs), _host(done)
        top = tuple(_host(a) for a in out.top)
        prompt = None if out.prompt is None else tuple(_host(a) for a in out.prompt)
        for r, ch in enumerate(chunks):
            h = owners[ch.slot]
            if self._slots[ch.slot] is not h:  # ended since (an abort)
                continue
            if ch.sampling.prompt_logprobs:
                h._prompt_logprobs(ch.start, len(ch.ids), [a[r] for a in prompt])
            if not ch.last:
                continue
            self._read(h, 1)
            h._emit([int(toks[r])], [float(lps[r])], (top[0][r:r + 1], top[1][r:r + 1]))
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

    def _call_shape(self, rest: Sequence[int]) -> tuple[int, int]:
        """(rows b, columns C) of this tick's prefill call, a compiled shape (b x C within
        prefill_tokens): the one that prefills the most tokens of these prompts' remaining
        `rest` (the first b of them, oldest first, min(rest, C) each), and of those the
        smallest. Padding rows and columns cost as much as real tokens, so a call of short
        prompts gets short, many rows, and long prompts advance by C at a time."""
        best = None
        for C in self.engine.chunk_lengths():
            for b in self.engine.chunk_rows(C):
                key = (sum(min(r, C) for r in rest[:b]), -b * C)
                if best is None or key > best[0]:
                    best = (key, b, C)
        return best[1], best[2]

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
        if not table.fills_block(n):
            table.computed(n)
            return
        before = list(table.pages)
        table.mark_computed(self._seq(h)[:n], self.pool)
        if table.pages != before:
            self._dirty[slot] = list(table.pages)

    # ---- decode -------------------------------------------------------------------------
    def _decode(self) -> None:
        if not self._live or not self._grow():
            self._read_unread()
            return
        W = self.config.steps_per_tick
        try:
            if self._dirty:
                self._state = self.engine.set_pages(self._state, self._dirty)
                self._dirty = {}
            top = max(self._live)  # decode only the slots up to the last live one
            rows = next(r for r in self.engine.decode_rows() if r > top)
            plain = self._plain_window()
            self._state = self.engine.step(self._state, W, rows=rows, plain=plain)
            window = self.engine.window(self._state, top=asks_top(self._slots))
        except Exception as e:  # noqa: BLE001
            self._failed("decode", "decode step", e)
            return
        owners = {slot: self._slots[slot] for slot in self._live}
        if self._overlap and plain:  # the host reads the earlier calls while this one runs
            for h in owners.values():
                self._lag[h.id] = self._lag.get(h.id, 0) + W
            self._read_unread()
            self._unread.append(("window", window, owners, None))
        else:
            self._read_unread()
            self._read_window(window, owners)

    @property
    def _overlap(self) -> bool:
        """PagedConfig.overlap resolved: None is on where plain windows run."""
        o = self.paged.overlap
        return self.engine.plain_windows if o is None else o

    def _plain_window(self) -> bool:
        """Whether this tick's decode runs the plain window (PagedEngine.step plain): every
        live request Sampling.plain, and one with a whole window of tokens still to go, so
        the fixed-length window wastes no step on rows the host knows are done."""
        if not self.engine.plain_windows:
            return False
        go = 0
        for slot in self._live:
            h = self._slots[slot]
            if not h.sampling.plain:
                return False
            go = max(go, h.max_new - len(h.tokens) - self._lag.get(h.id, 0))
        return go >= self.config.steps_per_tick

    def _read_window(self, arrays, owners: dict) -> None:
        """A decode window's tokens to their requests; finished ones end."""
        try:
            toks, lps, done = (_host(a) for a in arrays[:3])
            alts = None if arrays[3] is None else tuple(_host(a) for a in arrays[3])
        except Exception as e:  # noqa: BLE001 - an asynchronous failure of the call
            self._failed("decode", "decode step", e)
            return
        rows, row_lps = toks.tolist(), lps.tolist()  # one conversion, not one a row
        ended = []
        try:
            for slot, h in owners.items():
                if self._slots[slot] is not h:  # ended since (an abort, a preemption)
                    continue
                got = [i for i, t in enumerate(rows[slot]) if t >= 0]
                self._read(h, self.config.steps_per_tick)
                h._emit([rows[slot][i] for i in got], [row_lps[slot][i] for i in got],
                        None if alts is None else (alts[0][slot][got], alts[1][slot][got]))
                # the last token is fed next
                self._computed(slot, h, len(h.prompt) + len(h.tokens) - 1)
                if done[slot]:
                    self._finish(slot, free=False)
                    ended.append(slot)
        finally:  # one call frees the window's finished rows (their pages are released)
            if ended and self._state is not None:
                self._state = self.engine.free(self._state, ended)

    def _read(self, h: Handle, n: int) -> None:
        """overlap: a call's tokens of h (at most n) are on the host now."""
        if h.id in self._lag:
            self._lag[h.id] -= n
            if self._lag[h.id] <= 0:
                del self._lag[h.id]

    def _read_unread(self) -> None:
        """overlap: read every call dispatched before, oldest first."""
        while self._unread:
            kind, arrays, owners, chunks = self._unread.pop(0)
            if kind == "window":
                self._read_window(arrays, owners)
            else:
                try:
                    self._read_chunks(arrays, owners, chunks)
                except Exception as e:  # noqa: BLE001
                    self._failed("prefill", f"prefill of {len(chunks)} chunks", e)

    def _failed(self, what: str, call: str, e: Exception) -> None:
        """A device call failed: its requests fail, the state is rebuilt for the others."""
        log.warning("%s failed: %s", call, e)
        self._state = None
        self._fail_running(f"{what} failed: {e}")

    def _grow(self) -> bool:
        """Pages for the next steps of every live request, preempting the most recently
        admitted ones while the pool is short. False when nothing is left to decode."""
        steps, ps = self.config.steps_per_tick, self.paged.page_size
        for slot in list(self._live):
            h = self._slots[slot]
            if h is None or slot not in self._live:
                continue
            table = self._tables[h.id]
            # overlap: tokens the device made that the host has not read count as fed (at
            # most: a row that finished among them is freed once they are read)
            fed = len(h.prompt) + len(h.tokens) - 1 + self._lag.get(h.id, 0)
            need = table.needed_pages(min(fed + steps, len(h.prompt) + h.max_new))
            if need and not self.pool.can_allocate(need) and self._unread:
                # before preempting: read what finished (its pages come back), and a
                # victim must hold every token it made to be recomputed from them
                self._read_unread()
                return self._grow()
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
    def _drop(self, slot: int, h: Handle, free: bool = True) -> None:
        """Forget the request in slot; free: mark the slot free on the device now (else
        the caller frees it, with others, before the next device call)."""
        self._tables.pop(h.id).release(self.pool)
        self._next.pop(h.id, None)
        self._lag.pop(h.id, None)
        for order in (self._prefilling, self._live):
            if slot in order:
                order.remove(slot)
        self._dirty.pop(slot, None)
        self._history.pop(slot, None)
        self._slots[slot] = None
        if free and self._state is not None:
            self._state = self.engine.free(self._state, [slot])

    def _finish(self, slot: int, free: bool = True) -> None:
        h = self._slots[slot]
        self._drop(slot, h, free)
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
        self._history, self._unread, self._lag = {}, [], {}


def _host(a) -> np.ndarray:
    """A call's output on the host (a device array spread over processes gathered whole)."""
    return a if isinstance(a, np.ndarray) else to_host(a)
