"""Cluster access: ``ray job submit`` to a local head started with token authentication (``RAY_AUTH_MODE=token``)
is refused without the token or with a wrong one, and accepted with it; the accepted job runs on that head.
The README's "Cluster access" section describes the same setup."""

from __future__ import annotations

import uuid

import pytest

from tests._ray_cluster import RayHead

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
