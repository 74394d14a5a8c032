"""`jaxformer chat` and the streamed text of `jaxformer generate --stream`.

TextStream turns one row's token chunks into text as it becomes final; chat renders the
conversation with the tokenizer's chat template (a Jinja template, as Hugging Face's
tokenizer_config.json carries it) and streams each reply.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jinja2
import jinja2.sandbox

# A plain transcript for tokenizers without a template (the demo model's byte tokenizer).
TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


class TextStream:
    """The new text of one generated row, chunk by chunk.

    Each push decodes every token so far (a token's text can depend on its neighbours) and
    hands out only what is final: an incomplete UTF-8 tail (U+FFFD) and any tail that could
    begin a stop string wait for the next chunk, and a stop string ends the row there, as
    generate's final text is cut."""

    def __init__(self, tokenizer, stop_strings=()):
        self.tok, self.stops = tokenizer, tuple(stop_strings)
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def push(self, new_ids) -> str:
        if self.done or not new_ids:
            return ""
        self.ids += list(new_ids)
        return self._emit(self.tok.decode(self.ids), final=False)

    def finish(self, final_text: str) -> str:
        """The rest of the row, given generate's final text (stop strings already cut)."""
        if self.done or not final_text.startswith(self.sent):
            return ""
        self.done = True
        out = final_text[len(self.sent):]
        self.sent = final_text
        return out

    def _emit(self, text: str, final: bool) -> str:
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, self.done = text[:cut], True
        elif not final:
            text = text[: len(text) - self._hold(text)]
        out = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += out
        return out

    def _hold(self, text: str) -> int:
        """How many trailing characters may still change or start a stop string."""
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold


# ---- chat templates ---------------------------------------------------------------------------
def _template_from_config(data) -> str | None:
    t = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def find_template(model, checkpoint: Path | None, template_file: str | None) -> str | None:
    """The chat template: --chat-template (a Jinja file, or a tokenizer_config.json), then the
    tokenizer's own (`chat_template`), then the checkpoint's tokenizer files; None if none."""
    if template_file:
        path = Path(template_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {template_file}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        if path.suffix == ".json":
            try:
                text = _template_from_config(json.loads(text))
            except ValueError as e:
                raise ValueError(f"--chat-template {template_file}: not valid JSON: {e}") \
                    from None
            if text is None:
                raise ValueError(f"--chat-template {template_file}: no chat_template in it")
        return text
    own = getattr(model.tokenizer, "chat_template", None)
    if isinstance(own, str):
        return own
    if checkpoint is not None:
        for d in (checkpoint / "tokenizer", checkpoint):
            if (d / "chat_template.jinja").is_file():
                return (d / "chat_template.jinja").read_text(encoding="utf-8")
            cfg = d / "tokenizer_config.json"
            if cfg.is_file():
                try:
                    t = _template_from_config(json.loads(cfg.read_text(encoding="utf-8")))
                except ValueError:
                    t = None
                if t:
                    return t
    return None


def _raise(message):
    raise ValueError(f"chat template: {message}")


def compile_template(source: str) -> jinja2.Template:
    """A template rendered as transformers renders chat templates: sandboxed, trim_blocks,
    lstrip_blocks, with raise_exception."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not parse: {e}") from None


def render(template: jinja2.Template, messages, tokenizer) -> str:
    def token(i):
        return tokenizer.id_to_token(i) if i is not None else ""
    try:
        return template.render(messages=messages, add_generation_prompt=True,
                               bos_token=token(tokenizer.bos_id),
                               eos_token=token(tokenizer.eos_id))
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None


def encode(tokenizer, text: str) -> list[int]:
    """The rendered conversation as ids. A leading bos token string becomes the bos id: a
    sentencepiece tokenizer would otherwise spell `<s>` out as text."""
    bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    if bos and text.startswith(bos):
        return [tokenizer.bos_id, *tokenizer.encode(text[len(bos):])]
    return tokenizer.encode(text)


# ---- the chat loop ----------------------------------------------------------------------------
def chat(model, sampling, args, checkpoint: Path | None, stdin=None, out=None) -> int:
    """Read user lines from stdin until EOF or /exit; stream each reply to out."""
    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out
    tok = model.tokenizer
    if tok is None:
        raise ValueError("chat needs a tokenizer; this checkpoint has none")
    source = find_template(model, checkpoint, args.chat_template)
    if source is None:
        print("# no chat template in this model's tokenizer: using a plain User:/Assistant: "
              "transcript", file=sys.stderr)
        source = TRANSCRIPT_TEMPLATE
    template = compile_template(source)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = stdin.isatty()
    if interactive:
        print("# type a message; /exit or Ctrl-D quits", file=sys.stderr)
    limit = model.config.max_position_embeddings
    turn = 0
    while True:
        if interactive:
            out.write(">>> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\r\n")})
        ids = encode(tok, render(template, system + history, tok))
        while len(ids) + args.max_new_tokens > limit and len(history) > 1:
            history = history[2:]  # forget the oldest exchange to fit the context
            ids = encode(tok, render(template, system + history, tok))
        if len(ids) + args.max_new_tokens > limit:
            print(f"jaxformer chat: error: the message is {len(ids)} tokens with the "
                  f"template; with --max-new-tokens {args.max_new_tokens} that exceeds the "
                  f"context of {limit}", file=sys.stderr)
            history.pop()
            continue
        reply = _stream_reply(model, ids, sampling, args, turn, out)
        history.append({"role": "assistant", "content": reply})
        turn += 1
    if interactive:
        out.write("\n")
    return 0


def _stream_reply(model, ids, sampling, args, turn: int, out) -> str:
    import jaxformer as jf
    stream = TextStream(model.tokenizer, sampling.stop_strings)
    for item in model.generate([ids], args.max_new_tokens, sampling, args.seed + turn,
                               stream=True):
        if isinstance(item, jf.GenerateOutput):
            out.write(stream.finish(item.texts[0]) + "\n")
            out.flush()
            return item.texts[0]
        out.write(stream.push(item[0]))
        out.flush()
    return stream.sent
