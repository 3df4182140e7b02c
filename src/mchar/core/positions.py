"""Position ids for working-context slots.

Raw tokens keep their true positions. A gist stands for the tokens ``[start, end)`` but is fed as one slot, so it
needs one position id. The default is the **centre** of its span (``start + width // 2``): a rotary phase error
grows with ``|p - t|`` for every covered token ``t``, and the midpoint is the point that minimises the *maximum*
distance to the covered tokens (``ceil((width - 1) / 2)`` instead of ``width - 1`` for ``start`` or ``end``).
``start`` (upstream's code) and ``end`` (the gist sits where its last token sat, so it never looks "earlier" than
any token it summarises) are kept as ablations. All three modes give nondecreasing positions along a tiling WC:
every mode places a gist inside its own span, and spans are ordered.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PositionMode = Literal["centre", "start", "end"]
POSITION_MODES: tuple[str, ...] = ("centre", "start", "end")


def check_mode(mode: str) -> None:
    """Reject unknown modes with one clear line (configs pass strings through)."""
    if mode not in POSITION_MODES:
        raise ValueError(f"position_mode: unknown mode {mode!r} (choose from {', '.join(POSITION_MODES)})")


def gist_position(start: int, end: int, mode: str = "centre") -> int:
    """Position id of a gist covering tokens ``[start, end)``."""
    check_mode(mode)
    if end <= start:
        raise ValueError(f"empty span [{start}, {end})")
    if mode == "start":
        return start
    if mode == "end":
        return end - 1
    return start + (end - start) // 2


def gist_positions(starts: np.ndarray, widths: np.ndarray, mode: str = "centre") -> np.ndarray:
    """Vectorised :func:`gist_position` for many gists at once."""
    check_mode(mode)
    starts = np.asarray(starts, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    if mode == "start":
        return starts.copy()
    if mode == "end":
        return starts + widths - 1
    return starts + widths // 2
