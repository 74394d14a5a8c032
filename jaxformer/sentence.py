"""How a sentence-embedding model turns hidden states into one vector per text.

sentence-transformers keeps this beside the Hugging Face files: `modules.json` lists the
modules (Transformer, Pooling, optionally Normalize), `1_Pooling/config.json` the pooling
mode and `sentence_bert_config.json` the longest input (`max_seq_length`). The converter
(conversion/hf.py) reads them with `from_sentence_transformers` and the checkpoint keeps the
result as `sentence.json` (jaxformer/checkpoint.py); `Model.embed` applies it, its arguments
overriding.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

POOLINGS = ("mean", "cls")
FILE = "sentence.json"
# sentence-transformers' Pooling config keys -> our modes; the others (max, mean of sqrt
# length, weighted mean, last token) are refused rather than silently approximated
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """pooling: "mean" (over a text's tokens) or "cls" (its first token); normalize: unit
    L2 norm; max_length: tokens a text is cut to ([CLS] and [SEP] included; None: the
    model's positions)."""
    pooling: str = "mean"
    normalize: bool = False
    max_length: int | None = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"SentenceConfig.pooling: must be one of {POOLINGS}, "
                             f"got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"SentenceConfig.normalize: must be a bool, got "
                             f"{self.normalize!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not
                                            isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise ValueError(f"SentenceConfig.max_length: must be an int >= 2 or None, got "
                             f"{self.max_length!r}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SentenceConfig":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a sentence config: {e}") from None


def from_sentence_transformers(directory: str | Path) -> SentenceConfig | None:
    """The SentenceConfig of a sentence-transformers model directory, or None when it has
    no modules.json (a plain Hugging Face model). Raises ValueError naming the file for a
    pooling mode this package does not run."""
    directory = Path(directory)
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{modules_file}: unreadable sentence-transformers modules: {e}") \
            from None
    if "Pooling" not in kinds:
        return None
    pool_file = directory / kinds["Pooling"] / "config.json"
    try:
        pool = json.loads(pool_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{pool_file}: unreadable pooling config: {e}") from None
    on = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v]
    bad = [k for k in on if k in _UNSUPPORTED or k not in _MODES]
    if bad or len(on) != 1:
        raise ValueError(f"{pool_file}: pooling {on or 'none'} is not supported; one of "
                         f"{sorted(_MODES)} must be on, alone")
    max_length = None
    st_file = directory / "sentence_bert_config.json"
    if st_file.is_file():
        try:
            max_length = json.loads(st_file.read_text()).get("max_seq_length")
        except ValueError as e:
            raise ValueError(f"{st_file}: {e}") from None
    return SentenceConfig(pooling=_MODES[on[0]], normalize="Normalize" in kinds,
                          max_length=max_length)
