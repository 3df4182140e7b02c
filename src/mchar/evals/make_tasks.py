"""Local lm-eval tasks: write their YAMLs and generate their JSONL data (``python -m mchar.evals.make_tasks``).

Why a loader function instead of ``data_files`` paths in the YAMLs: lm-eval resolves ``data_files`` against the
working directory, and the data depends on the tokenizer (lengths are counted in its tokens), so it cannot be
committed. The committed YAMLs in ``evals/tasks/`` point at :func:`load_split` (through the ``utils.py`` shim);
it reads ``<data_dir>/<task>_<length>.jsonl`` where ``data_dir`` comes from the TaskManager metadata (the eval
stage passes its own), ``$MCHAR_TASK_DATA`` or ``evals/tasks/data``, and generates the file on the spot when a
``tokenizer`` is given in the metadata and the file is missing or was made with another tokenizer.

Two lm-eval tasks per (task, length): ``mchar_<task>_<length>`` (generate_until, exact match after stripping
whitespace, stops at a newline) and ``mchar_<task>_<length>_ll`` (loglikelihood: ``acc`` = the answer is the
greedy continuation).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mchar.data.tasks import task_yaml_body
from mchar.errors import MCharError

TASKS = ("passkey", "niah_multikey", "kv_retrieval", "variable_tracking")
LENGTHS = (256, 512, 1024, 2048)
DEFAULT_EXAMPLES = 20
REPO_TASK_DIR = Path(__file__).resolve().parents[3] / "evals" / "tasks"
GEN_TEMPLATE = "_mchar_gen_template_yaml"
LL_TEMPLATE = "_mchar_ll_template_yaml"


class TaskDataError(MCharError, ValueError):
    """Task data that is missing or cannot be generated (one line, with the command that fixes it)."""


def lm_eval_task_name(task: str, length: int, output: str = "generate") -> str:
    """lm-eval task name of one (task, length) in the given output mode."""
    return f"mchar_{task}_{length}" + ("_ll" if output == "loglikelihood" else "")


def default_data_dir() -> Path:
    return Path(os.environ.get("MCHAR_TASK_DATA") or REPO_TASK_DIR / "data")


def task_dir() -> Path:
    """The committed YAML folder (``evals/tasks`` of the repository)."""
    return REPO_TASK_DIR


def available_lengths(directory: str | Path | None = None) -> dict[str, set[int]]:
    """Task -> lengths that have a YAML in ``directory``."""
    d = Path(directory or REPO_TASK_DIR)
    out: dict[str, set[int]] = {t: set() for t in TASKS}
    for t in TASKS:
        for p in d.glob(f"mchar_{t}_*.yaml"):
            tail = p.stem[len(f"mchar_{t}_") :].removesuffix("_ll")
            if tail.isdigit():
                out[t].add(int(tail))
    return out


# --------------------------------------------------------------------------- YAMLs


def _template(output: str) -> str:
    common = (
        "tag:\n  - mchar_synthetic\n"
        'dataset_path: ""\n'
        "custom_dataset: !function utils.load_split\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}{{query}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
    )
    return common + task_yaml_body(output == "generate")


def write_yamls(
    out_dir: str | Path, tasks: Sequence[str] = TASKS, lengths: Sequence[int] = LENGTHS
) -> list[Path]:
    """Write the templates, one YAML per (task, length, output) and the ``utils.py`` shim into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / GEN_TEMPLATE).write_text(_template("generate"), encoding="utf-8")
    (out / LL_TEMPLATE).write_text(_template("loglikelihood"), encoding="utf-8")
    (out / "utils.py").write_text(
        '"""lm-eval loads the data of the local mchar tasks through this shim (see mchar.evals.make_tasks)."""\n\n'
        "from mchar.evals.make_tasks import load_split\n\n"
        '__all__ = ["load_split"]\n',
        encoding="utf-8",
    )
    written = []
    for task in tasks:
        for length in lengths:
            for output, template in (("generate", GEN_TEMPLATE), ("loglikelihood", LL_TEMPLATE)):
                name = lm_eval_task_name(task, length, output)
                lines = [
                    f"include: {template}",
                    f"task: {name}",
                    "dataset_kwargs:",
                    f"  mchar_task: {task}",
                    f"  mchar_length: {length}",
                ]
                if output == "generate" and task == "variable_tracking":
                    lines += [
                        "generation_kwargs:",
                        '  until: ["\\n"]',
                        "  max_gen_toks: 48",
                        "  do_sample: false",
                    ]
                path = out / f"{name}.yaml"
                path.write_text("\n".join(lines) + "\n", encoding="utf-8")
                written.append(path)
    return written


