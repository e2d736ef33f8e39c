"""Errors a user can cause: reported as one line naming the fix, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, name, path, data). The message names the fix."""

    exit_code = 2
