"""Progress bars (tqdm) for loading and long generations; quiet by default.

Bars are drawn on stderr only when the `jaxformer` logger is enabled for INFO, e.g.

    import logging
    logging.basicConfig(level=logging.INFO)          # or
    logging.getLogger("jaxformer").setLevel(logging.INFO)

(`jaxformer -v ...` does this) or when a call passes progress=True. Everything else the
package reports goes through the standard library logger `jaxformer.<module>`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

LOGGER = "jaxformer"
MIN_GENERATE_TOKENS = 64  # generations at least this long get a bar


def enabled(progress: bool | None = None) -> bool:
    """progress=True/False forces bars on/off; None follows the `jaxformer` logger (INFO)."""
    if progress is not None:
        return bool(progress)
    return logging.getLogger(LOGGER).isEnabledFor(logging.INFO)


def bar(total: int | None, desc: str, unit: str = "it", progress: bool | None = None):
    """A tqdm bar (a no-op object with update()/close() when disabled or tqdm is missing)."""
    if enabled(progress):
        try:
            from tqdm import tqdm  # plain text bars: no widget warnings in notebooks
            return tqdm(total=total, desc=desc, unit=unit, leave=False)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return _Null()


@contextlib.contextmanager
def spinner(desc: str, progress: bool | None = None):
    """A bar that shows elapsed time while a single long call (a restore) runs."""
    if not enabled(progress):
        yield
        return
    b = bar(None, desc, "s", progress)
    stop = threading.Event()

    def tick():
        t0 = time.perf_counter()
        while not stop.wait(0.5):
            b.n = round(time.perf_counter() - t0, 1)
            b.refresh()

    th = threading.Thread(target=tick, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        b.close()


class _Null:
    n = 0

    def update(self, n=1):
        pass

    def refresh(self):
        pass

    def close(self):
        pass

    def set_postfix_str(self, s):
        pass