# --------------------------------------------------------------------------- data


def _fingerprint(tokenizer: Any) -> str:
    from mchar.data.tokenizer import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer)


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as err:
            raise TaskDataError(
                f"tokenizer: cannot load {str(tokenizer)!r}: {str(err).splitlines()[0]}"
            ) from None
    return tokenizer


def _meta_path(data_dir: Path, task: str, length: int) -> Path:
    return data_dir / f"{task}_{length}.meta.json"


def ensure_data(
    data_dir: str | Path,
    tokenizer: Any,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = LENGTHS,
    n: int = DEFAULT_EXAMPLES,
    seed: int = 0,
    files: Iterable[str | Path] | None = None,
) -> dict[str, Path]:
    """Generate ``<task>_<length>.jsonl`` unless an identical one (same tokenizer, seed, >= n examples) exists."""
    from mchar.data.tasks import default_haystack, export_jsonl, generate_examples

    for task in tasks:
        if task not in TASKS:
            raise TaskDataError(f"task: unknown {task!r} (choose from {', '.join(TASKS)})")
    out = Path(data_dir)
    tok = _load_tokenizer(tokenizer)
    fp = _fingerprint(tok)
    hay = None
    written: dict[str, Path] = {}
    for task in tasks:
        for length in lengths:
            path = out / f"{task}_{length}.jsonl"
            meta_path = _meta_path(out, task, length)
            want = {"tokenizer": fp, "seed": int(seed)}
            if path.is_file() and meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                if {k: meta.get(k) for k in want} == want and int(meta.get("n", 0)) >= n:
                    written[f"{task}_{length}"] = path
                    continue
            if hay is None:
                hay = default_haystack(files)
            examples = generate_examples(task, n, int(length), tokenizer=tok, seed=seed, haystack=hay)
            export_jsonl(examples, path)
            meta_path.write_text(json.dumps({**want, "n": n, "task": task, "length": int(length)}, indent=2))
            written[f"{task}_{length}"] = path
    return written


def load_split(
    mchar_task: str, mchar_length: int, data_dir: str | None = None, tokenizer: Any = None, **_: Any
) -> dict[str, Any]:
    """lm-eval ``custom_dataset``: ``{"test": Dataset}`` of one (task, length) file (see module docstring)."""
    import datasets

    from mchar.data.tasks import load_jsonl

    d = Path(data_dir) if data_dir else default_data_dir()
    path = d / f"{mchar_task}_{int(mchar_length)}.jsonl"
    if tokenizer is not None:
        ensure_data(
            d, tokenizer, [mchar_task], [int(mchar_length)], n=int(_.get("n_examples", DEFAULT_EXAMPLES))
        )
    if not path.is_file():
        raise TaskDataError(
            f"{path} does not exist: run `python -m mchar.evals.make_tasks --tokenizer <base dir> --out {d}` "
            f"or pass metadata={{'tokenizer': <dir>}}"
        )
    return {"test": datasets.Dataset.from_list(load_jsonl(path))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mchar.evals.make_tasks", description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", help="tokenizer directory (e.g. the base model directory)")
    p.add_argument("--out", default=str(default_data_dir()), help="where the JSONL data goes")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--n", type=int, default=DEFAULT_EXAMPLES, help="examples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--yamls", metavar="DIR", help="(re)write the task YAMLs into DIR instead of data")
    args = p.parse_args(argv)
    try:
        if args.yamls:
            paths = write_yamls(args.yamls, args.tasks, args.lengths)
            print(f"wrote {len(paths)} task YAMLs to {args.yamls}")
            return 0
        if not args.tokenizer:
            p.error("--tokenizer is required to generate data")
        written = ensure_data(args.out, args.tokenizer, args.tasks, args.lengths, n=args.n, seed=args.seed)
        print(f"{len(written)} data files in {args.out}")
    except MCharError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
