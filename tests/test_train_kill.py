"""Training killed for real (SIGKILL), then run again: the resumed run ends on exactly the weights of an
uninterrupted one (fp32), whether the kill lands between saves or inside a checkpoint save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glip import checkpoint
from jobs import train as train_job
from jobs.world import WorldOptions, generate_world

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# The tiny preset at small inputs (a step in about a second on 2 cores), no random drops.
SMALL = ["input.min_size=96", "input.max_size=128", "input.train_min_sizes=(96,)", "text.pad_to_max=False",
         "fpn.drop_block_prob=0.0", "swin.drop_path_rate=0.0"]  # fmt: skip

# A child that runs the train job and SIGKILLs itself inside its second save (step 2 of 4, a save every step),
# at one of two points: ``staged``, the save's files written (``torch.save`` of the state returned) and nothing
# moved into place yet; ``moving``, the first of the staged files moved into the run folder, the second not.
KILL_INSIDE_SAVE = r"""
import os, signal, sys, torch
point, argv = sys.argv[1], sys.argv[2:]
saves, moves = [], []
save, replace = torch.save, os.replace

def killing_save(obj, path, *args, **kwargs):
    save(obj, path, *args, **kwargs)
    if ".saving" in str(path):
        saves.append(path)
        if point == "staged" and len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

def killing_replace(source, target, *args, **kwargs):
    if ".saving" in str(source) and len(saves) == 2:
        moves.append(source)
        if point == "moving" and len(moves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(source, target, *args, **kwargs)

torch.save, os.replace = killing_save, killing_replace
from jobs import train
sys.exit(train.main(argv))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(WorldOptions(out=str(out), long_tail=False, seed=3, train_images=4, eval_images=1,
                                crawl_images=2, leaks=0, dead_urls=0, image_size=(96, 128),
                                object_size=(24, 48), objects_per_image=(1, 2)))  # fmt: skip
    return out


def _argv(world: Path, run: Path) -> list[str]:
    """The train job's arguments: the tiny preset at SMALL sizes, fp32, a save every step."""
    return ["--preset", "tiny", "--out", str(run), "--steps", str(STEPS), "--batch-size", "2",
            "--detection", f"{world}/annotations/train_coco.json:{world}/images/train",
            "--set", "train.checkpoint_every=1", "--set", "train.log_every=1", "--set", "train.num_workers=0",
            "--set", "train.amp=false", *(f"--set=model.{item}" for item in SMALL)]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final weights of the same job run once without a kill (in this process: same code, same threads)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train_job.main(_argv(world, run)) == 0
    return checkpoint.load(run / "checkpoint")[0].state_dict()


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _assert_same_weights(run: Path, expected: dict[str, torch.Tensor]) -> None:
    got = checkpoint.load(run / "checkpoint")[0].state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=0.0, msg=name)


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _saved_step(run: Path) -> int:
    return int(torch.load(run / "train_state.pt", weights_only=True)["step"])


def test_training_killed_with_sigkill_resumes_to_the_same_weights(world, uninterrupted, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "jobs.train", *_argv(world, run)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, cwd=REPO, env=_environment(), **quiet)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "train_state.pt").exists():
        assert process.poll() is None, "the job ended before its first save"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _saved_step(run)
    logged_before = len(_logged_steps(run))
    assert 1 <= killed_at < STEPS
    subprocess.run(command, cwd=REPO, env=_environment(), check=True, timeout=600, **quiet)
    assert _saved_step(run) == STEPS
    # The resumed run starts at the saved step: nothing saved is trained again, nothing skipped.
    assert _logged_steps(run)[logged_before:] == list(range(killed_at + 1, STEPS + 1))
    _assert_same_weights(run, uninterrupted)


@pytest.mark.slow  # two more killed and resumed jobs (about a minute each on 2 cores)
@pytest.mark.parametrize(("point", "resumes_from"), [("staged", 1), ("moving", 2)])
def test_training_killed_inside_a_checkpoint_save_resumes_to_the_same_weights(
    world, uninterrupted, tmp_path, point, resumes_from
):
    """Killed with the save's files written but not moved (the previous save stands; the partial folder is
    ignored), or half-way through moving them (the save was complete: it is finished and resumed from)."""
    run = tmp_path / "run"
    argv = _argv(world, run)
    killed = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, point, *argv], cwd=REPO, env=_environment(),
                            capture_output=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (run / ".saving").is_dir(), "the kill must land inside the save"
    logged_before = len(_logged_steps(run))
    assert logged_before == 2
    subprocess.run([sys.executable, "-m", "jobs.train", *argv], cwd=REPO, env=_environment(), check=True,
                   timeout=600, capture_output=True)  # fmt: skip
    assert _logged_steps(run)[logged_before:] == list(range(resumes_from + 1, STEPS + 1))
    assert _saved_step(run) == STEPS and not (run / ".saving").exists()
    _assert_same_weights(run, uninterrupted)
