"""The one exception family the CLI turns into a single clear line (no traceback)."""


class MCharError(Exception):
    """A user-facing error: bad config, bad input file, unusable data or model."""


def redact_url(url: str) -> str:
    """``url`` with its password masked: storage and tracking URLs reach error lines, logs and committed reports."""
    import re

    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)
