"""Helpers of the server tests: an app served by uvicorn on a thread (loopback, an ephemeral
port), stopped when the block ends; bounded waits."""
import threading
import time

import httpx
import uvicorn


class ServerThread:
    """`with ServerThread(app) as s:` serves app at s.url until the block ends."""

    def __init__(self, app, start_timeout: float = 120.0, wait_models: bool = True):
        self.app, self.start_timeout, self.wait_models = app, start_timeout, wait_models
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if self.wait_models:
            wait_ready(self.url, self.start_timeout)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server thread did not stop"


def wait_ready(url: str, timeout: float, failed=lambda: None) -> None:
    """Poll /health until 200 (the models loaded), at most `timeout` seconds; failed():
    a message when waiting is pointless (a server process ended), raised at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        why = failed()
        if why:
            raise RuntimeError(f"{url} not ready: {why}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout} s")
        time.sleep(0.1)


def metric(url: str, name: str, **labels) -> float:
    """One sample of /metrics (0.0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
