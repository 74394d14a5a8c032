"""The OpenAI wire protocol: request models (pydantic), their validation into a Sampling, the
error schema, and the incremental detokenizer the streamed text comes from.

Requests are checked here, before anything reaches the scheduler: a bad field answers 400 with
OpenAI's error body naming the field (`param`).
"""
from __future__ import annotations

from typing import Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from jaxformer import chat_template
from jaxformer.generate import cut_text
from jaxformer.sampling import TOP_LOGPROBS, Sampling

MAX_TOP_LOGPROBS = TOP_LOGPROBS  # OpenAI's bound for top_logprobs, the compiled step's K
MAX_STOP = 4  # OpenAI's bound for `stop` (and SchedulerConfig.stop_strings' default)
MAX_SEED = 2 ** 63 - 1

# A plain transcript for tokenizers without a chat template (the demo model's byte tokenizer);
# the same text `jaxformer chat` uses (cli_chat.TRANSCRIPT_TEMPLATE, a floor above this one).
TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


class APIError(Exception):
    """An HTTP error in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
             500: "internal_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The parameters completions and chat share (OpenAI's, plus vLLM's common extensions
    top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids)."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 (vLLM) or 0: off
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def sampling(self, logprobs: bool, top_logprobs: int = 0,
                 prompt_logprobs: bool = False) -> Sampling:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
        try:
            return Sampling(temperature=self.temperature, top_k=max(self.top_k, 0),
                            top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty,
                            presence_penalty=self.presence_penalty,
                            frequency_penalty=self.frequency_penalty,
                            stop_token_ids=tuple(self.stop_token_ids),
                            stop_strings=tuple(stops), logprobs=logprobs,
                            top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)
        except ValueError as e:  # "Sampling.top_p: ..." -> param top_p
            field = str(e).split(":")[0].removeprefix("Sampling.")
            raise APIError(400, str(e), field) from None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise APIError(400, "prompt: must not be empty", "prompt")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported (only best_of == n)", "best_of")
        return list(p)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: input as a text, a list of texts, token ids or a list of
    token-id lists; the vectors as float lists or base64 of little-endian float32."""
    model_config = ConfigDict(extra="allow")
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def inputs(self) -> list:
        x = self.input
        if isinstance(x, str) or (x and isinstance(x[0], int)):
            x = [x]
        if not x or any(len(t) == 0 for t in x):
            raise APIError(400, "input: must not be empty", "input")
        return list(x)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def plain(self) -> dict:
        """The message as the chat template sees it: content parts of type text joined."""
        c = self.content
        if isinstance(c, list):
            if any(part.get("type") != "text" for part in c):
                raise APIError(400, "messages: only text content parts are supported",
                               "messages")
            c = "".join(str(part.get("text", "")) for part in c)
        out = dict(self.model_extra or {}, role=self.role, content=c or "")
        return out


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    response_format: dict | None = None

    def check(self) -> None:
        if self.tools:
            raise APIError(400, "tools are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format: only text is supported", "response_format")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """The request model of a JSON body, or APIError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-",)))
        raise APIError(400, f"{loc}: {err['msg']}", loc or None) from None


# ---- prompts -------------------------------------------------------------------------------
def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation's prompt ids: the tokenizer's chat template rendered as transformers
    renders it, else a plain User:/Assistant: transcript."""
    try:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages)
        return tokenizer.encode(chat_template.render(TRANSCRIPT_TEMPLATE, messages))
    except ValueError as e:  # ChatTemplateError included
        raise APIError(400, f"messages: {e}", "messages") from None


# ---- text ----------------------------------------------------------------------------------
def final_text(tokenizer, ids: list[int], sampling: Sampling, stop_ids) -> str:
    """The completion's text as generate() gives it: a final stop token dropped, everything
    from the first stop string on cut."""
    return cut_text(tokenizer, ids, stop_ids, sampling.stop_strings)


class Detokenizer:
    """The new text of one request, chunk by chunk: only what is final is handed out (an
    incomplete UTF-8 tail and any tail that could begin a stop string wait), so the deltas
    concatenate to final_text()."""

    def __init__(self, tokenizer, sampling: Sampling, stop_ids):
        self.tok, self.sampling, self.stop_ids = tokenizer, sampling, stop_ids
        self.ids: list[int] = []
        self.sent = ""

    def push(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        ids = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
        text = self.tok.decode(ids)
        stops = self.sampling.stop_strings
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        else:
            hold = len(text) - len(text.rstrip("\ufffd"))
            for s in stops:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = text[: len(text) - hold]
        return self._delta(text)

    def finish(self) -> str:
        return self._delta(final_text(self.tok, self.ids, self.sampling, self.stop_ids))

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        out, self.sent = text[len(self.sent):], text
        return out


FinishReason = Literal["stop", "length"]
