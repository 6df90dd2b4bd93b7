"""The one exception type for mistakes a user can fix: the CLI prints its message on one line, no traceback."""


class GptforgeError(Exception):
    """A problem with the user's input, files or environment; the message names the problem and the fix."""
