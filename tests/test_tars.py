"""Tar shards through webdataset: one key rule, deterministic bytes, unsafe and broken members reported."""

from __future__ import annotations

import io
import tarfile
from typing import NamedTuple

import fsspec
import pytest

from pipeline import tars

SAMPLES = [{"__key__": f"{i:05d}", "jpg": bytes([i]) * 700, "json": b'{"i": %d}' % i} for i in range(3)]


class _Type(NamedTuple):
    """A member without data of this tar type (``tarfile.LNKTYPE``, ``CHRTYPE``, ``DIRTYPE`` ...)."""

    type: bytes


def _raw_tar(members: list[tuple[str, bytes | _Type | None]]) -> bytes:
    """A tar written by tarfile directly, with any names; ``None`` data makes a symlink member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
            elif isinstance(data, _Type):
                info.type, info.linkname = data.type, "ok.jpg" if data.type == tarfile.LNKTYPE else ""
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_round_trip_and_deterministic_bytes(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    first, second = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    assert tars.write_samples(fs, first, SAMPLES, mtime=1_700_000_000) == 3
    tars.write_samples(fs, second, [dict(s) for s in SAMPLES], mtime=1_700_000_000)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    read = list(tars.iter_samples(fs, first))
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in read] == SAMPLES
    with tarfile.open(first) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == [f"{i:05d}.{ext}" for i in range(3) for ext in ("jpg", "json")]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (1_700_000_000, 0o644, 0, 0, "", "")
    }
    assert [s["__key__"] for s in tars.iter_samples(fs, first, suffixes={"json"})] == [
        "00000",
        "00001",
        "00002",
    ]
    assert "jpg" not in next(tars.iter_samples(fs, first, suffixes={"json"}))


def test_unsafe_names_duplicates_and_links_never_become_samples(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    path = tmp_path / "hostile.tar"
    path.write_bytes(
        _raw_tar(
            [
                ("ok.jpg", b"1"),
                ("../escape.jpg", b"2"),
                ("/abs.jpg", b"3"),
                ("link.jpg", None),
                ("dup.jpg", b"4"),
                ("dup.jpg", b"5"),
                ("a\\b.jpg", b"6"),
                ("hard.jpg", _Type(tarfile.LNKTYPE)),
                ("device.jpg", _Type(tarfile.CHRTYPE)),
                ("fifo.jpg", _Type(tarfile.FIFOTYPE)),
                ("folder", _Type(tarfile.DIRTYPE)),
                ("last.jpg", b"7"),
            ]
        )  # fmt: skip
    )
    items = list(tars.iter_samples(fs, str(path)))
    samples = [i for i in items if not isinstance(i, tars.TarProblem)]
    problems = [i for i in items if isinstance(i, tars.TarProblem)]
    assert [(s["__key__"], s["jpg"]) for s in samples] == [("ok", b"1"), ("dup", b"4"), ("last", b"7")]
    assert sorted(p.reason for p in problems) == [
        "duplicate_member",
        *["non_regular_member"] * 4,
        *["unsafe_member_name"] * 3,
    ]
    details = [p.detail for p in problems if p.reason == "non_regular_member"]
    assert details[0] == "'link.jpg': symbolic link to '/etc/passwd'"
    assert details[1] == "'hard.jpg': hard link to 'ok.jpg'" and "'device.jpg'" in details[2]
    # Problems come in member order, between the samples around them.
    reasons = [getattr(i, "reason", None) or i["__key__"] for i in items]
    assert reasons.index("non_regular_member") < reasons.index("dup") < reasons.index("last")
    # The random-access index reads exactly the members iter_samples reads.
    assert sorted(tars.member_index(fs, str(path))) == [("dup", "jpg"), ("last", "jpg"), ("ok", "jpg")]


def test_writing_refuses_names_that_escape_or_read_back_differently(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    bad = [
        ({"__key__": "../x", "jpg": b"1"}, "unsafe sample key"),
        ({"__key__": "/abs", "jpg": b"1"}, "unsafe sample key"),
        ({"__key__": "a", "x/../../../etc/passwd": b"1"}, "unsafe member name"),
        ({"__key__": "a", "jpg/b": b"1"}, "unsafe member name"),  # would read back as key 'a.jpg/b'
        ({"__key__": "a.b", "jpg": b"1"}, "unsafe member name"),  # would read back as key 'a'
        ({"__key__": "a", "x\\..\\y": b"1"}, "unsafe member name"),
    ]
    for sample, message in bad:
        with pytest.raises(ValueError, match=message):
            tars.write_samples(fs, str(tmp_path / "out.tar"), [SAMPLES[0], sample])
        assert not (tmp_path / "out.tar").exists() and not list(tmp_path.glob("out.tar.tmp-*"))
    good = {"__key__": "dir/000001", "seg.png": b"2", "JPG": b"3"}
    assert tars.write_samples(fs, str(tmp_path / "out.tar"), [good]) == 1
    [read] = tars.iter_samples(fs, str(tmp_path / "out.tar"))
    assert (read["__key__"], read["seg.png"], read["jpg"]) == ("dir/000001", b"2", b"3")


def test_a_truncated_tar_keeps_every_sample_read_before_the_break(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    whole = tmp_path / "whole.tar"
    tars.write_samples(fs, str(whole), SAMPLES)
    data = whole.read_bytes()
    cut = data.index(b"\x02" * 700) + 300  # inside the third sample's image
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    items = list(tars.iter_samples(fs, str(tmp_path / "cut.tar")))
    assert [i["__key__"] for i in items[:-1]] == ["00000", "00001"]
    assert isinstance(items[-1], tars.TarProblem) and items[-1].reason == "tar_read_error"
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 10)
    [problem] = list(tars.iter_samples(fs, str(tmp_path / "junk.tar")))
    assert problem.reason == "tar_read_error"


def test_the_key_rule_is_webdataset_s() -> None:
    assert tars.sample_key("dir/000001.seg.png") == ("dir/000001", "seg.png")
    assert tars.sample_key("noext") == (None, None)
    assert not tars.is_safe_name("a/../b") and tars.is_safe_name("a/b.c")


def test_member_index_reads_one_member_by_its_byte_range(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "a.tar")
    tars.write_samples(fs, path, SAMPLES)
    index = tars.member_index(fs, path)
    assert sorted(index) == sorted((f"{i:05d}", ext) for i in range(3) for ext in ("jpg", "json"))
    for sample in SAMPLES:
        for suffix in ("jpg", "json"):
            assert tars.read_member(fs, path, index[(sample["__key__"], suffix)]) == sample[suffix]
    hostile = tmp_path / "hostile.tar"
    hostile.write_bytes(_raw_tar([("ok.jpg", b"1"), ("../escape.jpg", b"2"), ("link.jpg", None)]))
    assert list(tars.member_index(fs, str(hostile))) == [("ok", "jpg")]
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: data.index(b"\x02" * 700) + 300])
    # The third sample's image header survived the cut, its bytes did not: only whole members are indexed.
    assert sorted(tars.member_index(fs, str(tmp_path / "cut.tar"))) == sorted(index)[:4]
