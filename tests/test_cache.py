from pathlib import Path

import pytest

from edgekit import cache


def test_cached_entry_builds_once_and_rebuilds_when_corrupt(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    builds = []

    def build(directory: Path) -> None:
        builds.append(directory)
        (directory / "weights.bin").write_bytes(b"x" * 1000)

    entry = cache.cached_entry("thing-v1", build)
    assert entry == tmp_path / "thing-v1" and len(builds) == 1
    assert cache.cached_entry("thing-v1", build) == entry and len(builds) == 1
    (entry / "weights.bin").write_bytes(b"x" * 10)  # truncated by a crash or a bad disk
    assert not cache.is_valid(entry)
    cache.cached_entry("thing-v1", build)
    assert len(builds) == 2 and (entry / "weights.bin").stat().st_size == 1000


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))

    def build(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.cached_entry("broken", build)
    assert list(tmp_path.iterdir()) == []
