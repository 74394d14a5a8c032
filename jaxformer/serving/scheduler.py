"""Continuous batching: requests arrive at any time, from any thread, and share one running
decode batch of the Engine's slots.

    sched = Scheduler(model, SchedulerConfig(slots=16, max_length=2048))
    sched.start()                                   # the step loop's own thread
    h = sched.submit([1, 2, 3], Sampling(temperature=0.7), max_new_tokens=64, seed=1)
    for tokens in h.stream():                       # new token ids as they come
        ...
    out = h.result()                                # RequestOutput: tokens, finish reason
    sched.stop()

Each tick of the loop takes what callers sent (new requests, aborts), admits waiting
requests into free slots (their prompts prefilled together, then inserted), runs the decode
loop for `steps_per_tick` tokens of every live slot, and hands each request its new tokens.
A request that finishes (stop id, stop string, max tokens) frees its slot at once for the
next one. Nothing a caller does blocks the loop: submit and abort only enqueue; streams are
queues the loop fills.

Every request ends finished, aborted or failed with a reason. A request that cannot be
served (longer than the context, a bad parameter) fails alone at submission or admission;
an error in a device call fails the requests of that call, and the engine's state is rebuilt
so the others go on.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Sequence

import jax
import numpy as np

from jaxformer import sharding as shd
from jaxformer.engine import Engine, EngineConfig
from jaxformer.models.stages import num_microbatches
from jaxformer.sampling import Sampling
from jaxformer.serving import multihost
from jaxformer.serving.request import (ABORTED, FAILED, FINISHED, RUNNING, WAITING, Handle,
                                       asks_top, drain, submission)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """slots: rows of the running batch; max_length: prompt + generated tokens a request may
    hold; steps_per_tick: decode steps between admissions (more amortises the host, fewer
    admits sooner); max_prefill: prompts prefilled together at most; max_queue: waiting
    requests beyond which submit() refuses (QueueFull)."""
    slots: int = 16
    max_length: int = 1024
    steps_per_tick: int = 4
    max_prefill: int = 8
    max_queue: int = 4096
    stop_ids: int = 8
    stop_strings: int = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"SchedulerConfig.{f.name}: must be a positive integer, "
                                 f"got {v!r}")


class Scheduler:
    """Continuous batching over an Engine's slots (module docstring)."""

    def __init__(self, model, config: SchedulerConfig = SchedulerConfig()):
        self.model, self.config = model, config
        self.engine = self._make_engine()
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._slots: list[Handle | None] = [None] * config.slots
        mesh, rules = self.engine.model.mesh, self.engine.model.rules
        # on pipe > 1 the decode loop runs slot i in microbatch i % M (pipeline.py)
        self._microbatches = num_microbatches(
            config.slots, mesh.shape["pipe"], shd.mesh_size(mesh, rules.get("batch"))) \
            if mesh.shape["pipe"] > 1 else 1
        self._state = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        # several processes: process 0's inbox is broadcast each tick (serving/multihost.py)
        self._hosts = jax.process_count()
        self._known: dict[int, Handle] = {}  # request id -> handle, for broadcast aborts
        self._halted = False  # process 0's loop stopped (several processes)
        self.error = ""  # why the loop ended early (several processes: one was lost)

    def _make_engine(self) -> Engine:
        c = self.config
        return Engine(self.model, EngineConfig(
            slots=c.slots, max_length=c.max_length, window=c.steps_per_tick,
            stop_ids=c.stop_ids, stop_strings=c.stop_strings))

    # ---- callers (any thread) -------------------------------------------------------------
    def submit(self, prompt: Sequence[int] | str, sampling: Sampling | None = None,
               max_new_tokens: int = 16, seed: int = 0, ignore_eos: bool = False,
               listener=None) -> Handle:
        """Queue a request; returns at once. A request that can never be served gets a
        Handle already failed with the reason (the others are unaffected). listener: called
        with no argument on the loop's thread after each new chunk and at the end (an
        asyncio server wakes its handler with it; it must not block). With several
        processes only process 0 takes requests; the others serve its copies."""
        if self._hosts > 1 and not multihost.is_leader():
            raise ValueError("submit: with several processes, requests go to process 0 "
                             f"(this is process {jax.process_index()})")
        return submission(self, self._check, prompt, sampling, max_new_tokens, seed,
                          ignore_eos, listener, self._inbox.qsize() + len(self._waiting))

    def abort(self, handle: Handle) -> None:
        """End a request now (its slot is freed at the loop's next tick)."""
        self._inbox.put(("abort", handle))

    def start(self) -> "Scheduler":
        """Run the step loop on its own thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="jaxformer-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after its current tick; requests still waiting or running are
        aborted ("scheduler stopped")."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for h in list(self._waiting) + [h for h in self._slots if h is not None]:
            h._end(ABORTED, "scheduler stopped")
        while not self._inbox.empty():
            kind, h = self._inbox.get_nowait()
            if kind == "submit":
                h._end(ABORTED, "scheduler stopped")

    def join(self, timeout: float | None = None) -> bool:
        """Block until the loop's thread ends; whether it did. On a process other than 0 of
        several, that is when process 0's loop stops (serving/multihost.py)."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or running."""
        return self._idle.wait(timeout)

    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until every request has ended (no start())."""
        while self.tick():
            pass

    @property
    def running(self) -> int:
        return sum(h is not None for h in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize()

    # ---- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self._hosts > 1:  # every tick is a collective: the loop ends when process 0's does
            try:
                while not self._halted:
                    if not self.tick():
                        time.sleep(0.01)
            except Exception as e:  # noqa: BLE001 - a collective failed: a process is gone
                self._lost(e)
            return
        while not self._stop.is_set():
            if not self.tick():
                try:  # nothing to do: sleep until a caller sends something
                    item = self._inbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._inbox.put(item)

    def _lost(self, e: Exception) -> None:
        """Several processes, a tick's collective failed: the loop ends with `error` set
        (the server stops on it), and every request of this process fails with it rather
        than wait for a process that is gone."""
        self.error = (f"process {jax.process_index()}: the scheduler's lockstep tick failed "
                      f"(a process stopped or died?): {type(e).__name__}: {e}")
        log.error("%s", self.error)
        self._halted = True
        ended = [h for kind, h in drain(self._inbox) if kind == "submit"]
        for h in ended + list(self._waiting) + [h for h in self._slots if h is not None]:
            h._end(FAILED, self.error)
        self._waiting.clear()
        self._idle.set()

    def tick(self) -> bool:
        """One round: take requests and aborts, admit, decode. Returns whether work remains."""
        self._take_inbox()
        self._admit()
        if self.running:
            self._decode()
        # several processes: only what every process knows (process 0's inbox is news)
        busy = bool(self.running or self._waiting or
                    (self._hosts == 1 and not self._inbox.empty()))
        if not busy:
            self._idle.set()
        return busy

    def _take_inbox(self) -> None:
        events = drain(self._inbox)
        if self._hosts > 1:
            try:
                events = self._broadcast(events)
            except Exception:
                for e in events:  # back where _lost finds them, to end them
                    self._inbox.put(e)
                raise
        for kind, h in events:
            if kind == "submit":
                self._waiting.append(h)
            elif h.status == WAITING and h in self._waiting:
                self._waiting.remove(h)
                h._end(ABORTED, "abort")
            elif h.status == RUNNING:
                self._release(h, ABORTED, "abort")

    def _free_slots(self) -> list[int]:
        """Free slots in the order to fill them: on a pipelined mesh, each into the
        microbatch with the fewest requests so far, so every stage has a live microbatch to
        run (a microbatch with no live row is a bubble in the circular schedule)."""
        free = [i for i, h in enumerate(self._slots) if h is None]
        M = self._microbatches
        if M == 1:
            return free
        load = [0] * M
        for i, h in enumerate(self._slots):
            load[i % M] += h is not None
        order = []
        while free:
            i = min(free, key=lambda i: (load[i % M], i))
            free.remove(i)
            load[i % M] += 1
            order.append(i)
        return order

    def _broadcast(self, events):
        """Process 0's events on every process, as handles of this process."""
        sent = [("submit", multihost.encode_submit(h)) if kind == "submit" else
                ("abort", h.id) for kind, h in events]
        got, self._halted = multihost.broadcast(sent, self._stop.is_set())
        self._known = {i: h for i, h in self._known.items() if not h.done}
        mine = {h.id: h for kind, h in events if kind == "submit"}  # process 0's own
        out = []
        for kind, item in got:
            if kind == "submit":
                h = mine.get(item["id"])
                if h is None:  # a copy of process 0's request on this process
                    h = Handle(self, item["id"], item["prompt"],
                               multihost.decode_sampling(item["sampling"]), item["max_new"],
                               item["seed"], item["ignore_eos"])
                self._known[h.id] = h
                out.append(("submit", h))
            elif item in self._known:
                out.append(("abort", self._known[item]))
        return out

    def _admit(self) -> None:
        free = self._free_slots()
        batch = []
        while free and self._waiting and len(batch) < self.config.max_prefill \
                and self._waiting[0].ignore_eos == (batch or [(0, self._waiting[0])])[0][1] \
                .ignore_eos:  # one prefill call shares its eos rule
            batch.append((free.pop(0), self._waiting.popleft()))
        if not batch:
            return
        if self._state is None:
            self._state = self.engine.init_state()
        try:
            # not engine.prefill: its compile_decode would compile a decode loop for the
            # prefill's own [rows, prompt bucket] state, which the scheduler never decodes
            # (its loop runs on the slots' state, compiled by init_state)
            fn, args = self.engine.prefill_call([h.prompt for _, h in batch],
                                                [h.sampling for _, h in batch],
                                                [h.max_new for _, h in batch],
                                                seeds=[h.seed for _, h in batch],
                                                ignore_eos=batch[0][1].ignore_eos)
            pre = fn(*args)
            toks, lps = self.engine.tokens(pre)
            top = self.engine.top(pre) if asks_top(h for _, h in batch) else None
            done = np.asarray(pre.done)
            rows = list(range(len(batch)))
            self._state = self.engine.insert(self._state, pre, [s for s, _ in batch])
        except Exception as e:  # noqa: BLE001 - the failure belongs to these requests
            log.warning("prefill of %d requests failed: %s", len(batch), e)
            for _, h in batch:
                h._end(FAILED, f"prefill failed: {e}")
            self._state = None  # rebuilt on the next admission: donated buffers may be gone
            self._fail_running("the decode state was lost with a failed prefill")
            return
        for r in rows:
            slot, h = batch[r]
            h.status = RUNNING
            self._slots[slot] = h
            h._emit([int(toks[r, 0])], [float(lps[r, 0])],
                    None if top is None else (top[0][r, :1], top[1][r, :1]))
            if done[r]:
                self._finish(slot)

    def _decode(self) -> None:
        try:
            self._state = self.engine.step(self._state, self.config.steps_per_tick)
            toks, lps = self.engine.tokens(self._state)
            top = self.engine.top(self._state) if asks_top(self._slots) else None
            done = np.asarray(self._state.done)
        except Exception as e:  # noqa: BLE001
            log.warning("decode step failed: %s", e)
            self._state = None
            self._fail_running(f"decode failed: {e}")
            return
        for slot, h in enumerate(self._slots):
            if h is None:
                continue
            got = toks[slot] >= 0
            h._emit(toks[slot][got].tolist(), lps[slot][got].tolist(),
                    None if top is None else (top[0][slot][got], top[1][slot][got]))
            if done[slot]:
                self._finish(slot)

    def _finish(self, slot: int) -> None:
        h = self._slots[slot]
        self._slots[slot] = None
        h._end(FINISHED, "length" if len(h.tokens) >= h.max_new else "stop")

    def _release(self, h: Handle, status: str, reason: str) -> None:
        slot = self._slots.index(h)
        self._slots[slot] = None
        if self._state is not None:
            self._state = self.engine.free(self._state, [slot])
        h._end(status, reason)

    def _fail_running(self, reason: str) -> None:
        for slot, h in enumerate(self._slots):
            if h is not None:
                self._slots[slot] = None
                h._end(FAILED, reason)

    # ---- validation -------------------------------------------------------------------------
    def _check(self, prompt, sampling, max_new) -> list[int]:
        m = self.model
        if isinstance(prompt, str):
            if m.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none")
            prompt = m.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < m.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"[0, {m.config.vocab_size})")
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new!r}")
        if len(ids) + max_new > self.config.max_length:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens {max_new} "
                             f"exceeds the context of {self.config.max_length} tokens")
        if not isinstance(sampling, Sampling):
            raise ValueError(f"sampling must be a Sampling, got {sampling!r}")
        if sampling.num_beams > 1:
            raise ValueError("beam search runs in generate(), not under continuous batching")
        return ids

