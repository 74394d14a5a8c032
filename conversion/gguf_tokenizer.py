"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face `tokenizers` pipeline.

A GGUF carries no tokenizer.json: llama.cpp keeps the vocabulary (`tokenizer.ggml.tokens`),
the BPE merges, each token's type (normal, control, user-defined, ...), the special ids, the
name of the pre-tokenizer its merges were learned with (`tokenizer.ggml.pre`) and the chat
template. This module turns those into a `tokenizers.Tokenizer`: a byte-level BPE with the
pre-tokenizer llama.cpp runs for that name (llama-vocab.cpp), or a SentencePiece-style BPE
(byte fallback, U+2581 spaces; merges from the scores when the file has none), wrapped in
jaxformer's HFJsonTokenizer so the checkpoint saves it as tokenizer.json +
tokenizer_config.json.
"""
from __future__ import annotations

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers)

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
    if kind not in BUILDERS:
        raise ValueError(f"{src.path}: tokenizer.ggml.model = {kind!r} is not supported; "
                         f"supported: {sorted(BUILDERS)}")
    tok = BUILDERS[kind](src, tokens)
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


def _vocab(tokens) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated placeholder keeps its first id
    return vocab


def byte_level_bpe(src, tokens) -> Tokenizer:
    """`gpt2`: byte-level BPE from the file's merges and its pre-tokenizer."""
    pre = src.field("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{src.path}: tokenizer.ggml.pre = {pre!r} is not supported; "
                         f"supported: {sorted(PRE_TOKENIZERS)}")
    merges = src.field("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{src.path}: tokenizer.ggml.merges is missing (a 'gpt2' "
                         f"vocabulary needs its merges)")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=pairs, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


def merges_from_scores(tokens, scores) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a token into two vocabulary pieces, ranked
    by the merged token's score (llama.cpp's SPM tokenizer merges the best-scoring pair
    first), ties by piece lengths then ids."""
    vocab = _vocab(tokens)
    found = []
    for token, score in zip(tokens, scores):
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                found.append((-score, len(left), len(right), vocab[left], vocab[right],
                              left, right))
    return [(f[-2], f[-1]) for f in sorted(found, key=lambda f: f[:5])]


def sentencepiece_bpe(src, tokens) -> Tokenizer:
    """`llama`: a SentencePiece BPE vocabulary (LLaMA 1/2, Mistral): U+2581 for spaces,
    bytes <0xNN> for characters outside the vocabulary, and, as llama.cpp does, a space
    before the text and after every special token (`tokenizer.ggml.add_space_prefix`,
    default true). That space is a normaliser step, not Metaspace's prepend, because
    Metaspace skips text that already starts with a space, which sentencepiece does not."""
    merges = src.field("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = src.field("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError(f"{src.path}: tokenizer.ggml.scores is missing (a 'llama' "
                             f"vocabulary without merges needs its scores)")
        pairs = merges_from_scores(tokens, scores)
    tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=pairs, fuse_unk=True,
                               byte_fallback=True))
    prefix = bool(src.field("tokenizer.ggml.add_space_prefix", True))
    space = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else [])
                                          + space)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


BUILDERS = {"gpt2": byte_level_bpe, "llama": sentencepiece_bpe}
