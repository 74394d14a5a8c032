"""KServe v2 / Triton routes: health, server and model metadata, and Triton's generate
extension (/v2/models/{name}/generate and generate_stream) as its TensorRT-LLM models take it:

    POST /v2/models/demo/generate
    {"text_input": "Hello", "max_tokens": 16, "temperature": 0, "stop_words": ["."]}
    -> {"model_name": "demo", "model_version": "1", "text_output": "...", ...}

Parameters come as top-level fields or in "parameters" (Triton accepts both). generate_stream
answers server-sent events, one `data: {... "text_output": delta}` per chunk, the last with
"finish_reason". Errors are {"error": message} with the status codes of the OpenAI routes.
"""
from __future__ import annotations

import json
import random
from typing import Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from jaxformer import __version__
from jaxformer.serving.bridge import (Batch, ClientGone, EventStream, check_key,
                                      finish_reason, raise_if_failed, read_json, state)
from jaxformer.serving.protocol import (MAX_SEED, APIError, Detokenizer, SamplingFields,
                                        final_text, parse)

router = APIRouter(prefix="/v2")
_auth = [Depends(check_key)]


class GenerateRequest(SamplingFields):
    """text_input plus the sampling fields of the OpenAI routes, under Triton's names too
    (stop_words, random_seed, repetition_penalty, ...)."""
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    text_input: Union[str, list[int]]
    max_tokens: int = Field(16, ge=1)
    stop_words: Union[str, list[str], None] = None
    random_seed: int | None = Field(None, ge=0, le=MAX_SEED)


@router.get("/health/live")
async def live():
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request):
    ok = all(m.state == "ready" for m in state(request).models.values())
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("", dependencies=_auth)
async def server_metadata():
    return {"name": "jaxformer", "version": __version__, "extensions": ["generate"]}


@router.get("/models/{name}/ready", dependencies=_auth)
async def model_ready(name: str, request: Request):
    m = state(request).models.get(name)
    if m is None:
        raise APIError(404, f"model {name!r} is not served here")
    ok = m.state == "ready"
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", dependencies=_auth)
@router.get("/models/{name}/versions/{version}", dependencies=_auth)
async def model_metadata(name: str, request: Request, version: str = "1"):
    m = state(request).models.get(name)
    if m is None:
        raise APIError(404, f"model {name!r} is not served here")
    scalar = lambda n, t: {"name": n, "datatype": t, "shape": [1]}  # noqa: E731
    return {"name": name, "versions": ["1"], "platform": "jaxformer",
            "inputs": [scalar("text_input", "BYTES"), scalar("max_tokens", "INT32"),
                       scalar("temperature", "FP32"), scalar("top_k", "INT32"),
                       scalar("top_p", "FP32"), scalar("random_seed", "UINT64"),
                       {"name": "stop_words", "datatype": "BYTES", "shape": [-1]},
                       scalar("stream", "BOOL")],
            "outputs": [scalar("text_output", "BYTES")], "state": m.state}


@router.post("/models/{name}/generate", dependencies=_auth)
@router.post("/models/{name}/versions/{version}/generate", dependencies=_auth)
async def generate(name: str, request: Request):
    return await _generate(name, request, stream=False)


@router.post("/models/{name}/generate_stream", dependencies=_auth)
@router.post("/models/{name}/versions/{version}/generate_stream", dependencies=_auth)
async def generate_stream(name: str, request: Request):
    return await _generate(name, request, stream=True)


async def _generate(name: str, request: Request, stream: bool):
    st = state(request)
    body = await read_json(request)
    if isinstance(body, dict) and isinstance(body.get("parameters"), dict):
        body = {**body.pop("parameters"), **body}
    if isinstance(body, dict):
        body = {**body, "model": name}
        if body.get("stop") is None and body.get("stop_words") is not None:
            body["stop"] = body["stop_words"]
        if body.get("seed") is None and body.get("random_seed") is not None:
            body["seed"] = body["random_seed"]
    req = parse(GenerateRequest, body)
    served = st.get(name)
    ids = served.encode(req.text_input)
    if not ids:
        raise APIError(400, "text_input: must not be empty", "text_input")
    max_new = served.check_length(len(ids), req.max_tokens, "max_tokens")
    sampling = req.sampling(logprobs=False)
    seed = req.seed if req.seed is not None else random.getrandbits(62)
    batch = Batch(served, st.metrics).submit([ids], sampling, max_new, [seed], req.ignore_eos)
    tok = served.tokenizer()
    head = {"model_name": name, "model_version": "1"}
    if stream:
        return EventStream(_sse(batch, request, tok, sampling, served.stop_ids, head), batch)
    outs = await batch.collect(request)
    if outs is None:
        return None
    out = outs[0]
    raise_if_failed(out)
    return {**head, "text_output": final_text(tok, out.tokens, sampling, served.stop_ids),
            "finish_reason": finish_reason(out), "output_tokens": len(out.tokens),
            "prompt_tokens": out.prompt_tokens}


async def _sse(batch, request, tok, sampling, stop_ids, head):
    detok = Detokenizer(tok, sampling, stop_ids)
    async with batch.guard():
        try:
            async for _, toks in batch.events(request):
                if toks is None:
                    out = batch.handles[0].result(timeout=5.0)
                    if out.status != "finished":
                        yield _event({"error": f"request {out.status}: {out.reason}"})
                        return
                    yield _event({**head, "text_output": detok.finish(),
                                  "finish_reason": finish_reason(out)})
                else:
                    delta = detok.push(toks)
                    if delta:
                        yield _event({**head, "text_output": delta})
        except ClientGone:
            return


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
