"""Data-parallel replicas over several processes, behind process 0's one front.

    # every process, the same flags: 2 hosts x 4 devices, one replica per host
    model = jf.load(ckpt, mesh=jf.make_mesh(data=2, tensor=4))
    sched = HostReplicaScheduler(model, SchedulerConfig(slots=32), PagedConfig(...))
    sched.warmup(); sched.start()
    h = sched.submit(prompt, sampling, 64)     # process 0 only; the others follow

Each data replica (a data=1 sub-mesh, replicas.replica_models) runs on the processes that
hold its devices: one process (any number of replicas per process), or several that hold no
other replica (then, as in multihost.py, each of them runs the same calls on the same
inputs). replicas.replica_processes refuses other layouts: two replicas each spread over the
same two processes (data=2 x tensor=2 over 2 processes x 2 devices, every replica on both)
failed on CPU within a few hundred lockstep ticks with gloo pairing one program's messages
with another's ("Received data size doesn't match expected size"), with and without
asynchronous dispatch. Each process builds an engine only for its own replicas.

The processes tick in lockstep. Each tick:
1. process 0 takes its inbox (new requests, aborts) and routes waiting requests as
   ReplicaScheduler does: to the replica with the most free slots that no request already
   handed to it claims, then the most free pages (what it knows of a replica on other
   processes is that replica's last report); it broadcasts [submit, replica, request],
   [abort, id] and whether its loop stopped (multihost.broadcast);
2. every process hands each of its replicas its share and ticks them in replica order;
3. for each replica that holds no device of process 0, the first of its processes reports
   what process 0 needs: each request's new tokens and log-probs and, once it ended, its
   status and reason; the replica's running and waiting requests and its pool's counts
   (free pages for routing, pages in use and prefix-cache counts for /metrics). Every process
   joins one gather of these reports (multihost.gather: fixed-shape pieces that `warmup`
   compiles), and process 0 extends its clients' Handles with them. A replica with a device
   of process 0 reports nothing: process 0 ticks it on its clients' Handles themselves.

A request that fails in its replica (a failed device call, a prompt the pool cannot hold)
fails alone and is reported like any other end. A collective that fails (a process died)
ends the loop on every process that sees it, with `error` set and every request of process
0 failed with the reason; the server then stops (server.py).
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import queue
import threading
import time
import types
from typing import Sequence

import jax
import numpy as np

from jaxformer.sampling import Sampling
from jaxformer.serving import multihost
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.replicas import ReplicaFront, replica_models, replica_processes
from jaxformer.serving.request import ABORTED, FAILED, RUNNING, Handle, drain, submission
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

_POOL = ("num_pages", "num_in_use", "num_available", "prefix_queries", "prefix_query_tokens",
         "prefix_hit_tokens")


class RemoteReplica:
    """What process 0 knows of a replica on other processes: its last report (the running
    and waiting counts, preemptions and, paged, the pool's counts that routing and /metrics
    read)."""

    def __init__(self, paged: PagedConfig | None):
        self.running = self.waiting = self.preemptions = 0
        self.pool = None if paged is None else types.SimpleNamespace(
            num_pages=paged.num_pages, num_in_use=0, num_available=paged.num_pages - 1,
            prefix_queries=0, prefix_query_tokens=0, prefix_hit_tokens=0)

    def update(self, stats: dict) -> None:
        self.running, self.waiting = stats["running"], stats["waiting"]
        self.preemptions = stats["preemptions"]
        if self.pool is not None:
            for k in _POOL:
                setattr(self.pool, k, stats[k])


def _stats(r: Scheduler) -> dict:
    out = {"running": r.running, "waiting": r.waiting,
           "preemptions": getattr(r, "preemptions", 0)}
    pool = getattr(r, "pool", None)
    if pool is not None:
        out.update({k: getattr(pool, k) for k in _POOL})
    return out


class HostReplicaScheduler(ReplicaFront):
    """One front on process 0 over data-parallel replicas on several processes (module
    docstring). The callers' side is ReplicaScheduler's, on process 0; every process
    constructs it, warms it up and starts it, and the others join() until process 0 stops."""

    def __init__(self, model, config: SchedulerConfig = SchedulerConfig(),
                 paged: PagedConfig | None = None):
        self.model, self.config, self.paged = model, config, paged
        self.groups = replica_processes(model.mesh.devices)  # ValueError on a bad layout
        me, self._leader = jax.process_index(), multihost.is_leader()
        self.local: dict[int, Scheduler] = {}
        for d, m in enumerate(replica_models(model)):
            if m is not None:
                r = PagedScheduler(m, config, paged) if paged is not None else \
                    Scheduler(m, config)
                r._hosts = 1  # fed by this front's broadcast, not by one of its own
                self.local[d] = r
        self._remote = {d: RemoteReplica(paged) for d in range(len(self.groups))
                        if d not in self.local}
        # the replicas this process reports to process 0: those it comes first in, unless
        # process 0 holds them too
        self._reports = [d for d in sorted(self.local) if self.groups[d][0] == me
                         and 0 not in self.groups[d]]
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._owner: dict[int, tuple[Handle, int]] = {}  # process 0: id -> (handle, replica)
        self._known: dict[int, tuple[Handle, int]] = {}  # id -> (handle, replica) run here
        self._sent: dict[int, int] = {}  # id -> its tokens reported so far
        self.routed = [0] * len(self.groups)  # process 0: requests handed to each replica
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._halted = False
        self.error = ""

    # ---- callers ----------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int] | str, sampling: Sampling | None = None,
               max_new_tokens: int = 16, seed: int = 0, ignore_eos: bool = False,
               listener=None) -> Handle:
        """As Scheduler.submit; process 0 only (the others serve its requests)."""
        if not self._leader:
            raise ValueError("submit: with several processes, requests go to process 0 "
                             f"(this is process {jax.process_index()})")
        return submission(self, self._check, prompt, sampling, max_new_tokens, seed,
                          ignore_eos, listener, self.waiting)

    def _check(self, prompt, sampling, max_new) -> list[int]:
        return Scheduler._check(self, prompt, sampling, max_new)  # reads model and config

    def warmup(self, compile_workers: int = 1) -> list[dict]:
        """Compile every shape of this process's paged replicas (PagedScheduler.warmup),
        then the collectives of a tick. Every process calls it, before start()."""
        out = [r.warmup(compile_workers) for _, r in sorted(self.local.items())
               if isinstance(r, PagedScheduler)]
        multihost.warmup()
        return out

    def start(self) -> "HostReplicaScheduler":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="jaxformer-host-replicas")
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after its current tick (on a process other than 0: wait until
        process 0's stops); what still waits or runs is aborted ("scheduler stopped")."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._end_all(ABORTED, "scheduler stopped")
        for r in self.local.values():
            r.stop(timeout)

    join = Scheduler.join  # until the loop's thread ends: process 0's loop stopped

    @property
    def replicas(self) -> list:
        """Per replica: its Scheduler where this process runs it, else a RemoteReplica."""
        return [self.local[d] if d in self.local else self._remote[d]
                for d in range(len(self.groups))]

    # ---- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._halted:
                if not self.tick() and not self._halted:
                    time.sleep(0.01)
        except Exception as e:  # noqa: BLE001 - a collective failed: a process is gone
            self.error = (f"process {jax.process_index()}: the replicas' lockstep tick failed "
                          f"(a process stopped or died?): {type(e).__name__}: {e}")
            log.error("%s", self.error)
            self._halted = True
            self._end_all(FAILED, self.error)

    def tick(self) -> bool:
        """One lockstep round on every process (module docstring): broadcast, tick the
        replicas here, gather the reports. Returns whether work remains (process 0's view)."""
        sent = self._route() if self._leader and not self._stop.is_set() else []
        got, self._halted = multihost.broadcast(sent, self._stop.is_set())
        if self._halted:
            return False
        self._apply(got)
        for d in sorted(self.local):
            self.local[d].tick()
            if len(self.groups[d]) > 1 and self.local[d]._state is not None:
                # a replica over several processes: its calls (and their collectives) end
                # before the gather's begin, so no two programs' collectives overlap
                jax.block_until_ready(self.local[d]._state)
        self._collect(multihost.gather(self._report()))
        busy = bool(self._waiting or not self._inbox.empty() or
                    any(r.running or r.waiting for r in self.local.values()) or
                    any(not h.done for h, _ in self._owner.values()))
        if not busy:
            self._idle.set()
        return busy

    def _route(self) -> list:
        """Process 0: the tick's news: aborts, and waiting requests handed to replicas."""
        events = []
        for kind, h in drain(self._inbox):
            if kind == "submit":
                self._waiting.append(h)
            elif h.id in self._owner:
                events.append(["abort", h.id])
            elif h in self._waiting:
                self._waiting.remove(h)
                h._end(ABORTED, "abort")
        self._owner = {i: o for i, o in self._owner.items() if not o[0].done}
        room = [self._room(r) for r in self.replicas]
        while self._waiting:
            best = max(range(len(room)), key=lambda d: room[d])
            if room[best][0] <= 0:
                break
            h = self._waiting.popleft()
            room[best] = (room[best][0] - 1, room[best][1])
            self._owner[h.id] = (h, best)
            self.routed[best] += 1
            events.append(["submit", best, multihost.encode_submit(h)])
        return events

    def _room(self, r) -> tuple[int, int]:
        """(free slots not claimed by requests it was handed, free pages)."""
        pool = getattr(r, "pool", None)
        return self.config.slots - r.running - r.waiting, (pool.num_available if pool else 0)

    def _apply(self, events: list) -> None:
        """Every process: the broadcast news for the replicas it runs."""
        for ev in events:
            if ev[0] == "submit":
                d, item = ev[1], ev[2]
                if d not in self.local:
                    continue
                h = self._owner[item["id"]][0] if self._leader else Handle(
                    self, item["id"], item["prompt"], multihost.decode_sampling(
                        item["sampling"]), item["max_new"], item["seed"], item["ignore_eos"])
                self._known[h.id] = (h, d)
                self.local[d]._idle.clear()
                self.local[d]._inbox.put(("submit", h))
            elif ev[1] in self._known:
                h, d = self._known[ev[1]]
                self.local[d]._inbox.put(("abort", h))

    def _report(self) -> bytes:
        """What process 0 needs of the replicas this process reports (module docstring)."""
        reqs = []
        for i, (h, d) in self._known.items():
            if d not in self._reports:
                continue
            n = self._sent.get(i, 0)
            if len(h.tokens) > n or h.done:
                # the prompt's log-probs (echo) once, with the request's end
                prompt = h.prompt_logprobs if h.done else None
                reqs.append([i, h.tokens[n:], h.logprobs[n:], h.top_logprobs[n:],
                             h.status if h.done else None, h.reason, prompt])
            self._sent[i] = len(h.tokens)
        for i in [i for i, (h, _) in self._known.items() if h.done]:
            del self._known[i]
            self._sent.pop(i, None)
        if not self._reports:
            return b""
        stats = [[d, _stats(self.local[d])] for d in self._reports]
        return json.dumps({"requests": reqs, "replicas": stats}).encode()

    def _collect(self, reports: list[bytes]) -> None:
        """Process 0: the other processes' reports onto its clients' Handles."""
        if not self._leader:
            return
        for blob in reports[1:]:
            if not blob:
                continue
            msg = json.loads(blob)
            for d, stats in msg["replicas"]:
                self._remote[d].update(stats)
            for i, toks, lps, tops, status, reason, prompt in msg["requests"]:
                h = self._owner.get(i, (None,))[0]
                if h is None or h.done:
                    continue
                if toks:
                    h.status = RUNNING
                    h._emit(toks, lps, _top_arrays(tops))
                if prompt is not None:
                    h.prompt_logprobs = [None if e is None else (e[0], [tuple(a) for a in e[1]])
                                         for e in prompt]
                if status is not None:
                    h._end(status, reason)

    def _end_all(self, status: str, reason: str) -> None:
        """Process 0: every request not ended yet ends with (status, reason)."""
        for kind, h in drain(self._inbox):
            if kind == "submit":
                h._end(status, reason)
        for h in list(self._waiting) + [h for h, _ in self._owner.values()]:
            h._end(status, reason)
        self._waiting.clear()
        self._idle.set()


def _top_arrays(rows: list) -> tuple[np.ndarray, np.ndarray]:
    """Per token, its reported alternatives [(id, log-prob), ...] back as Handle._emit's
    (ids [n, K], log-probs [n, K]), ranks past a row's own at -inf (alternatives() drops
    them)."""
    K = max((len(r) for r in rows), default=0)
    ids = np.zeros((len(rows), K), np.int32)
    lps = np.full((len(rows), K), -np.inf, np.float32)
    for t, r in enumerate(rows):
        for j, (a, v) in enumerate(r):
            ids[t, j], lps[t, j] = a, v
    return ids, lps
