"""The one exception family the CLI turns into a single clear line (no traceback)."""


class MCharError(Exception):
    """A user-facing error: bad config, bad input file, unusable data or model."""
