"""Errors a user can act on. The command line prints them as one line and exits non-zero."""


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
