"""Advisory locks on outputs: one writer per output at a time.

A lock is an fcntl lock (flock) on a hidden file beside the output, `.NAME.lock`, that holds the writer's
process id, so that a second writer stops at once with one line naming the first. The kernel drops the lock
when its process ends, however it ends, so a killed run never leaves a stale lock: its file may stay behind
and is reused. A writer that ends normally removes the file; the command line releases whatever locks a
command still holds when it ends (`release_held_locks`), so a command may simply hold one to its end.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from twn_cli.errors import TWNError

_held: list[OutputLock] = []  # the locks this process holds, in the order taken


class OutputLock:
    """A held lock on one output; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, lock_path: Path, descriptor: int):
        self.lock_path = lock_path
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        # Removed while still held: a writer waiting on this file finds it gone and locks a fresh one.
        self.lock_path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = None
        _held.remove(self)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exception) -> None:
        self.release()


def lock_path_of(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def lock_output(output: str | Path) -> OutputLock:
    """Lock `output` (a file or folder, existing or not) for this process, or raise a TWNError naming the holder."""
    lock_path = lock_path_of(output)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise TWNError(
                f"'{output}' is being written by another process ({holder}): wait for it to end or choose another output"
            ) from None
        # The previous holder may have removed the file between our open and our lock: then lock the new one.
        try:
            current = os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    lock = OutputLock(lock_path, descriptor)
    _held.append(lock)
    return lock


def release_held_locks() -> None:
    """Release every lock this process still holds (at the end of a command)."""
    for lock in list(_held):
        lock.release()


def _holder(descriptor: int) -> str:
    """'pid N' as the holder wrote it into the lock file (it writes it just after locking)."""
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "pid not yet written"
