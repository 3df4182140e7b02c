"""``python -m mchar {fit,eval,sweep,report,ui,bench}``.

Heavy libraries (torch, Lightning, MLflow) are imported inside the subcommands only, so ``--help`` is instant.
Lightning re-launches ``sys.argv`` for extra DDP ranks, so every subcommand is a pure function of its argv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE_OVERRIDES = "Hydra overrides, e.g. +experiment=quickstart allocator.budget=1024 tree.depth=3"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mchar",
        description="MegaContext research harness: train GistNet/LensNet on a frozen LM, evaluate, sweep, report.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fit = sub.add_parser("fit", help="run the experiment's stages (base LM, GistNet, LensNet, eval, report)")
    fit.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    fit.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ev = sub.add_parser("eval", help="evaluate at budget: perplexity for every policy, lm-eval tasks")
    ev.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    ev.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    gen = sub.add_parser(
        "generate", help="continue a long text through MegaContext sessions, one per policy, side by side"
    )
    gen.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    gen.add_argument("--file", default=None, help="a UTF-8 text file: the long context")
    gen.add_argument("--prompt", default=None, help="text appended after the file (e.g. a question)")
    gen.add_argument(
        "--policies",
        default="full,recency,lensnet",
        help="comma-separated policies to continue with at allocator.budget (full = the plain base)",
    )
    gen.add_argument("--max-new-tokens", type=_positive_int, default=32)
    gen.add_argument("--stop", action="append", default=None, help="stop at this string (repeatable)")
    sw = sub.add_parser("sweep", help="run (or resume) an Optuna study described by a YAML spec")
    sw.add_argument("spec", help="sweeps/NAME.yaml")
    sw.add_argument("--n-trials", type=int, default=None, help="override the spec's n_trials")
    sw.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every trial")
    rp = sub.add_parser("report", help="build reports/<name>.md with tables and plots from MLflow runs")
    rp.add_argument(
        "--name", default=None, help="report name (reports/<name>.md; default quickstart, or compare-A-B-...)"
    )
    rp.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="EXPERIMENT",
        help="put these experiments' newest runs side by side instead (one column each)",
    )
    rp.add_argument(
        "--pool",
        nargs="+",
        default=None,
        metavar="EXPERIMENT",
        help="pool these seed replicates' task outcomes instead (pooled accuracy, McNemar against --reference)",
    )
    rp.add_argument(
        "--reference", default="lensnet", help="the policy --pool pairs every other with (default lensnet)"
    )
    rp.add_argument("--experiment", default="mchar", help="MLflow experiment name")
    rp.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: the run directory's SQLite store)"
    )
    rp.add_argument(
        "--bench",
        action="store_true",
        help="write reports/bench.md from the benchmark results in reports/bench/*.json instead",
    )
    rp.add_argument("--run-id", default=None, help="parent run to report on (default: the latest)")
    rp.add_argument("--out-dir", default="reports")
    ui = sub.add_parser("ui", help="serve the MLflow UI for mchar's tracking store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", default=None)
    bn = sub.add_parser("bench", help="run a benchmark and print one JSON object")
    bn.add_argument(
        "--out", default=None, help="also write the JSON object to this file (give it before NAME)"
    )
    bn.add_argument("name", help="train-overhead | train-step | decode | tree-io | fault | induction")
    bn.add_argument("args", nargs=argparse.REMAINDER, help="benchmark options (see: bench NAME --help)")
    return p


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from mchar.compose import compose_config
        from mchar.generate import continue_text, print_continuations, read_text

        text = read_text(args.file, args.prompt)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        cfg = compose_config(list(args.overrides))
        results = continue_text(cfg, text, policies, args.max_new_tokens, args.stop or [])
        print_continuations(results, cfg.allocator.budget)
        return 0
    if args.command in ("fit", "eval"):
        from mchar.compose import compose_config, to_yaml

        overrides = list(args.overrides)
        if args.command == "eval" and not any(o.split("=")[0].lstrip("+") == "stages" for o in overrides):
            overrides.append("stages=[eval]")
        cfg = compose_config(overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        from mchar.pipeline import run_pipeline

        run_pipeline(cfg, command=args.command)
        return 0
    if args.command == "sweep":
        from mchar.sweep import run_sweep

        run_sweep(args.spec, n_trials=args.n_trials, extra_overrides=args.overrides)
        return 0
    if args.command == "report":
        if args.bench:
            from mchar.bench.summary import build_bench_report

            out_dir = Path(args.out_dir)
            print(build_bench_report(out_dir / "bench", out_dir / "bench.md"))
            return 0
        chosen = [flag for flag in ("compare", "pool") if getattr(args, flag)]
        if chosen:
            from mchar.errors import MCharError

            if len(chosen) > 1:
                raise MCharError("report: --compare and --pool exclude each other")
            flag = chosen[0]
            if args.run_id:
                raise MCharError(
                    f"report: --run-id and --{flag} exclude each other (--{flag} takes experiment names)"
                )
            if flag == "pool":
                from mchar.pooled import build_pooled as build
            else:
                from mchar.compare import build_comparison as build
            names = getattr(args, flag)
            default = ("pooled-" if flag == "pool" else "compare-") + "-".join(names)
            extra = {"reference": args.reference} if flag == "pool" else {}
            path = build(
                names,
                args.name or default,
                experiment=args.experiment,
                tracking_uri=args.tracking_uri,
                out_dir=args.out_dir,
                **extra,
            )
            print(path)
            return 0
        from mchar.report import build_report

        path = build_report(
            name=args.name or "quickstart",
            experiment=args.experiment,
            tracking_uri=args.tracking_uri,
            run_id=args.run_id,
            out_dir=args.out_dir,
        )
        print(path)
        return 0
    if args.command == "ui":
        from mchar.ui import serve_ui

        return serve_ui(host=args.host, port=args.port, tracking_uri=args.tracking_uri)
    if args.command == "bench":
        import importlib

        module_name = "mchar.bench." + args.name.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            from mchar.errors import MCharError

            raise MCharError(f"bench: unknown benchmark {args.name!r}") from None
        out = _bench_out_path(args.out) if args.out else None
        result = module.main(args.args)
        if out is not None:
            _write_atomically(out, json.dumps(result, indent=2) + "\n")
        return 0
    raise AssertionError(args.command)


def _bench_out_path(raw: str) -> Path:
    """Check where a benchmark's JSON goes before the benchmark runs (minutes), not after."""
    from mchar.errors import MCharError

    path = Path(raw)
    if path.is_dir():
        raise MCharError(f"bench: --out {raw!r} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MCharError(f"bench: cannot create the folder of --out {raw!r}: {err.strerror}") from None
    return path


def _write_atomically(path: Path, text: str) -> None:
    """A file that was there stays whole until the new one is complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _core_errors() -> tuple[type[Exception], ...]:
    """User-facing errors of the framework-free core (it cannot depend on mchar.errors)."""
    import sys as _sys

    found: list[type[Exception]] = []
    for module, name in (
        ("mchar.core.storage", "StorageError"),
        ("mchar.core.working_context", "WorkingContextError"),
    ):
        if module in _sys.modules:
            found.append(getattr(_sys.modules[module], name))
    return tuple(found)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Overrides may also follow the options (``sweep SPEC --n-trials 4 seed=1``): argparse leaves positionals after
    an option unparsed, so they are appended to the command's overrides; anything else is still an error."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not hasattr(args, "overrides") or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from mchar.errors import MCharError

    try:
        return _dispatch(args)
    except (MCharError, *_core_errors()) as err:
        print(f"mchar: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mchar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
