"""Chat templates: a model's Jinja template rendered the way transformers renders it.

Templates come from checkpoints (tokenizer_config.json, chat_template.jinja, a GGUF's
tokenizer.chat_template), i.e. from strangers, so they run in Jinja's immutable sandbox,
with the environment transformers gives them (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, a `tojson` that keeps non-ASCII text, `strftime_now`); a template written
for transformers renders to the same text here.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template raised (raise_exception) or does not parse; the message says which."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e} (line {e.lineno})") from None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """[{"role": ..., "content": ...}] as plain dicts; a clear error for anything else."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                         f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' (and 'content'), "
                             f"got {m!r:.80}")
        out.append(dict(m))
    return out


def render(source: str, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = True, special_tokens: Mapping[str, str | None] = (),
           **kwargs) -> str:
    """The prompt text `source` makes of `messages`.

    special_tokens: bos_token, eos_token, ... as the template names them (transformers passes
    the tokenizer's special tokens); kwargs reach the template too (tools, documents, ...).
    """
    template = compile_template(source)
    try:
        return template.render(messages=check_messages(messages),
                               add_generation_prompt=add_generation_prompt,
                               **{k: v for k, v in dict(special_tokens).items() if v is not None},
                               **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
