"""Where compiled programs are kept: per model in memory (Compiled, Model.compiled), and
across processes on disk (JAX's persistent compilation cache, enable_compilation_cache)."""
from __future__ import annotations

import os
from pathlib import Path

import jax


class Compiled:
    """A model's compiled functions, keyed by a tuple that names the function and every
    static value that changes its program (sampling features, shapes, cache length); built
    on first use, never evicted (steady-state serving reuses a fixed set)."""

    def __init__(self):
        self._fns: dict[tuple, object] = {}

    def get(self, key: tuple, factory):
        if key not in self._fns:
            self._fns[key] = factory()
        return self._fns[key]

    def put(self, key: tuple, value) -> None:
        self._fns[key] = value

    def __contains__(self, key: tuple) -> bool:
        return key in self._fns

    def __len__(self) -> int:
        return len(self._fns)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str:
    """Turn on JAX's persistent compilation cache, so a restarted process loads its compiled
    prefill and decode programs instead of compiling them again.

    path: default $JAXFORMER_CACHE_DIR, else a directory already configured in JAX (left
    as it is), else ~/.cache/jaxformer/jax. Returns the directory. Every program that took
    at least a second to compile is stored.
    """
    configured = jax.config.jax_compilation_cache_dir
    if path is None and not os.environ.get("JAXFORMER_CACHE_DIR") and configured:
        return configured
    path = Path(path or os.environ.get("JAXFORMER_CACHE_DIR")
                or Path.home() / ".cache" / "jaxformer" / "jax").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    if configured and configured != str(path):
        try:  # JAX opens its cache once per process: let it open the new directory
            from jax.experimental.compilation_cache import compilation_cache
            compilation_cache.reset_cache()
        except (ImportError, AttributeError):  # pragma: no cover - older layouts
            pass
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)
