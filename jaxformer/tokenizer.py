"""Tokenizers: text in, token ids out, through sentencepiece and Hugging Face `tokenizers`.

Every kind answers one small interface (`Tokenizer`) and can `save` its files into a
directory, so a checkpoint carries its tokenizer and `load_tokenizer` finds it again.
`encode` never adds special tokens unless asked (`add_bos`); `decode` drops them by default.
"""

from __future__ import annotations

import abc
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxformer import chat_template as chat

BYTE_MARKER = "byte_tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves it
_SPECIAL_KEYS = ("bos", "eos", "pad")
# Detection order of load_tokenizer: the explicit marker first, then tokenizer.json because it
# holds the whole pipeline (normalizer, added tokens) where a sibling tokenizer.model may not.
_LOOKED_FOR = (BYTE_MARKER, "tokenizer.json", "tokenizer.model", "vocab.json + merges.txt", "vocab.txt")


class Tokenizer(abc.ABC):
    """Common interface: `encode`, `decode`, `batch_encode`, `save`, special-token ids."""

    kind = "base"

    def __init__(self) -> None:
        self._special: dict[str, int | None] = {k: None for k in _SPECIAL_KEYS}
        # the model's Jinja chat template (tokenizer_config.json's "chat_template"), if any
        self.chat_template: str | None = None

    # -- what each kind implements
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> None: ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str: ...

    # -- shared behaviour
    @property
    def name(self) -> str:
        return self.kind

    @property
    def bos_id(self) -> int | None:
        return self._special["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._special["eos"]

    @property
    def pad_id(self) -> int | None:
        return self._special["pad"]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in self._special.values() if i is not None)

    def set_special_tokens(self, **tokens: str | None) -> None:
        """Point bos/eos/pad at tokens by their text, e.g. set_special_tokens(eos="</s>")."""
        for key, token in tokens.items():
            if key not in _SPECIAL_KEYS:
                raise ValueError(f"unknown special token {key!r}; expected one of {_SPECIAL_KEYS}")
            if token is None:
                continue
            i = self.token_to_id(token)
            if i is None:
                # HF configs sometimes name tokens that were only added at fine-tune time; the
                # model's embedding does not know them, so keep the tokenizer's own default.
                warnings.warn(f"{self.name} tokenizer: {key} token {token!r} is not in the vocabulary; ignored")
            else:
                self._special[key] = i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> ids, without special tokens unless add_bos."""
        ids = self._encode(text)
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.name} tokenizer has no bos token")
            ids = [self.bos_id, *ids]
        return ids

    def batch_encode(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """[text] -> [ids]; ragged, no padding (generation buckets lengths itself)."""
        return [self.encode(t, add_bos=add_bos) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """ids [T] (list, numpy or jax array) -> text; bos/eos/pad are dropped by default."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"decode takes one sequence of ids, got shape {arr.shape}")
        ids = arr.astype(np.int64).tolist()
        if any(i < 0 for i in ids):
            raise ValueError(f"negative token ids in {ids[:16]}: strip padding before decoding")
        # Ids past the tokenizer's vocabulary are rows of a padded embedding (many checkpoints
        # round vocab_size up) and carry no text; dropping them, as `tokenizers` does, beats
        # failing a whole generate() call that sampled one.
        ids = [i for i in ids if i < self.vocab_size and not (skip_special_tokens and i in self.special_ids)]
        return self._decode(ids, skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs) -> list[int] | str:
        """Chat messages [{"role", "content"}] -> prompt ids (or text with tokenize=False).

        Renders the model's chat template as transformers' `apply_chat_template` does
        (jaxformer.chat_template: sandboxed Jinja, bos_token / eos_token / pad_token defined,
        kwargs passed to the template) and encodes the text without adding special tokens,
        since the template writes them itself. add_generation_prompt: end with the header of
        the assistant's turn, so the model answers.
        """
        if not self.chat_template:
            raise ValueError(f"{self.name} tokenizer has no chat_template (a checkpoint gets "
                             f"one from its tokenizer_config.json or GGUF)")
        special = {f"{k}_token": self.id_to_token(i) for k, i in self._special.items()
                   if i is not None}
        text = chat.render(self.chat_template, messages,
                           add_generation_prompt=add_generation_prompt, special_tokens=special,
                           **kwargs)
        return self.encode(text) if tokenize else text

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer files plus a tokenizer_config.json into directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._save_files(d)
        config = {f"{k}_token": self.id_to_token(i) for k, i in self._special.items() if i is not None}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        config.update(self._extra_config())
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
        return d

    def _extra_config(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then eos=256, bos=257, pad=258; needs no files."""

    kind = "byte"
    EOS, BOS, PAD = 256, 257, 258
    _NAMES = {EOS: "<eos>", BOS: "<bos>", PAD: "<pad>"}

    def __init__(self) -> None:
        super().__init__()
        self._special.update(bos=self.BOS, eos=self.EOS, pad=self.PAD)

    @property
    def vocab_size(self) -> int:
        return 259

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Bytes are gathered in runs so a multi-byte character split by a special id still
        # decodes; errors="replace" because an untrained model emits arbitrary byte soup.
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(self._NAMES[i])
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return {v: k for k, v in self._NAMES.items()}.get(token)

    def id_to_token(self, i: int) -> str:
        return self._NAMES.get(i) or bytes([i]).decode("latin-1")

    def _save_files(self, directory: Path) -> None:
        marker = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.EOS,
                  "bos_id": self.BOS, "pad_id": self.PAD}
        (directory / BYTE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (LLaMA, T5, ...)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        super().__init__()
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        # sentencepiece reports a disabled special token as -1.
        for key, i in (("bos", self._sp.bos_id()), ("eos", self._sp.eos_id()), ("pad", self._sp.pad_id())):
            self._special[key] = i if i >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces rather than failing.
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def _save_files(self, directory: Path) -> None:
        # The serialized proto, not a file copy: the source may be the very file we write.
        (directory / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())


class _HFTokenizer(Tokenizer):
    """Shared plumbing for kinds built on a `tokenizers.Tokenizer` (self._tok)."""

    _files: dict[str, bytes]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def encode_for_model(self, text: str, text_pair: str | None = None,
                         max_length: int | None = None) -> tuple[list[int], list[int]]:
        """The model's input with its special tokens (BERT: [CLS] text [SEP] (text_pair
        [SEP])) -> (ids [T], token_type_ids [T]). max_length: a single text's words are cut
        so that T <= max_length, the special tokens kept (transformers' truncation=True);
        the tokenizer itself is left as it is, so threads may share it."""
        if max_length is None or text_pair is not None:
            enc = self._tok.encode(text, text_pair, add_special_tokens=True)
            return enc.ids, enc.type_ids
        enc = self._tok.encode(text, add_special_tokens=False)
        room = max_length - self._tok.num_special_tokens_to_add(False)
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for words beside the "
                             f"special tokens")
        if len(enc.ids) > room:
            enc.truncate(room)
        enc = self._tok.post_process(enc, add_special_tokens=True)
        return enc.ids, enc.type_ids

    def _save_files(self, directory: Path) -> None:
        # Original bytes kept in memory: exact copies, and safe when saving onto the source.
        for name, data in self._files.items():
            (directory / name).write_bytes(data)


class GPT2BPETokenizer(_HFTokenizer):
    """GPT-2 byte-level BPE from `vocab.json` + `merges.txt`, ids equal to transformers' GPT2Tokenizer."""

    kind = "gpt2_bpe"
    ENDOFTEXT = "<|endoftext|>"

    def __init__(self, vocab_file: str | Path, merges_file: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers

        super().__init__()
        self._files = {"vocab.json": Path(vocab_file).read_bytes(), "merges.txt": Path(merges_file).read_bytes()}
        # The same BPE settings transformers' GPT2Tokenizer uses.
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file), dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        self._tok = _Tok(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        eot = self._tok.token_to_id(self.ENDOFTEXT)
        if eot is not None:
            # Special, as in transformers: "<|endoftext|>" in text becomes one id, not 7 pieces.
            self._tok.add_special_tokens([self.ENDOFTEXT])
            self._special.update(bos=eot, eos=eot)


class WordPieceTokenizer(_HFTokenizer):
    """BERT WordPiece from `vocab.txt`, ids equal to transformers' BertTokenizer."""

    kind = "wordpiece"

    def __init__(self, vocab_file: str | Path, lowercase: bool = True) -> None:
        from tokenizers.implementations import BertWordPieceTokenizer

        super().__init__()
        self.lowercase = lowercase
        self._files = {"vocab.txt": Path(vocab_file).read_bytes()}
        # strip_accents=None follows lowercase, as in the original BERT and in transformers.
        self._tok = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase, strip_accents=None)
        self.cls_id = self._tok.token_to_id("[CLS]")
        self.sep_id = self._tok.token_to_id("[SEP]")
        self.mask_id = self._tok.token_to_id("[MASK]")
        self._special.update(bos=self.cls_id, eos=self.sep_id, pad=self._tok.token_to_id("[PAD]"))

    encode_pair = _HFTokenizer.encode_for_model

    def _extra_config(self) -> dict:
        return {"do_lower_case": self.lowercase}


class HFJsonTokenizer(_HFTokenizer):
    """Any Hugging Face `tokenizer.json` (the whole pipeline lives in the file)."""

    kind = "hf_json"
    # Used only when no tokenizer_config.json says otherwise; first match wins.
    _GUESS = {
        "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
        "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
        "pad": ("<pad>", "[PAD]", "<|pad|>"),
    }

    def __init__(self, json_file: str | Path | None = None, *, text: str | None = None) -> None:
        """From a tokenizer.json file, or its `text` (exactly one of the two)."""
        from tokenizers import Tokenizer as _Tok

        super().__init__()
        if (json_file is None) == (text is None):
            raise ValueError("HFJsonTokenizer: give json_file or text, not both or neither")
        text = Path(json_file).read_text("utf-8") if text is None else text
        self._files = {"tokenizer.json": text.encode("utf-8")}
        self._tok = _Tok.from_str(text)
        # a tokenizer.json may carry the padding/truncation of its training pipeline; text in,
        # text out must not pad or cut (the model's limits are checked where ids are used)
        self._tok.no_padding()
        self._tok.no_truncation()
        for key, candidates in self._GUESS.items():
            self._special[key] = next((i for t in candidates if (i := self._tok.token_to_id(t)) is not None), None)

    @classmethod
    def from_tokenizer(cls, tok) -> "HFJsonTokenizer":
        """Wrap a `tokenizers.Tokenizer` built in memory (e.g. from a GGUF's vocabulary)."""
        return cls(text=tok.to_str())


def _chat_template(directory: Path, config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list
    of named templates of which "default" is the one apply_chat_template uses)."""
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text("utf-8")
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _read_special_tokens(directory: Path) -> tuple[dict[str, str], dict]:
    """bos/eos/pad token texts from HF-style configs; special_tokens_map.json wins, as in HF."""
    tokens: dict[str, str] = {}
    config: dict = {}
    for fname in (CONFIG_FILE, SPECIAL_MAP_FILE):
        path = directory / fname
        if not path.is_file():
            continue
        data = json.loads(path.read_text("utf-8"))
        if fname == CONFIG_FILE:
            config = data
        for key in _SPECIAL_KEYS:
            value = data.get(f"{key}_token")
            if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
                value = value.get("content")
            if isinstance(value, str):
                tokens[key] = value
    return tokens, config


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Build the right Tokenizer from a directory (or one tokenizer file) by the files present.

    tokenizer_config.json / special_tokens_map.json beside the files, when present, choose
    bos/eos/pad (and do_lower_case for WordPiece), as they do in Hugging Face.
    """
    path = Path(path)
    if path.is_file():
        directory, name = path.parent, path.name
        if name.endswith(".model"):
            found = "tokenizer.model"
        elif name in ("vocab.json", "merges.txt"):
            found = "vocab.json + merges.txt"
        elif name in (BYTE_MARKER, "tokenizer.json", "vocab.txt"):
            found = name
        else:
            raise ValueError(f"{path} is not a tokenizer file this loader knows; expected one of "
                             f"{', '.join(_LOOKED_FOR)}")
        if not _present(directory, found.replace("tokenizer.model", name)):
            raise FileNotFoundError(f"{path} needs its sibling files: {found}")
    elif path.is_dir():
        directory, name = path, None
        # A checkpoint may keep its tokenizer in a subdirectory.
        if not any(_present(directory, n) for n in _LOOKED_FOR) and (path / "tokenizer").is_dir():
            directory = path / "tokenizer"
        found = next((n for n in _LOOKED_FOR if _present(directory, n)), None)
        if found is None:
            raise FileNotFoundError(f"no tokenizer files in {path}; looked for {', '.join(_LOOKED_FOR)}")
    else:
        raise FileNotFoundError(f"tokenizer path {path} does not exist")

    if found == BYTE_MARKER:
        return ByteTokenizer()  # its special ids are fixed; configs do not apply
    tokens, config = _read_special_tokens(directory)
    if found == "tokenizer.json":
        tok: Tokenizer = HFJsonTokenizer(directory / found)
    elif found == "tokenizer.model":
        tok = SentencePieceTokenizer(directory / (name or found))
    elif found == "vocab.txt":
        tok = WordPieceTokenizer(directory / found, lowercase=bool(config.get("do_lower_case", True)))
    else:
        tok = GPT2BPETokenizer(directory / "vocab.json", directory / "merges.txt")
    tok.set_special_tokens(**tokens)
    tok.chat_template = _chat_template(directory, config)
    return tok


def _present(directory: Path, entry: str) -> bool:
    return all((directory / n).is_file() for n in entry.split(" + "))
