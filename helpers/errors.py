"""The one exception type for mistakes a user can fix.

A :class:`UserError` carries a single line that says what went wrong and what to do. The command
line prints it without a traceback and exits with status 2; notebooks show it as is.
"""


class UserError(Exception):
    """Bad input or a missing prerequisite, explained in one line that says what to do."""
