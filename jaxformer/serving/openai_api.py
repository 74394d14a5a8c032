"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models,
/v1/embeddings (encoders).

A request with n > 1 is n submissions with seeds seed, seed + 1, ...; a completion request
with several prompts is one submission per prompt and choice (choice index = prompt * n + j).
Streams are server-sent events, `data: [DONE]` last, with a usage chunk when
stream_options.include_usage. Log-probabilities are under the model's unprocessed
distribution (log_softmax of the raw logits). Those of generated tokens come from the compiled
serving step itself: the chosen token's, and with top_logprobs (chat) / logprobs: N
(completions) its N most likely alternatives (Sampling.top_logprobs; the step computes the
top 20 only when a row of its batch asks), each streamed chunk carrying its own tokens'.
echo's prompt log-probabilities (and their alternatives) come from the paged scheduler's
chunked prefill (Sampling.prompt_logprobs: such a request prefills its whole prompt, no
prefix-cache hit); under the contiguous scheduler, from one teacher-forced forward pass
(model.logits) over the prompt on a worker thread. A streamed echo sends the prompt's text
without log-probabilities.
"""
from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid

import numpy as np
from fastapi import APIRouter, Depends, Request

from jaxformer.serving.bridge import (Batch, ClientGone, EventStream, ServedModel, check_key,
                                      finish_reason, raise_if_failed, read_json, state)
from jaxformer.serving.protocol import (APIError, ChatRequest, CompletionRequest, Detokenizer,
                                        EmbeddingRequest, chat_prompt, final_text, parse)

router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])


@router.get("/models")
async def models(request: Request):
    st = state(request)
    return {"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "jaxformer",
         "max_model_len": m.max_length if m.state == "ready" else None}
        for n, m in st.models.items()]}


@router.post("/completions")
async def completions(request: Request):
    st = state(request)
    req = parse(CompletionRequest, await read_json(request))
    served = st.get(req.model)
    prompts = [served.encode(p) for p in req.prompts()]
    max_new = min(served.check_length(len(p), req.max_tokens, "max_tokens") for p in prompts)
    k = req.logprobs
    run = _Run(served, req, prompts, max_new, k, "text_completion")
    return await run.respond(request)


@router.post("/chat/completions")
async def chat_completions(request: Request):
    st = state(request)
    req = parse(ChatRequest, await read_json(request))
    req.check()
    served = st.get(req.model)
    ids = chat_prompt(served.tokenizer(), [m.plain() for m in req.messages])
    limit = req.max_completion_tokens or req.max_tokens
    max_new = served.check_length(len(ids), limit, "max_tokens")
    k = (req.top_logprobs or 0) if req.logprobs else None
    run = _Run(served, req, [ids], max_new, k, "chat.completion")
    return await run.respond(request)


class _Run:
    """One OpenAI request over its Batch of submissions."""

    def __init__(self, served: ServedModel, req, prompts, max_new, k, kind):
        self.served, self.req, self.prompts, self.max_new = served, req, prompts, max_new
        self.k, self.kind, self.chat = k, kind, kind == "chat.completion"
        self.tok = served.tokenizer()
        self.sampling = req.sampling(logprobs=k is not None, top_logprobs=k or 0,
                                     prompt_logprobs=k is not None and self._echo())
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.n = req.n

    def _prompt(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]

    async def respond(self, request: Request):
        st = state(request)
        base = self.req.seed if self.req.seed is not None else random.getrandbits(62)
        jobs = [(p, base + j) for p in self.prompts for j in range(self.n)]
        batch = Batch(self.served, st.metrics).submit(
            [p for p, _ in jobs], self.sampling, self.max_new, [s for _, s in jobs],
            self.req.ignore_eos)
        if self.req.stream:
            return EventStream(self._sse(batch, request), batch)
        outs = await batch.collect(request)
        if outs is None:
            return None
        for o in outs:
            raise_if_failed(o)
        choices = [await self._choice(i, o) for i, o in enumerate(outs)]
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.served.name, "choices": choices, "usage": _usage(outs, self.n)}

    async def _choice(self, i: int, out) -> dict:
        text = final_text(self.tok, out.tokens, self.sampling, self.served.stop_ids)
        lp = None
        if self.k is not None:
            lp = await self._logprobs(i, out.tokens, out.logprobs, out.top_logprobs,
                                      echo=self._echo(), prompt_lp=out.prompt_logprobs)
        if self.chat:
            return {"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": lp, "finish_reason": finish_reason(out)}
        if self._echo():
            text = self.tok.decode(self._prompt(i)) + text
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(out)}

    def _echo(self) -> bool:
        return not self.chat and self.req.echo

    # ---- streaming ---------------------------------------------------------------------
    async def _sse(self, batch: Batch, request: Request):
        detok = [Detokenizer(self.tok, self.sampling, self.served.stop_ids)
                 for _ in batch.handles]
        sent = [0] * len(batch.handles)
        async with batch.guard():
            try:
                for i in range(len(batch.handles)):
                    first = self._first_chunk(i)
                    if first is not None:
                        yield _event(first)
                async for i, toks in batch.events(request):
                    h = batch.handles[i]
                    if toks is None:
                        out = h.result(timeout=5.0)
                        if out.status != "finished":
                            yield _event(APIError(500, f"request {out.status}: "
                                                       f"{out.reason}").body())
                            continue
                        delta = detok[i].finish()
                        yield _event(self._chunk(i, delta, None, finish_reason(out)))
                        continue
                    delta = detok[i].push(toks)
                    lp = None
                    if self.k is not None:  # the step's own, for these tokens
                        span = slice(sent[i], sent[i] + len(toks))
                        lp = await self._logprobs(i, toks, h.logprobs[span],
                                                  h.top_logprobs[span], echo=False)
                    sent[i] += len(toks)
                    if delta or lp is not None:
                        yield _event(self._chunk(i, delta, lp, None))
            except ClientGone:
                return
            outs = batch.outputs()
        opts = self.req.stream_options
        if opts is not None and opts.include_usage:
            yield _event({"id": self.id, "object": self._chunk_kind(),
                          "created": self.created, "model": self.served.name, "choices": [],
                          "usage": _usage(outs, self.n)})
        yield b"data: [DONE]\n\n"

    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _first_chunk(self, i: int) -> dict | None:
        if self.chat:
            return self._chunk(i, "", None, None, role=True)
        if self._echo():
            return self._chunk(i, self.tok.decode(self._prompt(i)), None, None)
        return None

    def _chunk(self, i, text, lp, finish, role=False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
        return {"id": self.id, "object": self._chunk_kind(), "created": self.created,
                "model": self.served.name, "choices": [choice]}

    # ---- log-probabilities ---------------------------------------------------------------
    async def _logprobs(self, i: int, new, chosen, top, echo: bool, prompt_lp=None) -> dict:
        """OpenAI's logprobs of the new tokens from the serving step (chosen: their
        log-probs; top: per token its (id, log-prob) alternatives); with echo the prompt's
        tokens first (the first has none): prompt_lp, the prefill's (RequestOutput's
        prompt_logprobs), or else from a teacher-forced pass over the prompt."""
        prompt, k = self._prompt(i), self.k
        piece = lambda t: self.tok.decode([t], skip_special_tokens=False)  # noqa: E731
        if self.chat:
            content = []
            for t, lp, alts in zip(new, chosen, top):
                s = piece(t)
                content.append({"token": s, "logprob": float(lp), "bytes": list(s.encode()),
                                "top_logprobs": [{"token": piece(a), "logprob": v,
                                                  "bytes": list(piece(a).encode())}
                                                 for a, v in alts[:k]]})
            return {"content": content}
        toks, lps, tops = [], [], []
        if echo:
            if prompt_lp is not None:
                prompt_top = [alts for _, alts in prompt_lp[1:]]
                prompt_lp = [v for v, _ in prompt_lp[1:]]
            else:  # the contiguous scheduler's prefill computes none
                prompt_lp, prompt_top = await asyncio.to_thread(
                    _teacher_forced, self.served.model, prompt, k)
            toks += [piece(t) for t in prompt]
            lps += [None] + prompt_lp
            tops += [None] + ([_top_dict(row[:k], piece) for row in prompt_top] if k
                              else [None] * (len(prompt) - 1))
        toks += [piece(t) for t in new]
        lps += [float(v) for v in chosen]
        tops += [_top_dict(row[:k], piece) for row in top] if k else [None] * len(new)
        offsets, at = [], 0
        for s in toks:
            offsets.append(at)
            at += len(s)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops if k else None,
                "text_offset": offsets}


def _teacher_forced(model, prompt: list[int], k: int | None):
    """echo's prompt log-probs from one forward pass over the prompt: each token's
    log-probability given its prefix (positions 1..len - 1) and, with k, the k most likely
    (token, log-prob) there."""
    logits = model.logits(np.asarray([prompt]))[0].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    rows = lp[: len(prompt) - 1]  # row p - 1 predicts position p
    top = None
    if k:
        idx = np.argsort(-rows, axis=-1, kind="stable")[:, :k]
        top = [[(int(a), float(rows[j, a])) for a in idx[j]] for j in range(len(rows))]
    return [float(rows[p - 1, prompt[p]]) for p in range(1, len(prompt))], top


def _top_dict(row, piece) -> dict:
    """{text: log-prob} of the completions API, best first; ids that decode to the same text
    keep the best one's log-prob."""
    out: dict = {}
    for a, v in row:
        out.setdefault(piece(a), v)
    return out


def _usage(outs, n: int) -> dict:
    prompt = sum(o.prompt_tokens for o in outs[::n])  # each prompt once, as OpenAI counts
    done = sum(len(o.tokens) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


@router.post("/embeddings")
async def embeddings(request: Request):
    """OpenAI's embeddings API over an encoder's EmbedBatcher (concurrent requests share its
    calls)."""
    st = state(request)
    req = parse(EmbeddingRequest, await read_json(request))
    served = st.get(req.model, "embed")
    D = served.model.config.hidden_size
    if req.dimensions not in (None, D):
        raise APIError(400, f"dimensions: {served.name} gives {D}-dimensional embeddings",
                       "dimensions")
    try:
        fut = served.embedder.submit(req.inputs())
    except ValueError as e:
        raise APIError(400, f"input: {e}", "input") from None
    vectors, tokens = await asyncio.wrap_future(fut)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
             if req.encoding_format == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]
    n = int(tokens.sum())
    return {"object": "list", "data": data, "model": served.name,
            "usage": {"prompt_tokens": n, "total_tokens": n}}
