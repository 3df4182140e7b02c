"""Synthetic copy batches: random tokens with one segment repeated later, masked to the copyable targets.

Nothing but copying (an induction head: find the earlier occurrence of the current token, emit what followed it)
lowers the loss on the masked tokens below ``log(pool)``. Used by ``bench induction`` and, as an extra loss term,
by the base-LM stage (``base_lm.copy_batch``): a small base learns to copy from this in minutes on a CPU, where the
few answer tokens of the retrieval episodes alone never taught it.
"""

from __future__ import annotations

import torch


def repeat_batch(
    n: int, length: int, pool: int, gen: torch.Generator, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, length], mask [n, length]): mask marks the target positions that only copying can predict."""
    ids = torch.randint(0, pool, (n, length), generator=gen)
    mask = torch.zeros(n, length)
    if offset:
        mask[:, offset:] = 1.0
        return ids, mask
    for i in range(n):
        seg = int(torch.randint(4, max(5, min(48, length // 3)), (1,), generator=gen))
        gap = int(torch.randint(0, length - 2 * seg + 1, (1,), generator=gen))
        a = int(torch.randint(0, length - 2 * seg - gap + 1, (1,), generator=gen))
        b = a + seg + gap
        ids[i, b : b + seg] = ids[i, a : a + seg]
        mask[i, b + 1 : b + seg] = 1.0
    return ids, mask
