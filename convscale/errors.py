"""Errors a user can cause: reported as one line naming the fix, exit code 2, no traceback."""

from convscale.status import EXIT_USER_ERROR


class UserError(Exception):
    """Bad input from the user (config, name, path, data). The message names the fix."""

    exit_code = EXIT_USER_ERROR
