"""The data package's user-facing error: a UserError, so `ditscale` prints it as one line."""

from harness.errors import UserError


class DataError(UserError):
    """A data problem the user can fix (bad source, missing shards, an output folder in the way, ...)."""
