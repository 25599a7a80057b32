"""Teachers named by URL (``teacher.fetch``): a copy per node, named so that a rewritten checkpoint is fetched
again, whole or not at all, with the ``teacher_id`` of the same checkpoint read from a local path. ``memory://``
stands for an object store here (fsspec's in-process filesystem, remote by protocol); the label job on an
``s3://`` teacher (moto) is in tests/test_label_job.py."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from jobs import label as label_job
from jobs.export import teacher_folder
from pipeline.layout import Layout
from teacher.fetch import is_remote, local_checkpoint
from teacher.teacher import Teacher, TeacherConfig, teacher_id_of
from tests._crawl import tiny_teacher


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_teacher(tmp_path_factory.mktemp("fetch") / "tiny-teacher")


@pytest.fixture
def remote(checkpoint: Path) -> Iterator[str]:
    """The checkpoint folder uploaded to a fresh ``memory://`` folder; its URL."""
    fs = fsspec.filesystem("memory")
    base = f"/fetch-{uuid.uuid4().hex[:8]}"
    fs.put(str(checkpoint), f"{base}/tiny-teacher", recursive=True)
    yield f"memory://{base}/tiny-teacher"
    fs.rm(base, recursive=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_local_path_is_used_where_it_is(checkpoint: Path, tmp_path: Path) -> None:
    assert not is_remote(str(checkpoint)) and not is_remote(f"file://{checkpoint}") and is_remote("s3://b/m")
    assert local_checkpoint(checkpoint, cache=tmp_path) == checkpoint
    assert local_checkpoint(f"file://{checkpoint}", cache=tmp_path) == checkpoint
    assert not (tmp_path / "checkpoints").exists()


def test_a_url_is_copied_once_and_names_the_same_teacher(
    checkpoint: Path, remote: str, tmp_path: Path
) -> None:
    copy = local_checkpoint(remote, cache=tmp_path)
    assert copy.name == "tiny-teacher" and copy.is_relative_to(tmp_path / "checkpoints")
    assert _files(copy) == _files(checkpoint)
    stamp = (copy / "model.safetensors").stat().st_mtime_ns
    assert local_checkpoint(remote, cache=tmp_path) == copy  # the cached copy, not fetched again
    assert (copy / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [copy.parent.name]
    local, fetched = (
        TeacherConfig(checkpoint=str(checkpoint)),
        TeacherConfig(checkpoint=remote, cache=str(tmp_path)),
    )
    assert teacher_id_of(fetched) == teacher_id_of(local)
    teacher = Teacher.from_checkpoint(fetched)
    assert teacher.teacher_id == Teacher.from_checkpoint(local).teacher_id
    assert teacher.config_hash == Teacher.from_checkpoint(local).config_hash


def test_a_rewritten_checkpoint_is_fetched_again(checkpoint: Path, remote: str, tmp_path: Path) -> None:
    first = local_checkpoint(remote, cache=tmp_path)
    other = tiny_teacher(tmp_path / "other" / "tiny-teacher", seed=1)
    fsspec.filesystem("memory").put(
        str(other / "model.safetensors"), f"{remote[len('memory://') :]}/model.safetensors"
    )
    second = local_checkpoint(remote, cache=tmp_path)
    assert second != first and second.name == first.name
    assert _files(second) == _files(other) and _files(first) == _files(checkpoint)  # the old copy untouched
    assert teacher_id_of(TeacherConfig(checkpoint=remote, cache=str(tmp_path))) == teacher_id_of(
        TeacherConfig(checkpoint=str(other))
    )


def test_one_file_checkpoint_keeps_its_name(checkpoint: Path, tmp_path: Path) -> None:
    url = f"memory://fetch-{uuid.uuid4().hex[:8]}/glip_t.safetensors"
    with fsspec.open(url, "wb") as handle:
        handle.write((checkpoint / "model.safetensors").read_bytes())
    copy = local_checkpoint(url, cache=tmp_path)
    assert (
        copy.name == "glip_t.safetensors"
        and copy.read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    )


def test_actors_fetching_at_once_leave_one_whole_copy(checkpoint: Path, remote: str, tmp_path: Path) -> None:
    # Processes, as actors are: forked, each holds its own copy of the memory:// store (threads would share one
    # file position in it, which no object store has).
    with multiprocessing.get_context("fork").Pool(4) as pool:
        found = pool.starmap(local_checkpoint, [(remote, None, tmp_path)] * 8)
    assert len(set(found)) == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [found[0].parent.name]  # no staging left
    assert _files(found[0]) == _files(checkpoint)


def test_a_short_download_leaves_nothing_in_the_cache(
    remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = MemoryFileSystem.get_file

    def short(self: MemoryFileSystem, rpath: str, lpath: str, **kwargs: object) -> None:
        real(self, rpath, lpath, **kwargs)
        with open(lpath, "r+b") as handle:  # a connection cut before the end
            handle.truncate(max(0, Path(lpath).stat().st_size - 10))

    monkeypatch.setattr(MemoryFileSystem, "get_file", short)
    with pytest.raises(OSError, match="expected"):
        local_checkpoint(remote, cache=tmp_path)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_missing_url_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"memory://fetch-{uuid.uuid4().hex[:8]}/no-such-teacher"
    with pytest.raises(FileNotFoundError, match="no-such-teacher: no such checkpoint"):
        local_checkpoint(url, cache=tmp_path)
    with pytest.raises(SystemExit) as stop:
        label_job.main(["--root", f"memory://root-{uuid.uuid4().hex[:8]}", "--teacher", url])
    assert stop.value.code == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_storage_options_stay_out_of_the_repr() -> None:
    config = TeacherConfig(checkpoint="s3://bucket/models/glip_t", storage_options={"secret": "hunter2"})
    assert config.storage_options == (("secret", "hunter2"),)
    assert "hunter2" not in repr(config)


def test_export_names_the_folder_of_a_teacher_given_by_url(
    checkpoint: Path, remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLIP_ENGINE_CACHE", str(tmp_path))
    layout = Layout(f"memory://root-{uuid.uuid4().hex[:8]}")
    assert teacher_folder(layout, remote) == teacher_id_of(TeacherConfig(checkpoint=str(checkpoint)))
    assert (tmp_path / "checkpoints").is_dir()
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        teacher_folder(layout, remote + "-missing")
