"""Cluster access: ``ray job submit`` to a local head started with token authentication (``RAY_AUTH_MODE=token``)
is refused without the token or with a wrong one, and accepted with it; the accepted job runs on that head.
The README's "Cluster access" section describes the same setup; its "On a Ray cluster" submit form (the
entrypoint names the environment's interpreter) is checked from shells whose PATH lacks the venv."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from tests._ray_cluster import REPO, VENV_BIN, RayHead

pytestmark = pytest.mark.timeout(240)  # a stuck head or client fails with a traceback

# The job's driver joins the cluster it was submitted to (``RAY_ADDRESS``, set by the job manager) and says
# which one: its GCS address, and the CPUs the head was started with.
PROBE = (
    "import ray; ray.init(); "
    "print('probe', ray.get_runtime_context().gcs_address, int(ray.cluster_resources()['CPU']))"
)


def _submit(head: RayHead, job_id: str, **client) -> tuple[int, str]:
    result = head.ray(
        "job", "submit", "--address", head.address, "--submission-id", job_id, "--", "python", "-c", PROBE,
        timeout_s=120, **client,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_job_submission_is_refused_without_the_token_and_runs_on_the_head_with_it() -> None:
    ids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("stranger", "wrong", "holder")}
    with RayHead(num_cpus=1) as head:
        code, output = _submit(head, ids["stranger"], with_token=False)
        assert code != 0 and "Unauthorized: Missing authentication token" in output, output[-2000:]
        code, output = _submit(head, ids["wrong"], token="not-the-heads-token")
        assert code != 0 and "Forbidden: Invalid authentication token" in output, output[-2000:]
        code, output = _submit(head, ids["holder"])
        assert code == 0, output[-3000:] + head.log()
        assert f"probe 127.0.0.1:{head.gcs_port} {head.num_cpus}" in output
        listed = head.ray("job", "list", "--address", head.address, timeout_s=60)
        assert listed.returncode == 0
    # Only the token holder's job reached the head.
    assert ids["holder"] in listed.stdout
    assert ids["stranger"] not in listed.stdout and ids["wrong"] not in listed.stdout


# The job's driver and one of its tasks import what the label job needs; each says where ``pipeline`` came from.
IMPORTS = (
    "import fsspec, pipeline, ray; ray.init(); "
    "where = ray.remote(lambda: __import__('fsspec') and __import__('pipeline').__file__); "
    "print('imports', pipeline.__file__, ray.get(where.remote(), timeout=60))"
)


def test_the_readmes_submit_form_runs_from_shells_without_the_venv(tmp_path: Path) -> None:
    """Head and client run with a PATH whose ``python`` lacks the project's dependencies (the base interpreter
    without site-packages, as a system python). The entrypoint runs in a shell on the head with the head's
    PATH: a bare ``python`` fails as a user's did; the environment's interpreter, named (the README's form),
    runs, and the job's driver and task import the code that ``--working-dir`` shipped."""
    system = tmp_path / "bin"
    system.mkdir()
    (system / "python").write_text(f'#!/bin/sh\nexec {Path(sys.base_prefix, "bin", "python3")} -S "$@"\n')
    (system / "python").chmod(0o755)
    with RayHead(num_cpus=1, path=os.pathsep.join([str(system), "/usr/bin", "/bin"])) as head:
        submit = ("job", "submit", "--address", head.address, "--working-dir", str(REPO), "--")
        bare = head.ray(*submit, "python", "-c", IMPORTS, timeout_s=120)
        named = head.ray(*submit, str(VENV_BIN / "python"), "-c", IMPORTS, timeout_s=120)
        shipped = f"{head.temp}/"  # Ray unpacks the working dir under the head's temp dir
    output = bare.stdout + bare.stderr
    assert bare.returncode != 0 and "ModuleNotFoundError: No module named 'fsspec'" in output, output[-2000:]
    output = named.stdout + named.stderr
    assert named.returncode == 0, output[-3000:]
    [line] = [line for line in output.splitlines() if line.startswith("imports ")]
    _, driver, task = line.split()
    assert driver.startswith(shipped) and task.startswith(shipped), line
