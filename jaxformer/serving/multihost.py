"""One scheduler over several processes (a mesh spanning hosts): process 0 takes the
requests, every process runs the same compiled calls.

Each tick, process 0 drains its inbox (new requests with their prompts, sampling settings,
token limits and seeds; aborts by request id; whether its loop was stopped) and broadcasts
that list; every process applies it to its own copy of the scheduler's state. Everything
else a tick decides (which requests are admitted into which slots, the prompt chunks, the
page tables, preemptions, frees) is a function of that state and of the tokens the device
calls return, which every process reads whole (sharding.to_host gathers them): the
schedulers are deterministic, so the plan each process derives is process 0's plan, and
the calls they make are the same calls, in the same order, with the same host arrays. Only
the tick's inputs, the one thing that is not a function of shared state, travel.

The broadcast is jax's multihost_utils.broadcast_one_to_all over every device: one
collective of a [2] int32 header (payload bytes, stop flag) per tick and, only when there is
news, one per CHUNK bytes of the payload (JSON): two shapes in all, which `warmup` compiles
before the first request.

Data-parallel replicas over several processes (replica_hosts.py) tick in lockstep on the
same broadcast, and send process 0 what the replicas it does not run did with `gather`: a
process_allgather of a [1] int32 header and CHUNK-byte pieces, two more shapes for `warmup`.

Before serving, `agree` checks that every process was started with the same settings and
gives every process the same page pool (the fewest pages any process's memory plan allows:
the pool is part of the compiled shapes), and `barrier` holds each process until all have
warmed up, so the server turns ready only when every process can run every call.
"""
from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxformer.sampling import Sampling


CHUNK = 16384  # payload bytes per collective: one compiled shape, whatever the news


class ProcessLost(RuntimeError):
    """A collective of the serving loop failed: another process stopped or died. Nothing can
    be served any more, and jax's exit barrier would wait for the lost process: the caller
    exits at once (cli_serve.py)."""


def is_leader() -> bool:
    return jax.process_index() == 0


def encode_submit(h) -> dict:
    """A request as process 0 received it (a Handle): what every process needs to serve it."""
    return {"id": h.id, "prompt": h.prompt, "sampling": dataclasses.asdict(h.sampling),
            "max_new": h.max_new, "seed": h.seed, "ignore_eos": h.ignore_eos}


def decode_sampling(d: dict) -> Sampling:
    return Sampling(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def broadcast(events: list, stop: bool) -> tuple[list, bool]:
    """Process 0's (events, stop) on every process (the others' arguments are ignored).
    events: JSON-able items."""
    leader = is_leader()
    data = json.dumps(events).encode() if leader and events else b""
    head = np.asarray([len(data), int(bool(stop))] if leader else [0, 0], np.int32)
    n, stop = (int(v) for v in multihost_utils.broadcast_one_to_all(head))
    if n == 0:
        return [], bool(stop)
    got = bytearray()
    for start in range(0, n, CHUNK):
        buf = np.zeros((CHUNK,), np.uint8)
        if leader:
            piece = data[start:start + CHUNK]
            buf[:len(piece)] = np.frombuffer(piece, np.uint8)
        got += np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n - start].tobytes()
    return json.loads(got.decode()), bool(stop)


def gather(data: bytes) -> list[bytes]:
    """Every process's `data`, on every process, in process order: a process_allgather of a
    [1] int32 header (the sizes), then one per CHUNK bytes of the longest (two shapes in all,
    whatever the sizes; data-parallel replicas send process 0 their results with it:
    replica_hosts.py)."""
    head = np.asarray([len(data)], np.int32)
    sizes = np.asarray(multihost_utils.process_allgather(head)).reshape(-1)
    got = [bytearray() for _ in sizes]
    for start in range(0, int(sizes.max()), CHUNK):
        buf = np.zeros((CHUNK,), np.uint8)
        piece = data[start:start + CHUNK]
        buf[:len(piece)] = np.frombuffer(piece, np.uint8)
        rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), CHUNK)
        for p, row in enumerate(rows):
            got[p] += row[:max(0, min(CHUNK, int(sizes[p]) - start))].tobytes()
    return [bytes(g) for g in got]


def warmup() -> None:
    """Compile (and run once) the broadcasts and the gathers before serving. Every process
    calls it."""
    broadcast(["warmup"], False)
    gather(b"warmup")


def agree(settings: str, num_pages: int) -> int:
    """The fewest pages any process plans; ValueError when a process serves with other
    settings (a text naming the model, mesh and scheduler sizes) than process 0's, which
    would compile other shapes and leave the collectives waiting on each other."""
    mine = np.asarray([zlib.crc32(settings.encode()) & 0x7FFFFFFF, num_pages], np.int32)
    got = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    other = np.flatnonzero(got[:, 0] != got[0, 0])
    if other.size:
        raise ValueError(f"process {int(other[0])} serves with other settings than process 0 "
                         f"(model, dtype, mesh or scheduler flags): start every process with "
                         f"the same flags")
    return int(got[:, 1].min())


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name`."""
    multihost_utils.sync_global_devices(name)
