"""What the HTTP handlers share: the served models, the bridge from a scheduler's Handles to
asyncio, the request checks (API key, body size, JSON) and the server's state.

Handlers never block the step loop (submit and abort only enqueue) nor the event loop: each
request's Handle calls a listener on the loop's thread that wakes its handler through
`call_soon_threadsafe`, and the handler drains the Handle's stream without waiting. A client
that disconnects is noticed (a failed write, or a poll of the connection while waiting) and its
requests are aborted, which frees their slots and pages at the loop's next tick.

"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import queue
from typing import Callable

import jax
from fastapi import Request
from fastapi.responses import StreamingResponse

from jaxformer import memory
from jaxformer.sampling import Sampling
from jaxformer.serving import multihost
from jaxformer.serving.embeddings import EmbedBatcher
from jaxformer.serving.metrics import Metrics
from jaxformer.serving.paged_scheduler import PagedConfig, PagedScheduler
from jaxformer.serving.protocol import APIError
from jaxformer.serving.replica_hosts import HostReplicaScheduler
from jaxformer.serving.replicas import ReplicaScheduler
from jaxformer.serving.request import FAILED, FINISHED, QueueFull
from jaxformer.serving.scheduler import SchedulerConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 4 * 2 ** 20
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


@dataclasses.dataclass
class ModelSpec:
    """One served model: its name in requests, how to load it (called on a thread of its
    own, so the server answers 503 meanwhile), and its scheduler's sizes. size_pool: give
    the page pool what the memory plan leaves on the model's devices (memory.pool_plan),
    where device memory is known, instead of paged.num_pages. The configs describe one
    data replica: a data > 1 mesh is served by a ReplicaScheduler, a pool per replica.
    compile_workers: threads that compile the warm-up shapes (PagedEngine.precompile)."""
    name: str
    load: Callable[[], object]
    scheduler: SchedulerConfig = SchedulerConfig()
    paged: PagedConfig = PagedConfig()
    size_pool: bool = False
    compile_workers: int = 1

    def pool(self, model) -> PagedConfig:
        """The PagedConfig to serve `model` with (module docstring of ModelSpec)."""
        if not self.size_pool:
            return self.paged
        p, run = self.paged, model.run
        # one data replica's devices: each replica has its own pool and slots (replicas.py)
        mesh = dict(model.mesh.shape, data=1)
        plan = memory.pool_plan(model.config, mesh, run.dtype, page_size=p.page_size,
                                slots=self.scheduler.slots, prefill_tokens=p.prefill_tokens,
                                rules=model.rules, quantize=run.quantize,
                                kv_cache=run.kv_cache)
        plan = memory.fit_pool(plan, model.mesh.devices.flat)
        if plan.num_pages is None or plan.num_pages < 2:
            return p
        log.info("model %s: %s", self.name, plan.explain())
        return dataclasses.replace(p, num_pages=plan.num_pages)


class ServedModel:
    """A model behind the server: loading -> ready (or failed), its scheduler running."""

    def __init__(self, spec: ModelSpec):
        self.spec, self.name = spec, spec.name
        self.state, self.error = "loading", ""
        self.model = self.sched = self.embedder = None
        self.paged = spec.paged
        self.stop_ids: frozenset[int] = frozenset()
        self.created = 0

    def load(self) -> None:
        try:
            model = self.spec.load()
            hosts = jax.process_count() > 1
            if model.config.arch == "encoder":  # an embedding model: /v1/embeddings only
                if hosts:
                    raise ValueError("embedding models are served by one process")
                self.embedder = EmbedBatcher(model, self.spec.scheduler.slots).start()
                self.model, self.state = model, "ready"
                return
            self.paged = self.spec.pool(model)
            if hosts:  # every process the same shapes and pool (multihost.py)
                self.paged = dataclasses.replace(self.paged, num_pages=multihost.agree(
                    self._settings(model), self.paged.num_pages))
            # a data-parallel mesh: one paged engine per data replica behind one front
            # (PagedScheduler refuses data > 1); the configs describe one replica. Over
            # several processes, process 0's front routes to replicas on any of them
            make = PagedScheduler if model.mesh.shape["data"] == 1 else \
                HostReplicaScheduler if hosts else ReplicaScheduler
            sched = make(model, self.spec.scheduler, self.paged)
            # every shape compiled before the first request (503 meanwhile)
            sched.warmup(self.spec.compile_workers)
            if hosts:  # ready only once every process has compiled and run every shape
                multihost.warmup()
                multihost.barrier(f"jaxformer-serve-warm-{self.name}")
            sched.start()
        except Exception as e:  # noqa: BLE001 - reported by /health and 503s
            log.exception("loading model %s failed", self.name)
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            return
        tok = model.tokenizer
        self.stop_ids = frozenset(i for i in (model.config.eos_token_id,
                                              tok.eos_id if tok else None) if i is not None)
        self.model, self.sched, self.state = model, sched, "ready"

    def _settings(self, model) -> str:
        """What must be the same on every process (multihost.agree): the model, its mesh and
        run settings, the scheduler's sizes (the page count aside: agree takes the least)."""
        return repr((self.name, model.config, model.run, dict(model.mesh.shape),
                     self.spec.scheduler, {k: v for k, v in dataclasses.asdict(self.paged)
                                           .items() if k != "num_pages"}))

    @property
    def max_length(self) -> int:
        return min(self.spec.scheduler.max_length, self.model.config.max_position_embeddings)

    def encode(self, prompt) -> list[int]:
        """A prompt (text or ids) as ids, checked against the vocabulary. Text gets the bos
        token first when the model has one, as generate() gives it."""
        if isinstance(prompt, str):
            tok = self.tokenizer()
            ids = tok.encode(prompt)
            if tok.bos_id is not None and self.model.config.bos_token_id is not None:
                ids = [tok.bos_id] + ids
            return ids
        V = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {V})",
                           "prompt")
        return list(prompt)

    def tokenizer(self):
        if self.model.tokenizer is None:
            raise APIError(400, f"model {self.name} has no tokenizer: send token ids")
        return self.model.tokenizer

    def check_length(self, n_prompt: int, max_new: int | None, param: str) -> int:
        """max_new (None: the rest of the context), or 400 when prompt + max_new does not
        fit the context or the page pool."""
        room = self.max_length - n_prompt
        if room < 1:
            raise APIError(400, f"the prompt is {n_prompt} tokens; the context of {self.name} "
                                f"is {self.max_length}", "prompt" if param == "max_tokens"
                           else "messages", "context_length_exceeded")
        max_new = room if max_new is None else max_new
        if max_new > room:
            raise APIError(400, f"{param}: prompt of {n_prompt} tokens + {param} {max_new} "
                                f"exceeds the context of {self.max_length} tokens", param,
                           "context_length_exceeded")
        p = self.paged
        if -(-(n_prompt + max_new) // p.page_size) > p.num_pages - 1:
            raise APIError(400, f"{param}: {n_prompt + max_new} tokens need more KV pages "
                                f"than the pool's {p.num_pages - 1} of {p.page_size}", param)
        return max_new


class Batch:
    """The n Handles of one HTTP request, awaited on the event loop."""

    def __init__(self, served: ServedModel, metrics: Metrics):
        self.served, self.metrics = served, metrics
        self.handles: list = []
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ended: set[int] = set()
        self._observed = False

    def _notify(self) -> None:  # on the step loop's thread: must never raise there
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def submit(self, prompts: list[list[int]], sampling: Sampling, max_new: int,
               seeds: list[int], ignore_eos: bool) -> "Batch":
        """One submission per (prompt, seed); 429 (the others aborted) on a full queue, 400
        when the scheduler refuses one."""
        try:
            for ids, seed in zip(prompts, seeds):
                self.handles.append(self.served.sched.submit(
                    ids, sampling, max_new, seed=seed, ignore_eos=ignore_eos,
                    listener=self._notify))
        except QueueFull as e:
            self.abort()
            self.metrics.count(self.served.name, "rejected_queue_full")
            raise APIError(429, f"the queue of {self.served.name} is full ({e})") from None
        bad = next((h for h in self.handles if h.done and h.status == FAILED), None)
        if bad is not None:
            self.abort()
            self.metrics.count(self.served.name, "bad_request")
            raise APIError(400, bad.reason)
        return self

    def abort(self) -> None:
        for h in self.handles:
            if not h.done:
                h.abort()

    async def events(self, request: Request | None = None):
        """(index, new token ids) as they come, then (index, None) when that one ends. With
        a request, a client that goes away aborts them all (ClientGone): its connection is
        polled every DISCONNECT_POLL_S, tokens flowing or not (a write to a closed
        connection does not always fail)."""
        check = self._loop.time() + DISCONNECT_POLL_S
        while len(self._ended) < len(self.handles):
            self._wake.clear()
            for i, h in enumerate(self.handles):
                if i in self._ended:
                    continue
                for item in _drain(h):
                    if item is None:
                        self._ended.add(i)
                    yield i, item
            if len(self._ended) == len(self.handles):
                break
            if request is not None and self._loop.time() >= check:
                check = self._loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    self.abort()
                    raise ClientGone()
            try:
                await asyncio.wait_for(self._wake.wait(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass

    def outputs(self) -> list:
        """The RequestOutputs (after events() ended); observed into the metrics once."""
        outs = [h.result(timeout=5.0) for h in self.handles]
        if not self._observed:
            self._observed = True
            for o in outs:
                self.metrics.observe(self.served.name, o)
        return outs

    @contextlib.asynccontextmanager
    async def guard(self):
        """close() when the handler leaves, however it leaves."""
        try:
            yield self
        finally:
            self.close()

    async def collect(self, request: Request) -> list | None:
        """Wait for every request of the batch: their outputs, or None when the client went
        away (they are aborted)."""
        async with self.guard():
            try:
                async for _ in self.events(request):
                    pass
            except ClientGone:
                return None
            return self.outputs()

    def close(self) -> None:
        """Abort what still runs (the handler left early: a disconnect, a cancelled task, an
        error) and count every request once. Nothing is awaited: a cancelled task may not
        await again, so aborted requests are observed by a worker thread once the loop has
        ended them."""
        if len(self._ended) < len(self.handles):
            self.abort()
            self._loop.run_in_executor(None, self._observe_when_done)
        else:
            self._observe_when_done()

    def _observe_when_done(self) -> None:
        _wait_done(self.handles, 30.0)
        with contextlib.suppress(TimeoutError):
            self.outputs()


class EventStream(StreamingResponse):
    """Server-sent events from an async generator over a Batch. Starlette leaves a generator
    it stopped iterating (the client went away: a failed write, a cancelled task) suspended
    until garbage collection; here the Batch is closed as the response ends, so its requests
    are aborted and their pages freed at once."""

    def __init__(self, body, batch: Batch):
        super().__init__(body, media_type="text/event-stream")
        self.batch = batch

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.batch.close()


class ClientGone(Exception):
    """The client disconnected while its request ran."""


def _drain(h):
    """The events a Handle has queued, without waiting (None last when it ended)."""
    out = []
    try:
        for item in h.stream(timeout=0):
            out.append(item)
        out.append(None)
    except queue.Empty:
        pass
    return out


def _wait_done(handles, timeout: float) -> None:
    for h in handles:
        with contextlib.suppress(TimeoutError):
            h.result(timeout)


def finish_reason(out) -> str | None:
    if out.status == FINISHED:
        return out.reason
    return None


def raise_if_failed(out) -> None:
    """A request that ended without finishing: 400 if it could never be served, 503 if the
    server stopped, else 500."""
    if out.status == FINISHED:
        return
    if "pages" in out.reason or "exceeds" in out.reason:
        raise APIError(400, out.reason)
    if "stopped" in out.reason:
        raise APIError(503, f"request {out.status}: {out.reason}")
    raise APIError(500, f"request {out.status}: {out.reason}")


# ---- the server ------------------------------------------------------------------------------
@dataclasses.dataclass
class ServerState:
    models: dict[str, ServedModel]
    metrics: Metrics
    api_key: str | None
    max_body: int

    def get(self, name: str, task: str = "generate") -> ServedModel:
        """The ready model `name` for a task ("generate" or "embed"); 404, 503 or 400."""
        m = self.models.get(name)
        if m is None:
            raise APIError(404, f"model {name!r} is not served here (serving: "
                                f"{', '.join(self.models)})", "model", "model_not_found")
        if m.state != "ready":
            raise APIError(503, f"model {name} is {m.state}"
                                + (f": {m.error}" if m.error else ""))
        if task == "embed" and m.embedder is None:
            raise APIError(400, f"model {name} is a decoder: it does not serve embeddings",
                           "model")
        if task == "generate" and m.sched is None:
            raise APIError(400, f"model {name} is an encoder: it serves /v1/embeddings only",
                           "model")
        return m

    def ready(self) -> dict:
        return {n: m.sched for n, m in self.models.items()
                if m.state == "ready" and m.sched is not None}


def state(request: Request) -> ServerState:
    return request.app.state.jaxformer


def check_key(request: Request) -> None:
    """401 unless the request carries the API key (Authorization: Bearer KEY)."""
    key = state(request).api_key
    if key is None:
        return
    got = request.headers.get("authorization", "")
    if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), key.encode())):
        raise APIError(401, "a valid API key is needed (Authorization: Bearer KEY)", None,
                       "invalid_api_key")


async def read_json(request: Request):
    """The body as JSON: 413 past the size limit (counted as it arrives, whatever
    Content-Length says), 400 if it is not JSON."""
    limit = state(request).max_body
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        return json.loads(body)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
