"""Run the HTTP server (uvicorn) over one or more models on disjoint device groups.

    serve([ModelSource("chat", "smollm2-135m-instruct", tensor=2),
           ModelSource("demo", "demo")], host="127.0.0.1", port=8000)

Each model gets its own mesh over its own devices (by default the next free ones, in order),
its own PagedScheduler and queue. The HTTP port opens at once; models load behind it (503
until ready). SIGTERM or Ctrl-C: uvicorn stops accepting connections, lets the requests in
flight finish for up to `drain_timeout` seconds, then the schedulers stop (whatever still runs
is aborted) and the process exits.

Several processes (jax.distributed initialized; one model whose mesh spans them all): process
0 does all of the above; every other process opens no port, loads the same model, warms up the
same shapes and runs the scheduler's loop on process 0's broadcast plan (multihost.py) until
process 0's loop stops, then returns. A data > 1 mesh is served by data-parallel replicas
behind process 0's one front, each on the processes that hold its devices
(replica_hosts.py). The server turns ready once every process is warm.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time

import jax
import numpy as np
import uvicorn

import jaxformer as jf
from jaxformer.serving import multihost
from jaxformer.serving.app import create_app
from jaxformer.serving.bridge import DEFAULT_MAX_BODY, ModelSpec, ServedModel
from jaxformer.serving.paged_scheduler import PagedConfig
from jaxformer.serving.replicas import replica_processes
from jaxformer.serving.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelSource:
    """A model to serve: its name in requests; source "demo" (the built-in untrained model),
    a jaxformer checkpoint directory or any name jf.load resolves; its mesh sizes and device
    indices (into jax.devices(); None: the next free ones)."""
    name: str
    source: str
    data: int = 1
    pipe: int = 1
    tensor: int = 1
    devices: list[int] | None = None

    @property
    def size(self) -> int:
        return self.data * self.pipe * self.tensor


def assign_devices(sources: list[ModelSource], count: int) -> list[list[int]]:
    """Each model's device indices: those it names, else the lowest ones nobody named or took
    yet. ValueError when a group is the wrong size, out of range or shared."""
    named = {i for s in sources if s.devices for i in s.devices}
    taken: set[int] = set()
    free = (i for i in range(count) if i not in named)
    out = []
    for s in sources:
        ids = list(s.devices) if s.devices else [next(free, None) for _ in range(s.size)]
        if None in ids:
            raise ValueError(f"model {s.name}: needs {s.size} devices; only {count} exist and "
                             f"the other models hold the rest")
        if len(ids) != s.size:
            raise ValueError(f"model {s.name}: {len(ids)} devices named for data {s.data} x "
                             f"pipe {s.pipe} x tensor {s.tensor} = {s.size}")
        bad = [i for i in ids if not 0 <= i < count]
        if bad:
            raise ValueError(f"model {s.name}: no device {bad[0]} (devices 0..{count - 1})")
        shared = taken & set(ids)
        if shared or len(set(ids)) != len(ids):
            raise ValueError(f"model {s.name}: device {min(shared or ids)} is used twice "
                             f"(each model needs its own devices)")
        taken |= set(ids)
        out.append(ids)
    return out


def loader(src: ModelSource, devices: list[int], dtype: str = "auto",
           attention: str = "auto", quantize: str | None = None, kv_cache: str | None = None):
    """A function that loads `src` onto its mesh (called on the model's loading thread)."""
    def load():
        devs = [jax.devices()[i] for i in devices]
        mesh = jf.make_mesh(src.data, src.pipe, src.tensor, devices=devs)
        dt = dtype if dtype != "auto" else ("float32" if devs[0].platform == "cpu"
                                            else "bfloat16")
        if src.source == "demo":
            return jf.demo_model(mesh=mesh, dtype=dt, quantize=quantize, kv_cache=kv_cache,
                                 attention=attention)
        return jf.load(src.source, mesh=mesh, dtype=dt, attention=attention,
                       quantize=quantize, kv_cache=kv_cache)
    return load


def build_specs(sources: list[ModelSource], scheduler: SchedulerConfig, paged: PagedConfig,
                **load_kwargs) -> list[ModelSpec]:
    if jax.process_count() > 1:
        check_processes(sources)
    groups = assign_devices(sources, jax.device_count())
    return [ModelSpec(s.name, loader(s, g, **load_kwargs), scheduler, paged)
            for s, g in zip(sources, groups)]


def check_processes(sources: list[ModelSource]) -> None:
    """Several processes serve one model whose mesh holds devices of every process, its data
    replicas each on processes of their own or all on the same ones (module docstring);
    ValueError naming what the flags ask for instead."""
    P = jax.process_count()
    if len(sources) != 1:
        raise ValueError(f"{P} processes serve one model together; the flags name "
                         f"{len(sources)} ({', '.join(s.name for s in sources)})")
    s, devices = sources[0], jax.devices()
    mine = [devices[i] for i in assign_devices(sources, len(devices))[0]]
    held = {d.process_index for d in mine}
    missing = [p for p in range(P) if p not in held]
    if missing:
        raise ValueError(f"model {s.name}: its mesh (data {s.data} x pipe {s.pipe} x tensor "
                         f"{s.tensor}) holds no device of process {missing[0]}: over {P} "
                         f"processes ({len(devices)} devices) the mesh must span them all")
    try:
        replica_processes(np.asarray(mine, dtype=object).reshape(s.data, -1))
    except ValueError as e:
        raise ValueError(f"model {s.name}: --data {s.data}: {e}") from None


def follow(spec: ModelSpec) -> None:
    """A process other than 0 (module docstring): load, warm up, then run process 0's plan
    until process 0's loop stops. ValueError when the model cannot be served here."""
    _defer_sigterm()
    served = ServedModel(spec)
    served.load()
    if served.state != "ready":
        raise ValueError(f"process {jax.process_index()}: model {spec.name}: {served.error}")
    log.info("process %d follows process 0's plan for %s", jax.process_index(), spec.name)
    while not served.sched.join(timeout=1.0):
        pass
    error = getattr(served.sched, "error", "")
    if error:  # the lockstep ticks failed (replica_hosts.py): another process is gone
        raise multihost.ProcessLost(f"model {spec.name}: {error}")


def _defer_sigterm() -> None:
    """A launcher often signals every process at once: a follower keeps following until
    process 0 has drained and broadcast the stop (else process 0's drain would wait on a
    process that is gone). A second SIGTERM ends it at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(sig, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next one ends the process
        log.warning("process %d: SIGTERM; following process 0 until it stops (send it "
                    "again to end this process now)", jax.process_index())
    signal.signal(signal.SIGTERM, handler)


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises a caught signal once it has shut down, which would end a cleanly
        # drained process by SIGTERM; the drain is the answer to SIGTERM, so it exits 0
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()


def serve(specs: list[ModelSpec], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY,
          drain_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGTERM / SIGINT (module docstring); on a process other than 0 of
    several, follow process 0 until it stops."""
    if jax.process_count() > 1 and not multihost.is_leader():
        follow(specs[0])
        return
    app = create_app(specs, api_key=api_key, max_body=max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout, access_log=False)
    server = _Server(config)
    models = app.state.jaxformer.models
    if jax.process_count() > 1:
        threading.Thread(target=_stop_if_failed, args=(models, server), daemon=True,
                         name="stop-if-failed").start()
    server.run()
    failed = [m for m in models.values() if m.state == "failed"]
    if jax.process_count() > 1 and failed:
        raise ValueError(f"model {failed[0].name}: {failed[0].error}")
    lost = [m for m in models.values() if getattr(m.sched, "error", "")]
    if lost:
        raise multihost.ProcessLost(f"model {lost[0].name}: {lost[0].sched.error}")


def _stop_if_failed(models: dict, server: uvicorn.Server) -> None:
    """Several processes: a model that failed to load can never be served (the followers
    cannot go on without process 0's plan), nor one whose replicas' lockstep ticks failed (a
    process died: replica_hosts.py), so the server stops instead of answering 503."""
    while not server.should_exit:
        states = {m.state for m in models.values()}
        if "failed" in states:
            log.error("a model failed to load; process 0 stops (the other processes follow)")
            server.should_exit = True
        lost = [m for m in models.values() if getattr(m.sched, "error", "")]
        if lost:  # the replicas' lockstep ticks failed: no request can be served any more
            log.error("model %s: %s; process 0 stops", lost[0].name, lost[0].sched.error)
            server.should_exit = True
        time.sleep(0.2)
