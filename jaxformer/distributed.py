"""Multi-host runs: one process per host (or per GPU), every process running the same program.

    import jaxformer as jf
    from jaxformer import distributed

    distributed.initialize()                       # first, before anything touches a device
    mesh = jf.make_mesh(data=1, pipe=2, tensor=8)  # all devices of all hosts
    model = jf.load("ckpt/gpt3-20b", mesh=mesh)    # each host restores only its shards
    out = model.generate(["Hello"], max_new_tokens=32)  # same result on every process

`initialize` wraps `jax.distributed.initialize`. Where the run is configured from, first hit
wins: explicit arguments; the environment (JAXFORMER_COORDINATOR=host:port,
JAXFORMER_NUM_PROCESSES, JAXFORMER_PROCESS_ID, JAXFORMER_LOCAL_DEVICE_IDS=0,1,..,
JAXFORMER_INIT_TIMEOUT seconds); JAX's cluster detection (SLURM, Open MPI, Kubernetes, ...).
Without any of them it is a no-op (one process). It fails fast and says why, instead of
hanging, when the coordinator cannot be reached; `check_mesh` (run by `jaxformer.load` and
`Model.random` when there are several processes) fails the same way when the processes built
different meshes. docs/multihost.md shows launches with srun, ssh and mpirun.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXFORMER_COORDINATOR"
ENV_NUM_PROCESSES = "JAXFORMER_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXFORMER_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAXFORMER_LOCAL_DEVICE_IDS"
ENV_TIMEOUT = "JAXFORMER_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
MESH_CHECK_TIMEOUT_S = 120


class DistributedError(RuntimeError):
    """A multi-process run could not start or its processes disagree."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """What initialize() set up (num_processes 1 and coordinator None: a single process)."""
    coordinator_address: str | None
    num_processes: int
    process_id: int
    source: str  # "arguments", "environment", "cluster", "single", "already"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None, *,
               timeout_s: float | None = None,
               cluster_detection_method: str | None = None) -> ProcessInfo:
    """Join (or, as process 0, host) the run's coordinator. Call once, before any JAX work.

    coordinator_address: "host:port" of process 0; num_processes; process_id in
    [0, num_processes); local_device_ids: the devices this process drives (default: all it
    sees). timeout_s: how long to wait for the coordinator and the other processes
    (default JAXFORMER_INIT_TIMEOUT or 300). Raises DistributedError, naming the address, when
    the coordinator is not reachable in time.
    """
    if jax.distributed.is_initialized():
        return ProcessInfo(None, jax.process_count(), jax.process_index(), "already")
    timeout_s = float(timeout_s if timeout_s is not None
                      else os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    source = "arguments"
    env = os.environ
    if coordinator_address is None and env.get(ENV_COORDINATOR):
        coordinator_address, source = env[ENV_COORDINATOR], "environment"
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = _env_int(ENV_PROCESS_ID)
    if local_device_ids is None and env.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = [int(x) for x in env[ENV_LOCAL_DEVICE_IDS].split(",") if x.strip()]
    if isinstance(local_device_ids, int):
        local_device_ids = [local_device_ids]
    if None in (coordinator_address, num_processes, process_id):
        detected = _detect(coordinator_address, num_processes, process_id, local_device_ids,
                           cluster_detection_method, timeout_s)
        if detected != (coordinator_address, num_processes, process_id, local_device_ids):
            source = "cluster" if coordinator_address is None else source
        coordinator_address, num_processes, process_id, local_device_ids = detected
    if coordinator_address is None and num_processes in (None, 1):
        return ProcessInfo(None, 1, 0, "single")
    missing = [n for n, v in (("coordinator_address (or JAXFORMER_COORDINATOR)",
                               coordinator_address),
                              ("num_processes (or JAXFORMER_NUM_PROCESSES)", num_processes),
                              ("process_id (or JAXFORMER_PROCESS_ID)", process_id)) if v is None]
    if missing:
        raise DistributedError("jaxformer.distributed.initialize: no cluster environment "
                               "(SLURM, Open MPI, Kubernetes) was detected and "
                               + ", ".join(missing) + " is not set")
    num_processes, process_id = int(num_processes), int(process_id)
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"jaxformer.distributed.initialize: process_id {process_id} is "
                               f"outside [0, num_processes={num_processes})")
    host, port = _split_address(coordinator_address)
    who = f"process {process_id} of {num_processes}"
    if process_id == 0:
        _check_port_free(port, coordinator_address)
    else:
        _wait_reachable(host, port, timeout_s, coordinator_address, who)
    # JAX aborts the process (not an exception) when the others do not show up in time; say
    # why first, so the log explains the abort.
    watchdog = threading.Timer(timeout_s, lambda: print(
        f"jaxformer.distributed: {who} waited {timeout_s:.0f}s at the coordinator "
        f"{coordinator_address} and not all {num_processes} processes arrived; check that "
        f"every process was started with the same coordinator and process count. The JAX "
        f"runtime aborts this process now.", file=sys.stderr, flush=True))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids,
                                   initialization_timeout=int(timeout_s) + 2)
    except Exception as e:
        raise DistributedError(f"jaxformer.distributed.initialize: {who} could not join the "
                               f"coordinator at {coordinator_address}: {e}") from e
    finally:
        watchdog.cancel()
    log.info("jaxformer.distributed: %s joined %s (%d local / %d global devices)", who,
             coordinator_address, jax.local_device_count(), jax.device_count())
    return ProcessInfo(coordinator_address, num_processes, process_id, source)


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise DistributedError(f"{name}={os.environ[name]!r} is not an integer") from None


def _detect(coordinator_address, num_processes, process_id, local_device_ids, method,
            timeout_s):
    """JAX's cluster detection (SLURM, Open MPI, Kubernetes, ...) for the unset values."""
    try:
        from jax._src.clusters import ClusterEnv
        detect = ClusterEnv.auto_detect_unset_distributed_params
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it
        return coordinator_address, num_processes, process_id, local_device_ids
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    try:
        return tuple(detect(coordinator_address, num_processes, process_id, local_device_ids,
                            method, int(timeout_s)))
    except TypeError:  # pragma: no cover - another signature
        return coordinator_address, num_processes, process_id, local_device_ids


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} must be host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def _wait_reachable(host: str, port: int, timeout_s: float, address: str, who: str) -> None:
    """Poll a TCP connect to the coordinator until it answers or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise DistributedError(
        f"jaxformer.distributed: {who} cannot reach the coordinator at {address} within "
        f"{timeout_s:g}s ({last}). Process 0 hosts the coordinator: start it, and check the "
        f"address, the port and any firewall between the hosts.")


def _check_port_free(port: int, address: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is ok
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DistributedError(
                    f"jaxformer.distributed: process 0 cannot host the coordinator at "
                    f"{address}: port {port} is already in use (another run?)") from None


# ---- do all processes agree? -------------------------------------------------------------
_mesh_checks = itertools.count()


def check_mesh(mesh, *, timeout_s: float | None = None) -> None:
    """Raise DistributedError unless every process built the same mesh (sizes and devices).

    A no-op with one process. Every process must call it the same number of times, in the
    same order (jaxformer.load and Model.random do); a process that does not is reported
    after timeout_s instead of hanging the others.
    """
    if jax.process_count() == 1:
        return
    timeout_s = MESH_CHECK_TIMEOUT_S if timeout_s is None else timeout_s
    mine = {"shape": {str(k): int(v) for k, v in dict(mesh.shape).items()},
            "devices": [int(d.id) for d in mesh.devices.flat]}
    n = next(_mesh_checks)
    client = _client()
    if client is None:  # pragma: no cover - no coordination service: use a collective
        import numpy as np
        from jax.experimental import multihost_utils
        multihost_utils.assert_equal(np.asarray(list(mine["shape"].values())),
                                     "processes disagree on the mesh sizes")
        return
    key = f"jaxformer/mesh/{n}"
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(mine))
    seen = {}
    for p in range(jax.process_count()):
        try:
            seen[p] = json.loads(client.blocking_key_value_get(f"{key}/{p}",
                                                               int(timeout_s * 1000)))
        except Exception as e:
            raise DistributedError(
                f"jaxformer.distributed: process {p} did not describe its mesh within "
                f"{timeout_s:g}s (mesh check #{n}); every process must build the same mesh, "
                f"in the same order ({type(e).__name__})") from e
    try:  # nobody leaves (and maybe exits) before everyone has read every description
        client.wait_at_barrier(f"{key}/read", int(timeout_s * 1000))
    except Exception:  # noqa: BLE001 - the comparison below still holds
        pass
    if any(v != seen[0] for v in seen.values()):
        fmt = lambda d: ", ".join(f"{k}={v}" for k, v in d["shape"].items())
        desc = "; ".join(f"process {p}: {fmt(v)}" for p, v in sorted(seen.items()))
        what = "sizes" if any(v["shape"] != seen[0]["shape"] for v in seen.values()) \
            else "device order"
        try:  # every process gets here before any exits: a process that exits first makes
            # the coordination service abort the others, maybe before they report the error
            client.wait_at_barrier(f"{key}/failed", int(timeout_s * 1000))
        except Exception:  # noqa: BLE001 - raise the error either way
            pass
        raise DistributedError(f"jaxformer.distributed: processes disagree on the mesh "
                               f"{what} ({desc}); every process must pass the same sizes to "
                               f"make_mesh")


def _client():
    try:
        from jax._src import distributed as _dist
        return _dist.global_state.client
    except (ImportError, AttributeError):  # pragma: no cover
        return None
