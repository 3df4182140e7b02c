"""Is a process still alive? Shared by the sweep (dead local workers) and the base build (dead builders' leftovers)."""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str:
    """Process start time (clock ticks since boot) so a recycled pid is not mistaken for the old process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_alive(pid: int, start: str = "") -> bool:
    """True while ``pid`` runs on this host (and, when ``start`` is known, is still the process that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return not start or not process_start(pid) or process_start(pid) == start
