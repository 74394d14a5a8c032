"""PLACEHOLDER, to be replaced at merge by the real jaxformer/hub.py (model names, Hugging Face
ids and their conversion cache). This stand-in keeps `jaxformer generate/chat --model` working
on the `cli` branch: it accepts existing jaxformer checkpoint directories only."""
from __future__ import annotations

from pathlib import Path


def resolve(name_or_path: str) -> Path:
    """A jaxformer checkpoint directory for `name_or_path` (here: an existing one only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and (path / "params").is_dir():
        return path
    raise ValueError(f"unknown model {name_or_path!r}: this build resolves only existing "
                     f"jaxformer checkpoint directories")
