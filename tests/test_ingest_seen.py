"""The uid rule (``pipeline.schema.url_uid``) as the seen-set reads it, and the sorted-array seen-set."""

from __future__ import annotations

import hashlib

import fsspec
import numpy as np

from pipeline import seen
from pipeline.schema import uid_bytes, url_uid


def test_uid_is_first_16_hex_digits_of_sha256():
    url = "https://example.com/a b/ü.jpg"
    assert url_uid(url) == hashlib.sha256(url.encode()).hexdigest()[:16] == uid_bytes(url).hex()
    assert url_uid(url) == f"{int(seen.url_uids([url])[0]):016x}"


def test_uid_round_trip_between_hex_and_uint64():
    urls = [f"http://host/{i}.jpg" for i in range(50)]
    values = seen.url_uids(urls)
    assert values.dtype == np.uint64 and values.shape == (50,)
    assert seen.uids_to_hex(values) == [url_uid(u) for u in urls]
    np.testing.assert_array_equal(seen.hex_to_uids(seen.uids_to_hex(values)), values)


def test_contains_matches_python_set_including_extremes():
    rng = np.random.default_rng(0)
    known = rng.integers(0, 2**63, 1000, dtype=np.uint64)
    extremes = np.array([0, 2**64 - 1], dtype=np.uint64)
    members = seen.SeenSet([known[:500], known[500:], extremes])
    queries = np.concatenate([known[::7], rng.integers(0, 2**63, 300, dtype=np.uint64), extremes])
    queries = np.concatenate([queries, np.array([1, 2**64 - 2], dtype=np.uint64)])
    expected = {int(v) for v in known} | {0, 2**64 - 1}
    assert members.contains(queries).tolist() == [int(q) in expected for q in queries]
    assert len(members) == len(expected)


def test_empty_set_and_add():
    members = seen.SeenSet()
    query = np.array([5, 6], dtype=np.uint64)
    assert members.contains(query).tolist() == [False, False]
    members.add(np.array([6], dtype=np.uint64))
    assert members.contains(query).tolist() == [False, True]


def test_uid_files_are_sorted_unique_and_load_as_a_union():
    fs = fsspec.filesystem("memory")
    seen.write_uids(fs, "/seen/a.npy", np.array([9, 3, 3, 7], dtype=np.uint64))
    seen.write_uids(fs, "/seen/b.npy", np.array([1, 7], dtype=np.uint64))
    assert seen.read_uids(fs, "/seen/a.npy").tolist() == [3, 7, 9]
    union = seen.SeenSet.load(fs, ["/seen/a.npy", "/seen/b.npy"])
    assert len(union) == 4
    assert union.contains(np.array([1, 2, 3, 9], dtype=np.uint64)).tolist() == [True, False, True, True]


def test_sorted_unique_and_first_occurrences():
    values = np.array([5, 3, 5, 9, 3, 3, 1], dtype=np.uint64)
    assert seen.sorted_unique(values).tolist() == [1, 3, 5, 9]
    assert seen.first_occurrences(values).tolist() == [True, True, False, True, False, False, True]
    empty = np.empty(0, dtype=np.uint64)
    assert seen.sorted_unique(empty).size == 0 and seen.first_occurrences(empty).size == 0
