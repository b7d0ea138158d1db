"""serve.py as a real process on 127.0.0.1 for the tests: started on a free port, waited for,
stopped with SIGTERM; every wait is bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import ROOT

START_TIMEOUT = 90  # seconds for imports and the model load on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A running `python serve.py ...`; `url`, a bounded `client`, and `stop()` (SIGTERM)."""

    def __init__(self, *settings: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), *settings, f"SERVE_PORT={self.port}"],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve.py exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve.py did not answer /health within {START_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killed, and the test fails, if it does not stop in time)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(f"serve.py did not stop within {timeout} s of SIGTERM:\n{self.log()}")
        self._log.close()
        return self.process.returncode
