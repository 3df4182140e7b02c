"""``lensnet − recency`` split into two paired parts that add up to it (the evaluation logs both per document set).

``cover``: what holding a gist cover costs against truncation at the same budget — ``tree_recency`` is the cover
with the newest blocks expanded first, and a cover can never keep truncation's last raw block (its gists need
slots, raw history comes in whole blocks). ``focus``: what the learned focus adds to that cover. A LensNet that
trails truncation by no more than the cover's cost has learnt all a cover allows; the rest is the gists' worth.
Kept free of torch so the report can read it.
"""

from __future__ import annotations

# term -> (policy, reference): the paired difference NLL(policy) − NLL(reference) per document
GAP_TERMS: dict[str, tuple[str, str]] = {
    "cover": ("tree_recency", "recency"),
    "focus": ("lensnet", "tree_recency"),
}
