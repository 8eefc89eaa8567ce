"""The one error type for user errors.

Anything the user can fix (a bad path, an unknown model, a bad setting) raises `MemtxError`
with one actionable sentence. The CLI prints that line and exits 1; everything else is a bug
and keeps its traceback.
"""


class MemtxError(Exception):
    """A user error: the message is one line that says what to do."""
