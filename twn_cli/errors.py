"""Errors a user can act on. The command line prints them as one line and exits non-zero."""

import re


class TWNError(Exception):
    """A problem with the user's input, files or settings, described in one line."""


class BadRecordError(TWNError):
    """One input record cannot be used; `record` names it (file:line or id) and `reason` says why."""

    def __init__(self, record: str, reason: str):
        super().__init__(f"{record}: {reason}")
        self.record = record
        self.reason = reason

    def __reduce__(self):
        # Pickle rebuilds an exception from its args (the message alone); it crosses processes under torchrun.
        return type(self), (self.record, self.reason)


def torch_load_refusal(error: Exception) -> str:
    """What `torch.load(weights_only=True)` refused, in one line (its own message runs to a dozen)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines() if line.strip()]
    named = next((line for line in lines if "Unsupported global" in line), None)
    if named is not None:
        return named[named.index("Unsupported global") :].split(" was not an allowed global")[0]
    return lines[0] if lines else type(error).__name__
