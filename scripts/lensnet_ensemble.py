"""Export several LensNets (e.g. seed replicates of one setting) as one ensemble the ``lensnet`` policy can load.

    python scripts/lensnet_ensemble.py OUT_DIR MEMBER_DIR [MEMBER_DIR ...]

then evaluate it like any LensNet (``eval.lensnet_dir=OUT_DIR``). The ensemble scores a WC with the mean of its
members' per-WC z-scored scores (:class:`mchar.core.lensnet.LensNetEnsemble`); members that read different inputs
are refused in one line, and nothing is written then.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mchar.core.lensnet import LensNet, LensNetEnsemble


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("members", nargs="+", type=Path)
    args = ap.parse_args(argv)
    try:
        ensemble = LensNetEnsemble([LensNet.from_pretrained(m) for m in args.members])
    except ValueError as err:
        raise SystemExit(f"lensnet_ensemble: {err}") from None
    ensemble.save_pretrained(args.out)
    print(f"{args.out}: an ensemble of {len(args.members)} LensNets")


if __name__ == "__main__":
    main()
