"""A request under continuous batching, as its caller and the scheduler's loop see it: its
Handle (stream, result, abort; the loop's side emits tokens and ends it), the RequestOutput
it ends with, its statuses, and what a scheduler front does with its inbox (submission,
drain). Shared by Scheduler, PagedScheduler and ReplicaScheduler (scheduler.py,
paged_scheduler.py, replicas.py).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import TYPE_CHECKING, Iterator, Sequence

from jaxformer.sampling import GREEDY, alternatives

if TYPE_CHECKING:
    from jaxformer.serving.scheduler import Scheduler


WAITING, RUNNING, FINISHED, ABORTED, FAILED = "waiting", "running", "finished", "aborted", \
    "failed"


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
