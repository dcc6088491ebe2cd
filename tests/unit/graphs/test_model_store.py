"""The model store shared by the Whisper converter and the diffusion builders."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from mmpipe.graphs import model_store as ms


def test_publish_dir_loses_race_gracefully(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "x").write_text("new")
    assert ms.publish_dir(tmp, dst) is False
    assert (dst / "config.json").exists()
    assert ms.publish_dir(tmp, dst, overwrite=True) is True
    assert (dst / "x").read_text() == "new" and not (dst / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # the replaced copy is gone


def test_build_dir_is_atomic_and_readable(tmp_path: Path) -> None:
    dst = tmp_path / "cache" / "m"

    def fill(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        os.chmod(tmp / "sub" / "w.bin", 0o600)
        assert not dst.exists()  # nothing visible until it is complete

    assert ms.build_dir(dst, fill) is True
    assert stat.S_IMODE((dst / "sub" / "w.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755

    def broken(tmp: Path) -> None:
        raise RuntimeError("half-written")

    with pytest.raises(RuntimeError):
        ms.build_dir(tmp_path / "cache" / "other", broken)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]  # no temp leftovers


def test_cached_dir_builds_once_under_concurrency(tmp_path: Path) -> None:
    calls: list[int] = []
    barrier = threading.Barrier(4)

    def fill(tmp: Path) -> None:
        calls.append(1)
        (tmp / "model.bin").write_text(str(threading.get_ident()))

    def complete(d: Path) -> bool:
        return (d / "model.bin").is_file()

    results: list[Path] = []

    def worker() -> None:
        barrier.wait()
        results.append(ms.cached_dir(tmp_path / "m", fill, complete))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "m"] * 4 and complete(tmp_path / "m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(ms.TMP_PREFIX)]
    ms.cached_dir(tmp_path / "m", lambda t: pytest.fail("rebuilt a complete entry"), complete)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "junk").write_text("x")
    with pytest.raises(FileExistsError, match="delete it"):
        ms.cached_dir(tmp_path / "broken", fill, complete)


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMPIPE_CACHE", str(tmp_path / "c"))
    assert ms.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MMPIPE_CACHE")
    assert ms.default_cache_dir() == Path.home() / ".cache" / "mmpipe"


def test_quiet_hf_restores_settings() -> None:
    from transformers.utils import logging as tlog

    before = (tlog.get_verbosity(), tlog.is_progress_bar_enabled())
    with ms.quiet_hf():
        assert tlog.get_verbosity() == tlog.ERROR and not tlog.is_progress_bar_enabled()
    assert (tlog.get_verbosity(), tlog.is_progress_bar_enabled()) == before


def test_diffusion_builders_use_the_store() -> None:
    from mmpipe.graphs import diffusion_models as dm

    assert dm.default_cache_dir is ms.default_cache_dir
    assert not hasattr(dm, "_make_readable")
