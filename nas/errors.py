"""Errors that reach the user."""


class UserError(Exception):
    """An error in what the user gave (a file, a flag, a value): shown as one line, no traceback."""
