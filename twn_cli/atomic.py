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
def atomic_directory(target: str | Path, keep: tuple[str, ...] = (), marker: str | None = None) -> Iterator[Path]:
    """Yield a staging directory that replaces `target` on success and is removed on any failure.

    Entries of an existing `target` named in `keep` (a training run's logs and resumable states beside its
    checkpoint) never move: the staging directory's entries replace the others around them, and `marker`
    (the file that says the directory is complete, e.g. a manifest) goes first and comes back last. So an
    interruption at any moment, SIGKILL included, leaves the `keep` entries where they were and `target`
    either as it was, complete, or without its marker (incomplete, never a mix that looks complete).
    Without `keep` entries the whole directory is swapped. Created with mkdir, not tempfile.mkdtemp, so the
    finished directory gets the umask's mode, not 0700.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(target, "partial")
    staging.mkdir()
    try:
        yield staging
        if any((target / name).exists() for name in keep):
            _replace_around(target, staging, keep, marker)
        elif target.exists():
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


def _replace_around(target: Path, staging: Path, keep: tuple[str, ...], marker: str | None) -> None:
    """Move `staging`'s entries into `target` in place of all but its `keep` entries, `marker` last."""
    retired = hidden_sibling(target, "old")
    retired.mkdir()
    try:
        if marker is not None and (target / marker).exists():
            os.replace(target / marker, retired / marker)  # from here on `target` does not claim to be complete
        for entry in target.iterdir():
            if entry.name not in keep:
                os.replace(entry, retired / entry.name)
        for entry in staging.iterdir():
            if entry.name != marker:
                os.replace(entry, target / entry.name)
        if marker is not None:
            os.replace(staging / marker, target / marker)
        staging.rmdir()
    finally:
        shutil.rmtree(retired, ignore_errors=True)


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
