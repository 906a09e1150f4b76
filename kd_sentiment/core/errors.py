"""The one exception type for mistakes a user can fix (bad data, parameters, model paths).

The CLI prints a `UserError` as a one-line message without a traceback and exits with status 2;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or setup, with a message that names what is wrong and says what to do."""
