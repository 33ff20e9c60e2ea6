"""The one exception type for mistakes a user can make.

The CLI turns an :class:`EdgekitError` into a single red line and exit code 2; any other
exception is a bug in edgekit and keeps its traceback.
"""


class EdgekitError(Exception):
    """A problem with the user's input (bad path, unknown name, malformed file, bad data)."""
