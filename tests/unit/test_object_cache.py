"""The compiled-object cache (flowscope.kernel.bpf_object): an entry is found under its key, a changed input is
another key, and an entry that does not check out is deleted and reported, never returned."""

from __future__ import annotations

from pathlib import Path

from flowscope.kernel.bpf_object import MapSpec, ObjectImage, ProgramSpec, cache_key, read_cached, write_cached

IMAGE = ObjectImage(
    (MapSpec("flows_0", 1, 48, 64, 1024, 0, 5), MapSpec("fs_events", 27, 0, 0, 1 << 24, 0, 6)),
    (ProgramSpec("raw_tracepoint__kfree_skb", 17, "raw_tracepoint:kfree_skb", bytes(range(16)) * 3),),
)
KEY = cache_key("6.1.0-57-amd64", "btf-sum", "/lib/modules/6.1.0-57-amd64/build", "int x;", ["-DA=1"])


def test_an_entry_is_read_back_under_its_key(tmp_path: Path) -> None:
    assert read_cached(KEY, tmp_path) == (None, "miss")
    write_cached(KEY, IMAGE, tmp_path)
    assert read_cached(KEY, tmp_path) == (IMAGE, "hit")
    assert [path.name for path in tmp_path.iterdir()] == [f"{KEY}.json"]  # no partial file left


def test_every_input_of_the_key_changes_it() -> None:
    inputs = ["6.1.0-57-amd64", "btf-sum", "/lib/modules/6.1.0-57-amd64/build", "int x;", ["-DA=1"]]
    changed = ["6.12.118+deb12-amd64", "other-btf", "/usr/src/other", "int y;", ["-DA=2"]]
    for position, value in enumerate(changed):
        stale = list(inputs)
        stale[position] = value
        assert cache_key(*stale) != KEY, position


def test_a_corrupt_entry_is_deleted_and_reported(tmp_path: Path) -> None:
    write_cached(KEY, IMAGE, tmp_path)
    path = tmp_path / f"{KEY}.json"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x01  # one bit of the bytecode's text
    path.write_bytes(bytes(raw))
    assert read_cached(KEY, tmp_path) == (None, "rebuilt: its checksum does not match its content")
    assert not path.exists()


def test_an_entry_written_for_another_key_is_not_loaded(tmp_path: Path) -> None:
    other = cache_key("6.1.0-57-amd64", "btf-sum", "/lib/modules/6.1.0-57-amd64/build", "int y;", ["-DA=1"])
    write_cached(other, IMAGE, tmp_path)
    (tmp_path / f"{other}.json").rename(tmp_path / f"{KEY}.json")
    assert read_cached(KEY, tmp_path) == (None, "rebuilt: it was written for another key")


def test_an_unwritable_cache_is_no_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    write_cached(KEY, IMAGE, blocked / "objects")  # a directory under a file cannot exist
    image, outcome = read_cached(KEY, blocked / "objects")
    assert image is None and outcome.startswith("miss: ")
