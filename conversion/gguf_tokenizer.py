"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face `tokenizers` pipeline.

A GGUF carries no tokenizer.json: llama.cpp keeps the vocabulary (`tokenizer.ggml.tokens`),
the BPE merges, each token's type (normal, control, user-defined, ...), the special ids, the
name of the pre-tokenizer its merges were learned with (`tokenizer.ggml.pre`) and the chat
template. This module turns those into a byte-level BPE `tokenizers.Tokenizer` with the
pre-tokenizer llama.cpp runs for that name (llama-vocab.cpp), wrapped in jaxformer's
HFJsonTokenizer so the checkpoint saves it as tokenizer.json + tokenizer_config.json.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxformer.tokenizer import HFJsonTokenizer

# llama.cpp's token types (llama_token_type): control tokens (<|im_start|>) are matched whole
# and are special; user-defined ones (<think>) are matched whole but are ordinary text.
CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():  # llama.cpp: "\p{N}" first, then GPT-2's expression
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


# `tokenizer.ggml.pre` -> pre-tokenizer, as llama.cpp's llama-vocab.cpp groups the names.
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "mpt", "olmo", "jais"), _gpt2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _digits_then_gpt2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx",
                     "pixtral"), lambda: _split(_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"),
                    lambda: _split(_QWEN2_SPLIT)),
}


def tokenizer_from_gguf(src) -> HFJsonTokenizer | None:
    """The tokenizer of a GGUFSource (None when the file holds no vocabulary).

    Raises ValueError naming the field when the file asks for a tokenizer not built here.
    """
    tokens = src.field("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    kind = src.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{src.path}: tokenizer.ggml.model = {kind!r} is not supported; "
                         f"supported: ['gpt2'] (byte-level BPE)")
    pre = src.field("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{src.path}: tokenizer.ggml.pre = {pre!r} is not supported; "
                         f"supported: {sorted(PRE_TOKENIZERS)}")
    merges = src.field("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{src.path}: tokenizer.ggml.merges is missing (a 'gpt2' "
                         f"vocabulary needs its merges)")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated placeholder keeps its first id
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    types = src.field("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    out = HFJsonTokenizer.from_tokenizer(tok)
    special = {}
    for key, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                       ("pad", "padding_token_id")):
        i = src.field(f"tokenizer.ggml.{field}")
        if i is not None and 0 <= int(i) < len(tokens):
            special[key] = tokens[int(i)]
    out.set_special_tokens(**special)
    out.chat_template = src.field("tokenizer.chat_template")
    return out
