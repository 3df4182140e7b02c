"""The one exception family the CLI turns into a single clear line (no traceback)."""


class MCharError(Exception):
    """A user-facing error: bad config, bad input file, unusable data or model."""


def first_line(err: BaseException, typed: bool = False) -> str:
    """An error's first line (its type's name when it has no text), for one-line messages and tags; ``typed``
    prefixes the type (``RuntimeError: boom``)."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return f"{type(err).__name__}: {lines[0]}" if typed else lines[0]


def redact_url(url: str) -> str:
    """``url`` with its password masked: storage and tracking URLs reach error lines, logs and committed reports."""
    import re

    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)
