"""Real Ray for tests: an in-process local Ray (fixture ``local_ray``) and a local head started with token
authentication (``RayHead``), which jobs reach with ``ray job submit`` as they would a cluster.

Everything stays on this machine: the head's ports are picked free on 127.0.0.1, its temp dir is private,
and it is stopped by signalling the ``ray start --block`` process this code started (never ``ray stop``,
which stops every Ray on the machine, other test runs' included).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import ray

from pipeline.executor import init_ray

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("GLIP_VENV_BIN", REPO / ".venv" / "bin"))
RAY = str(VENV_BIN / "ray")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """An in-process local Ray with two CPUs for the tests of one module."""
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # the server answers (401 without a token): it is up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with ``RAY_AUTH_MODE=token`` and a generated token.

    ``env`` is what a client needs (token mode, the token, the venv first on PATH, or ``path`` as PATH); the
    head runs with it too. ``address`` is the dashboard URL for ``ray job``. Use as a context manager;
    ``stop()`` is idempotent.
    """

    def __init__(self, num_cpus: int = 2, path: str | None = None) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))  # short: Ray's socket paths are long
        self.env = self._client_env(path)
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.num_cpus = num_cpus
        self.gcs_port: int | None = None  # set by start(): the port a job's driver on this head connects to
        self.process: subprocess.Popen | None = None
        self._log: BinaryIO | None = None

    def _client_env(self, path: str | None) -> dict[str, str]:
        home = self.temp / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}" if path is None else path
        # Ray replaces a loopback node address by the host's interface address unless told it runs alone.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env.pop("RAY_ADDRESS", None)
        token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True,
                               text=True, check=True, timeout=60).stdout.strip()  # fmt: skip
        env["RAY_AUTH_TOKEN"] = token
        return env

    def start(self, timeout_s: float = 120.0) -> RayHead:
        ports = [free_port() for _ in range(6)]
        self.gcs_port = ports[0]
        command = [
            RAY, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
            "--port", str(ports[0]), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(self.dashboard_port), "--include-dashboard", "true", "--num-cpus", str(self.num_cpus),
            "--temp-dir", str(self.temp / "ray"), "--ray-client-server-port", str(ports[1]),
            "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
            "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
        ]  # fmt: skip
        self._log = open(self.temp / "head.log", "wb")  # closed in stop(), with the process
        self.process = subprocess.Popen(command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
        _wait_http(f"{self.address}/api/version", timeout_s)
        return self

    def ray(
        self, *args: str, timeout_s: float = 300.0, with_token: bool = True, token: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run the ``ray`` CLI from the repository, as a client holding the token, one without it
        (``with_token=False``: no token and no token mode), or one holding another ``token``.

        Output goes to files, not pipes, and the command's process group is killed when it returns or times
        out (TimeoutExpired), so a stuck client can never hang the test."""
        env = dict(self.env)
        if not with_token:  # a client that knows nothing of the token: the head must refuse it
            env.pop("RAY_AUTH_TOKEN")
            env.pop("RAY_AUTH_MODE")
            env["HOME"] = str(self.temp / "stranger")  # no ~/.ray/auth_token there
        elif token is not None:  # token mode, but the wrong token
            env["RAY_AUTH_TOKEN"] = token
            env["HOME"] = str(self.temp / "stranger")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen([RAY, *args], env=env, cwd=REPO, stdout=out, stderr=err,
                                       start_new_session=True)  # fmt: skip
            try:
                returncode = process.wait(timeout=timeout_s)
            finally:
                _kill_group(process.pid)
            texts = [_read(handle) for handle in (out, err)]
        return subprocess.CompletedProcess(process.args, returncode, *texts)

    def log(self) -> str:
        path = self.temp / "head.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` drains and stops its processes; the rest of its group is killed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.process is not None:
            _kill_group(self.process.pid)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read(handle: BinaryIO) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")


def _kill_group(pgid: int) -> None:
    """Kill what is left of the process group the head was started in (only processes this code began)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
