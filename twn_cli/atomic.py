"""Atomic outputs: build under a hidden sibling name, rename into place when complete.

An interrupted run therefore never leaves an output that looks finished, and a previous output at the same
path survives until the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def hidden_sibling(target: Path, purpose: str) -> Path:
    """A fresh hidden path beside `target` (same file system, so rename is atomic)."""
    return target.parent / f".{target.name}.{purpose}-{uuid.uuid4().hex[:12]}"


@contextmanager
def atomic_directory(target: str | Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging directory that replaces `target` on success and is removed on any failure.

    Entries of the old `target` named in `keep` (a training run's logs and states beside its checkpoint)
    are moved into the new one. Created with mkdir, not tempfile.mkdtemp, so the finished directory gets
    the umask's mode, not 0700.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(target, "partial")
    staging.mkdir()
    try:
        yield staging
        for name in keep:
            if (target / name).exists() and not (staging / name).exists():
                os.replace(target / name, staging / name)
        if target.exists():
            # rename cannot replace a non-empty directory: move the old one aside first.
            retired = hidden_sibling(target, "old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class AtomicFile:
    """A staging file for `target`: `commit()` renames it into place, `discard()` removes it."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = hidden_sibling(self.target, "partial")

    def commit(self) -> Path:
        os.replace(self.staging, self.target)
        return self.target

    def discard(self) -> None:
        self.staging.unlink(missing_ok=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a staging path for `target`: renamed into place on success, removed on any failure."""
    file = AtomicFile(target)
    try:
        yield file.staging
        file.commit()
    except BaseException:
        file.discard()
        raise


def write_text_atomically(target: str | Path, text: str) -> None:
    with atomic_file(target) as staging:
        staging.write_text(text, encoding="utf-8")
