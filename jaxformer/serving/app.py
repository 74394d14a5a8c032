"""The HTTP application: FastAPI over one or more served models, each a PagedScheduler whose
step loop runs on its own thread (bridge.py: how handlers wait on it without blocking).

    app = create_app([ModelSpec("demo", jf.demo_model)], api_key=None)
    uvicorn.run(app)                                   # or jaxformer.serving.server.serve

Routes: /v1 (openai_api), /v2 (triton_api), /health, /metrics. Errors are OpenAI's schema under
/v1 and KServe's {"error": message} under /v2: 400 bad parameters or a prompt longer than the
context, 401 a missing or wrong API key, 404 an unknown model, 413 a body over the limit, 429
a full queue, 503 a model still loading (or failed to load).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from jaxformer.serving import openai_api, triton_api
from jaxformer.serving.bridge import (DEFAULT_MAX_BODY, ModelSpec, ServedModel, ServerState)
from jaxformer.serving.metrics import CONTENT_TYPE, Metrics
from jaxformer.serving.protocol import APIError


def create_app(specs: list[ModelSpec], api_key: str | None = None,
               max_body: int = DEFAULT_MAX_BODY, load_in_background: bool = True) -> FastAPI:
    """The server over `specs` (distinct names). Models load on their own threads when the
    app starts (503 until then); their schedulers stop when it shuts down."""
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"create_app: needs models with distinct names, got {names}")
    models = {s.name: ServedModel(s) for s in specs}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threads = [threading.Thread(target=m.load, name=f"load-{m.name}", daemon=True)
                   for m in models.values()]
        for t in threads:
            t.start()
        if not load_in_background:
            await asyncio.to_thread(lambda: [t.join() for t in threads])
        try:
            yield
        finally:
            for m in models.values():
                if m.sched is not None:
                    m.sched.stop(timeout=30)
                if m.embedder is not None:
                    m.embedder.stop(timeout=30)

    app = FastAPI(title="jaxformer", lifespan=lifespan)
    st = ServerState(models, None, api_key, max_body)
    st.metrics = Metrics(st.ready)
    app.state.jaxformer = st

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if request.url.path.startswith("/v2"):
            return JSONResponse({"error": e.message}, status_code=e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        bad = {n: m.state for n, m in models.items() if m.state != "ready"}
        if bad:
            return JSONResponse({"status": "unavailable", "models": bad}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(st.metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(openai_api.router)
    app.include_router(triton_api.router)
    return app
