"""The one exception the Megatron converter raises for bad input."""
from __future__ import annotations


class MegatronConversionError(ValueError):
    """A Megatron checkpoint cannot be converted: missing or truncated rank file, shapes that
    disagree across ranks, unknown keys, an unsupported version or feature. The message names
    the file (and key) at fault."""


def fail(msg: str, file=None, key: str | None = None) -> MegatronConversionError:
    where = ""
    if file is not None:
        where += f"{file}"
    if key is not None:
        where += f" [{key}]" if where else f"[{key}]"
    return MegatronConversionError(f"{where}: {msg}" if where else msg)
