"""Errors that the CLI reports as one line, without a traceback."""


class UserError(Exception):
    """Bad input or an impossible request: the message names the file, layer or option and what to do."""
