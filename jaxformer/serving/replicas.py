"""Data parallelism for serving: independent replicas behind one scheduler front.

    model = jf.load("ckpt/llama-8b", mesh=jf.make_mesh(data=2, tensor=4))
    sched = ReplicaScheduler(model, SchedulerConfig(slots=32, max_length=4096),
                             PagedConfig(num_pages=8192)).start()
    h = sched.submit(prompt, sampling, 64)              # the same API as Scheduler

A data=D mesh splits into D sub-meshes (data=1, the same pipe x tensor layout); each gets a
copy of the model whose weights are the full mesh's own shards on those devices (no copy is
made where the weights are replicated over `data`, which the default rules do) and its own
engine (Scheduler or PagedScheduler), with its own slots and, paged, its own pool: the
configs describe one replica. Replicas never talk to each other, so a decode step of one
never waits for another's prefill, and each request lives on one replica from admission to
its end.

The front keeps the one inbox and queue. A request waits there until some replica has a free
slot that no request already handed to it claims; it goes to the replica with the most free
slots, then (paged) the most free pages, so the load follows what each replica can take now
rather than a fixed rotation. tick() drives every replica in turn (deterministic, for tests
and offline runs); start() runs one loop thread per replica, each routing from the front
queue before its own tick, so replicas step concurrently (jax releases the GIL while a
device computes).

One process only: over several processes, HostReplicaScheduler (replica_hosts.py) runs each
replica on the processes that hold its devices behind process 0's front; replica_models then
builds only this process's replicas, and replica_processes checks the layout.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxformer import sharding as shd
from jaxformer.sampling import Sampling
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.request import ABORTED, WAITING, Handle, drain, submission
from jaxformer.serving.scheduler import Scheduler, SchedulerConfig


def replica_processes(devices) -> list[tuple[int, ...]]:
    """The processes each data replica's devices belong to (devices: the mesh's device
    array, data first). ValueError, in one line, when a replica over several processes
    shares one with another replica: each process ticks its replicas in turn, and two
    replicas' programs over the same processes then run at once and their collectives
    (gloo on CPU) pair one program's messages with the other's. Replicas on one process
    each, any number per process, and replicas each on processes of their own are served
    (serving/replica_hosts.py)."""
    rows = np.asarray(devices, dtype=object)
    sets = [tuple(sorted({getattr(d, "process_index", 0) for d in row.flat})) for row in rows]
    for i, a in enumerate(sets):
        for j, b in enumerate(sets[i + 1:], i + 1):
            if set(a) & set(b) and (len(a) > 1 or len(b) > 1):
                raise ValueError(
                    f"data replica {i} spans processes {_names(a)} and replica {j} processes "
                    f"{_names(b)}: a replica over several processes needs them to itself "
                    f"(put each replica on one process, or on processes of its own)")
    return sets


def _names(procs) -> str:
    return ",".join(map(str, procs))


def replica_models(model) -> list:
    """The model once per index of the mesh's data axis, each on its own data=1 sub-mesh
    (module docstring). A data=1 mesh gives [model]. With several processes, a replica
    that holds no device of this process is None (another process serves it:
    serving/replica_hosts.py)."""
    mesh = model.mesh
    D = mesh.shape["data"]
    if D == 1:
        return [model]
    hosts = jax.process_count() > 1
    if hosts:
        replica_processes(mesh.devices)
    me = jax.process_index()
    out = []
    for d in range(D):
        devs = list(mesh.devices[d].flat)
        if hosts and all(dev.process_index != me for dev in devs):
            out.append(None)
            continue
        sub = shd.make_mesh(1, mesh.shape["pipe"], mesh.shape["tensor"], devices=devs)
        replica = object.__new__(type(model))
        replica.__dict__.update(model.__dict__)
        replica.mesh = sub
        replica.run = dataclasses.replace(model.run, data=1)
        replica.params = jax.tree.map(lambda x, s=sub: _onto(x, s), model.params)
        replica._params_cache = {}  # the flat / packed params of *these* arrays
        replica.compiled = type(model.compiled)()  # programs are per mesh
        out.append(replica)
    return out


def _onto(x: jax.Array, sub) -> jax.Array:
    """x (on the full mesh) on sub-mesh `sub`, with the same partition spec: the full mesh's
    own shards on sub's devices when x is replicated over `data`, else a copy (one process
    only: over several, a copy between meshes would be a collective of every process)."""
    spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
    target = NamedSharding(sub, spec)
    axes = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
    if "data" in axes:
        if jax.process_count() > 1:
            raise ValueError(f"a weight of shape {x.shape} is sharded over `data` (spec "
                             f"{spec}): replicas over several processes need the weights "
                             f"replicated over data (the default sharding rules)")
        return jax.device_put(x, target)
    mine = set(sub.devices.flat)
    shards = [s.data for s in x.addressable_shards if s.device in mine]
    return jax.make_array_from_single_device_arrays(x.shape, target, shards)


class ReplicaFront:
    """What a front over data-parallel replicas shows its callers whatever runs the
    replicas: `replicas` (each a Scheduler, or what stands for one), `_inbox` and
    `_waiting` (the front's own queue) and `_idle` come from the subclass."""

    abort = Scheduler.abort  # these read only _inbox, _idle and tick()
    wait_idle = Scheduler.wait_idle
    run_until_idle = Scheduler.run_until_idle

    @property
    def running(self) -> int:
        return sum(r.running for r in self.replicas)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + self._inbox.qsize() + sum(r.waiting for r in self.replicas)

    @property
    def pools(self) -> list:
        """Each replica's PagePool (None for a contiguous one)."""
        return [getattr(r, "pool", None) for r in self.replicas]

    @property
    def preemptions(self) -> int:
        return sum(getattr(r, "preemptions", 0) for r in self.replicas)


class ReplicaScheduler(ReplicaFront):
    """One scheduler front over one Scheduler (or PagedScheduler, given `paged`) per
    data-parallel replica (module docstring). The callers' side is Scheduler's: submit,
    abort, start / stop, tick / run_until_idle, wait_idle, running, waiting."""

    def __init__(self, model, config: SchedulerConfig = SchedulerConfig(),
                 paged: PagedConfig | None = None):
        if jax.process_count() > 1:
            raise ValueError("ReplicaScheduler runs in one process; over several processes "
                             "serve the replicas with HostReplicaScheduler "
                             "(serving/replica_hosts.py)")
        self.model, self.config, self.paged = model, config, paged
        self.replicas: list[Scheduler] = [
            PagedScheduler(m, config, paged) if paged is not None else Scheduler(m, config)
            for m in replica_models(model)]
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._waiting: collections.deque[Handle] = collections.deque()
        # request id -> (its handle, the replica serving it) while it is not done
        self._owner: dict[int, tuple[Handle, Scheduler]] = {}
        self._lock = threading.Lock()  # routing, from every replica's thread
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()

    # ---- callers (any thread) -------------------------------------------------------------
    def submit(self, prompt: Sequence[int] | str, sampling: Sampling | None = None,
               max_new_tokens: int = 16, seed: int = 0, ignore_eos: bool = False,
               listener=None) -> Handle:
        """As Scheduler.submit (listener: called on the serving replica's loop thread)."""
        return submission(self, self.replicas[0]._check, prompt, sampling, max_new_tokens,
                          seed, ignore_eos, listener, self.waiting)

    def warmup(self, compile_workers: int = 1) -> list[dict]:
        """Compile every replica's shapes before the first request (paged replicas,
        PagedScheduler.warmup; a contiguous Scheduler compiles on first use). Call before
        start()."""
        return [r.warmup(compile_workers) for r in self.replicas
                if isinstance(r, PagedScheduler)]

    def start(self) -> "ReplicaScheduler":
        """One loop thread per replica."""
        if not self._threads:
            self._stop.clear()
            self._threads = [threading.Thread(target=self._run, args=(r,), daemon=True,
                                              name=f"jaxformer-replica-{i}")
                             for i, r in enumerate(self.replicas)]
            for t in self._threads:
                t.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """As Scheduler.stop: requests still waiting or running are aborted."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        with self._lock:
            self._take_inbox()
            for h in self._waiting:
                h._end(ABORTED, "scheduler stopped")
            self._waiting.clear()
        for r in self.replicas:
            r.stop(timeout)

    def tick(self) -> bool:
        """Route, then one tick of every replica. Returns whether work remains."""
        with self._lock:
            self._route()
        for r in self.replicas:
            r.tick()
        return self._busy()

    # ---- the loop -------------------------------------------------------------------------
    def _run(self, replica: Scheduler) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._route()
            if not replica.tick():
                self._busy()
                self._stop.wait(0.01)  # idle: the next submit is routed within 10 ms

    def _busy(self) -> bool:
        busy = bool(self._waiting or not self._inbox.empty()
                    or any(r.running or r.waiting for r in self.replicas))
        if not busy:
            self._idle.set()
        return busy

    def _take_inbox(self) -> None:
        for kind, h in drain(self._inbox):
            if kind == "submit":
                self._waiting.append(h)
            elif h.id in self._owner:
                self._owner[h.id][1].abort(h)  # its replica frees the slot on its next tick
            elif h.status == WAITING and h in self._waiting:
                self._waiting.remove(h)
                h._end(ABORTED, "abort")

    def _route(self) -> None:
        """Hand waiting requests to replicas with free, unclaimed slots (under _lock)."""
        self._take_inbox()
        self._owner = {i: o for i, o in self._owner.items() if not o[0].done}
        while self._waiting:
            best = max(self.replicas, key=self._room)
            if self._room(best)[0] <= 0:
                return
            h = self._waiting.popleft()
            self._owner[h.id] = (h, best)
            best._idle.clear()
            best._inbox.put(("submit", h))

    @staticmethod
    def _room(r: Scheduler) -> tuple[int, int]:
        """(free slots not claimed by requests it was handed, free pages)."""
        free = r.config.slots - r.running - r.waiting
        return free, (r.pool.num_available if isinstance(r, PagedScheduler) else 0)
