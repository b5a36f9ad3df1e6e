"""SIGTERM ends a command as Ctrl-C does, so that its cleanup runs and its partial outputs are removed.

The default action of SIGTERM (sent by `kill`, job schedulers, and torchrun to the other processes when one
fails) ends the process at once, leaving hidden partial files behind.
"""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread wherever it was."""


def terminate_like_interrupt() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (only it may set signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()
