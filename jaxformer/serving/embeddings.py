"""Batching of concurrent embedding requests for an encoder behind the server.

    batcher = EmbedBatcher(model, max_batch=128).start()
    vectors, tokens = batcher.submit(["a sentence", "another"]).result()   # [2, D], [2]
    batcher.stop()

Requests (from any thread) queue; the batcher's own thread takes the first waiting request,
then every other request already waiting up to max_batch texts in all, and runs them as one
Model.embed call (similar lengths share a compiled call there, padding stays small). Each
request's texts are tokenized and checked on their own first, so a bad one fails alone with
its ValueError. Pooling and normalisation are the checkpoint's (sentence.json).
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading

import numpy as np

from jaxformer.embed import resolve, sequences

log = logging.getLogger(__name__)


class EmbedBatcher:
    """Concurrent requests to one encoder's embed(), run together (module docstring)."""

    def __init__(self, model, max_batch: int = 128):
        if max_batch < 1:
            raise ValueError(f"EmbedBatcher.max_batch: must be positive, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        _, _, self.max_len = resolve(model, None, None)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.calls = 0  # embed() calls made (several requests may share one)

    def submit(self, inputs) -> concurrent.futures.Future:
        """A future of (float32 vectors [n, D], tokens per text [n]); ValueError for a bad
        input (raised here, before it queues)."""
        seqs = sequences(self.model, inputs, self.max_len)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(([s[0].tolist() for s in seqs], fut))
        return fut

    def start(self) -> "EmbedBatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxformer-embed",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, n = [first], len(first[0])
            while n < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
                n += len(job[0])
            self._embed(jobs)

    def _embed(self, jobs) -> None:
        ids = [seq for seqs, _ in jobs for seq in seqs]
        try:
            out = self.model.embed(ids, batch_size=self.max_batch)
            self.calls += 1
        except Exception as e:  # noqa: BLE001 - the failure belongs to these requests
            log.warning("embedding %d texts failed: %s", len(ids), e)
            for _, fut in jobs:
                fut.set_exception(e)
            return
        at = 0
        for seqs, fut in jobs:
            fut.set_result((out[at: at + len(seqs)], np.asarray([len(s) for s in seqs])))
            at += len(seqs)
