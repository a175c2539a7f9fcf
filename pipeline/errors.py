"""Exceptions that the CLI turns into exit codes: bad input exits 2, a failed run exits 1."""


class BadInput(Exception):
    """User input (a file, a field, an argument) is wrong; the message is one line naming it."""


class RunFailed(Exception):
    """A run could not complete for reasons other than bad input."""
