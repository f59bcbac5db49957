"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: the message names what is wrong and how to fix it."""


class SpecbenchWarning(UserWarning):
    """Something suspicious but not fatal (e.g. heads trained for another base model); the CLI prints it as one line."""
