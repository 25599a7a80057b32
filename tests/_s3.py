"""An S3 endpoint for tests: moto's standalone server on 127.0.0.1, reached through s3fs like real S3.

``s3_server`` (module scope) starts ``python -m moto.server`` in its own process group and yields an
``S3Endpoint``: the URL, fsspec ``storage_options`` for s3fs, the ``AWS_*`` environment a subprocess needs
(s3fs / botocore read ``AWS_ENDPOINT_URL``), and ``bucket()`` to create a fresh bucket. Credentials are dummies
that moto accepts; nothing leaves this machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pytest

from tests._ray_cluster import free_port

DUMMY_KEY = "testing"


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def filesystem(self) -> fsspec.AbstractFileSystem:
        # No instance cache: another test's s3fs instance may point at an endpoint that is gone.
        return fsspec.filesystem("s3", skip_instance_cache=True, **self.storage_options)

    def bucket(self) -> str:
        """A new empty bucket; returns its name."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Endpoint]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        _wait_http(url, timeout_s=60)
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": DUMMY_KEY, "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        options = {"endpoint_url": url, "key": DUMMY_KEY, "secret": DUMMY_KEY}
        yield S3Endpoint(url, options, env)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
