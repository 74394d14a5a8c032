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
from typing import Iterator, Sequence

import jax
import numpy as np

from jaxformer import sharding as shd
from jaxformer.engine import Engine, EngineConfig
from jaxformer.models.stages import num_microbatches
from jaxformer.sampling import GREEDY, Sampling, alternatives
from jaxformer.serving import multihost

log = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED, ABORTED, FAILED = "waiting", "running", "finished", "aborted", \
    "failed"


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


class QueueFull(RuntimeError):
    """submit() while max_queue requests wait."""


@dataclasses.dataclass
class RequestOutput:
    """tokens: generated ids (a stop token included); logprobs: of each token;
    status: finished / aborted / failed; reason: "stop", "length", "abort" or the error;
    top_logprobs: per token, its Sampling.top_logprobs most likely (id, log-prob) pairs,
    best first, as the compiled step computed them (empty lists when not asked);
    prompt_logprobs (Sampling.prompt_logprobs, under the paged scheduler; else None): per
    prompt position, None for the first, then (log-prob of the token given its prefix, its
    top_logprobs alternatives) from the chunked prefill."""
    id: int
    tokens: list[int]
    logprobs: list[float]
    status: str
    reason: str
    prompt_tokens: int
    times: dict
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None


class Handle:
    """A submitted request: stream() its tokens, result() when it ends, abort() it."""

    def __init__(self, sched: "Scheduler", rid: int, prompt, sampling, max_new, seed,
                 ignore_eos, listener=None):
        self.id, self._sched = rid, sched
        self._listener = listener  # called (on the loop's thread) after each event
        self.prompt, self.sampling, self.max_new = list(prompt), sampling, max_new
        self.seed, self.ignore_eos = seed, ignore_eos
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # per token (RequestOutput)
        self.prompt_logprobs: list | None = None  # per prompt position (RequestOutput)
        self.status, self.reason = WAITING, ""
        self.times = {"submitted": time.perf_counter()}
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()

    def stream(self, timeout: float | None = None) -> Iterator[list[int]]:
        """New token ids as the loop produces them, until the request ends."""
        while True:
            item = self._events.get(timeout=timeout)
            if item is None:
                return
            yield item

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s")
        return RequestOutput(self.id, list(self.tokens), list(self.logprobs), self.status,
                             self.reason, len(self.prompt), dict(self.times),
                             list(self.top_logprobs),
                             None if self.prompt_logprobs is None else
                             list(self.prompt_logprobs))

    def abort(self) -> None:
        self._sched.abort(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # ---- the loop's side ------------------------------------------------------------------
    def _emit(self, toks: Sequence[int], lps: Sequence[float], top=None) -> None:
        """New tokens, their log-probs and top: (ids [n, K], log-probs [n, K]) their
        alternatives (Engine.top's rows) or None (the engine keeps none)."""
        if toks:
            self.times.setdefault("first_token", time.perf_counter())
            self.top_logprobs.extend(alternatives(self.sampling.top_logprobs, len(toks), top))
            self.tokens.extend(toks)
            self.logprobs.extend(lps)
            self._events.put(list(toks))
            if self._listener is not None:
                self._listener()

    def _prompt_logprobs(self, start: int, n: int, prompt) -> None:
        """A prefill chunk's prompt log-probs: its columns c < n predict positions
        start + c + 1 (prompt = (log-probs [C], ids [C, K], log-probs [C, K]), ChunkOut's);
        positions past the prompt (a resumed request's generated tokens) are not kept."""
        P = len(self.prompt)
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * P
        chosen, ids, lps = prompt
        k = self.sampling.top_logprobs
        for c in range(n):
            p = start + c + 1
            if p < P:
                alts = alternatives(k, 1, (ids[c:c + 1], lps[c:c + 1]))[0]
                self.prompt_logprobs[p] = (float(chosen[c]), alts)

    def _end(self, status: str, reason: str) -> None:
        if self._done.is_set():
            return
        self.status, self.reason = status, reason
        self.times["end"] = time.perf_counter()
        self._events.put(None)
        self._done.set()
        if self._listener is not None:
            self._listener()


def drain(inbox: queue.Queue) -> list:
    """Everything in a scheduler's inbox now, oldest first (its (kind, handle) events)."""
    events = []
    while True:
        try:
            events.append(inbox.get_nowait())
        except queue.Empty:
            return events


def asks_top(handles) -> bool:
    """Whether any of these requests wants alternatives (Engine.top is worth fetching)."""
    return any(h is not None and h.sampling.top_logprobs for h in handles)


def submission(front, check, prompt, sampling, max_new, seed, ignore_eos, listener,
               waiting: int) -> Handle:
    """submit() of a scheduler front (a Scheduler, or ReplicaScheduler over several): a
    Handle whose prompt check(prompt, sampling, max_new) accepted, queued in front's inbox;
    one already failed with the reason when it cannot be served; QueueFull when `waiting`
    requests fill front's queue."""
    h = Handle(front, next(front._ids), [], sampling or GREEDY, max_new, seed, ignore_eos,
               listener)
    try:
        h.prompt = check(prompt, h.sampling, max_new)
    except ValueError as e:
        h._end(FAILED, str(e))
        return h
    if waiting >= front.config.max_queue:
        raise QueueFull(f"{front.config.max_queue} requests are waiting")
    front._idle.clear()
    front._inbox.put(("submit", h))
    return h


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

