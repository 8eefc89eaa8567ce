"""The one error type for user errors.

Anything the user can fix (a bad path, an unknown model, a damaged bank) raises `MemtxError`
with one actionable sentence. The CLI prints that line and exits 1 (`UsageError`, a bad value
given on the command line or in a config file: exit 2); everything else is a bug and keeps its
traceback.
"""


class MemtxError(Exception):
    """A user error: the message is one line that says what to do."""

    exit_code = 1


class UsageError(MemtxError):
    """A bad value for an option, argument or setting (exit 2)."""

    exit_code = 2
