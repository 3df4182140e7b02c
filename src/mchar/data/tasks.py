"""Seeded synthetic long-context tasks (passkey, multi-key needle, key-value retrieval, variable tracking).

Haystacks are lines of *held-out* corpus text (the test split), so a model trained on the train split has
never seen them. Needles are Python comment/assignment lines so they blend into a code corpus. Every
generator is a pure function of its arguments: same seed -> byte-identical output (``random.Random`` with
string seeds hashes them with SHA-512, independent of ``PYTHONHASHSEED``).

Layout (works for both scoring styles): ``prompt = context + query``; loglikelihood scores the
continuation ``answer`` (which starts with a space); generation stops at a newline and is correct when every
string in ``answers`` appears in the output.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mchar.data.corpus import DataError, discover_corpus, read_text
from mchar.data.tokenizer import make_token_counter

TASKS: tuple[str, ...] = ("passkey", "niah_multikey", "kv_retrieval", "variable_tracking")
COPY = "copy"
MIX_TASKS: tuple[str, ...] = (*TASKS, COPY)
"""Episode kinds the training mix can draw: the eval tasks plus ``copy`` (training only, no eval YAML)."""
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

_ADJ = [
    "amber",
    "azure",
    "bold",
    "brave",
    "calm",
    "clever",
    "crimson",
    "dusty",
    "eager",
    "fancy",
    "gentle",
    "golden",
    "happy",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lively",
    "lucky",
    "mellow",
    "misty",
    "noble",
    "olive",
    "proud",
    "quiet",
    "rapid",
    "rusty",
    "shiny",
    "silent",
    "silver",
    "sleepy",
    "swift",
    "tidy",
    "vivid",
    "wild",
    "witty",
    "young",
    "zesty",
]
_NOUN = [
    "badger",
    "beacon",
    "canyon",
    "cedar",
    "comet",
    "falcon",
    "fjord",
    "garden",
    "harbor",
    "heron",
    "island",
    "jaguar",
    "kettle",
    "lantern",
    "lizard",
    "maple",
    "meadow",
    "nebula",
    "otter",
    "panda",
    "pepper",
    "pigeon",
    "quartz",
    "raven",
    "river",
    "saddle",
    "salmon",
    "spruce",
    "tiger",
    "tulip",
    "valley",
    "walrus",
    "willow",
    "yak",
    "zebra",
]


# --------------------------------------------------------------------------- haystack


class Haystack:
    """Pool of held-out lines, drawn contiguously (code stays locally coherent) from a seeded start.

    Lines longer than ``max_line_chars`` are skipped, which bounds the needle-depth granularity.
    Token counts per line are memoised because long contexts re-count the same lines often.
    """

    def __init__(self, texts: Sequence[str], max_line_chars: int = 200) -> None:
        self.docs: list[list[str]] = []
        for text in texts:
            lines = [ln + "\n" for ln in text.splitlines() if len(ln) < max_line_chars]
            if any(ln.strip() for ln in lines):
                self.docs.append(lines)
        if not self.docs:
            raise DataError("haystack has no usable text lines (empty texts/files)")
        self.max_line_chars = max_line_chars
        self._counts: dict[str, int] = {}

    @classmethod
    def from_files(cls, files: Iterable[str | Path], max_line_chars: int = 200) -> Haystack:
        texts = [t for t in (read_text(p) for p in sorted(Path(f) for f in files)) if t and t.strip()]
        return cls(texts, max_line_chars)

    def count(self, line: str, counter: Callable[[str], int]) -> int:
        n = self._counts.get(line)
        if n is None:
            n = self._counts[line] = counter(line)
        return n

    def draw(self, rng: random.Random, budget_tokens: int, counter: Callable[[str], int]) -> list[str]:
        """Contiguous lines (wrapping across documents in a seeded order) summing to ~budget tokens."""
        order = list(range(len(self.docs)))
        rng.shuffle(order)
        d = 0
        i = rng.randrange(len(self.docs[order[0]]))
        out: list[str] = []
        total = 0
        while total < budget_tokens:
            doc = self.docs[order[d % len(order)]]
            if i >= len(doc):
                d, i = d + 1, 0
                continue
            out.append(doc[i])
            total += self.count(doc[i], counter)
            i += 1
        return out


def default_haystack(files: Iterable[str | Path] | None = None) -> Haystack:
    """Haystack from the given files, else from the held-out (test) split of the default corpus."""
    if files is None:
        files = discover_corpus().test
    return Haystack.from_files(files)


# --------------------------------------------------------------------------- task specs


@dataclass
class Episode:
    """One retrieval problem: lines to insert at haystack depths, the query and the expected answer."""

    inserts: list[tuple[float, str]]  # (depth in [0,1], text ending with "\n"), depth order not required
    main: int  # index in ``inserts`` of the needle whose depth is reported
    query: str
    answer: str
    answers: list[str]


def _names(rng: random.Random, n: int) -> list[str]:
    picked = rng.sample(range(len(_ADJ) * len(_NOUN)), n)
    return [f"{_ADJ[k // len(_NOUN)]}-{_NOUN[k % len(_NOUN)]}" for k in picked]


def _passkey(rng: random.Random, depth: float) -> Episode:
    key = str(rng.randint(10000, 99999))
    needle = f"# The pass key is {key}. Remember it. {key} is the pass key.\n"
    return Episode([(depth, needle)], 0, "# What is the pass key? The pass key is", f" {key}", [key])


def _niah_multikey(rng: random.Random, depth: float, num_keys: int = 4) -> Episode:
    keys = _names(rng, num_keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in keys]
    inserts = [(depth, f"# The special magic number for {keys[0]} is: {values[0]}.\n")]
    for k, v in zip(keys[1:], values[1:], strict=True):
        inserts.append((rng.random(), f"# The special magic number for {k} is: {v}.\n"))
    q = f"# What is the special magic number for {keys[0]}? The special magic number for {keys[0]} is:"
    return Episode(inserts, 0, q, f" {values[0]}", [values[0]])


def _kv_retrieval(rng: random.Random, depth: float, num_pairs: int = 6) -> Episode:
    keys = [f"{rng.getrandbits(32):08x}" for _ in range(num_pairs)]
    values = [f"{rng.getrandbits(32):08x}" for _ in range(num_pairs)]
    inserts = [(depth, f'KV["{keys[0]}"] = "{values[0]}"\n')]
    for k, v in zip(keys[1:], values[1:], strict=True):
        inserts.append((rng.random(), f'KV["{k}"] = "{v}"\n'))
    return Episode(inserts, 0, f'# Look up the value: KV["{keys[0]}"] ==', f' "{values[0]}"', [values[0]])


def _variable_tracking(rng: random.Random, depth: float, num_hops: int = 3, num_chains: int = 2) -> Episode:
    letters = "abcdefghijklmnopqrstuvwxyz"
    pool: set[str] = set()
    while len(pool) < (num_hops + 1) * num_chains:
        pool.add("v_" + "".join(rng.choice(letters) for _ in range(5)))
    names = sorted(pool)
    rng.shuffle(names)
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    values = rng.sample(range(10000, 100000), num_chains)
    inserts: list[tuple[float, str]] = []
    for c, (chain, value) in enumerate(zip(chains, values, strict=True)):
        start = depth if c == 0 else rng.random()
        # Later hops go at increasing depths after the first assignment, so the chain reads in order.
        steps = [start + (1.0 - start) * j / (num_hops + 1) for j in range(num_hops + 1)]
        inserts.append((steps[0], f"{chain[0]} = {value}\n"))
        for j in range(1, num_hops + 1):
            inserts.append((steps[j], f"{chain[j]} = {chain[j - 1]}\n"))
    q = f"# Which variables are equal to {values[0]}? They are:"
    return Episode(inserts, 0, q, " " + " ".join(chains[0]), list(chains[0]))


def _copy(rng: random.Random, depth: float, num_words: int = 6) -> Episode:
    """A random word sequence recalled verbatim later: every answer token after the first is predictable only by
    copying (an induction head), a dense version of the signal the retrieval tasks give with a handful of tokens."""
    words = " ".join(_names(rng, num_words))
    tag = f"{rng.randint(100, 999)}"
    query = f"# Recall sequence {tag}:"
    return Episode([(depth, f"# Sequence {tag}: {words}\n")], 0, query, f" {words}", [words])


_SPECS: dict[str, Callable[..., Episode]] = {
    COPY: _copy,
    "passkey": _passkey,
    "niah_multikey": _niah_multikey,
    "kv_retrieval": _kv_retrieval,
    "variable_tracking": _variable_tracking,
}


def make_episode(task: str, rng: random.Random, depth: float, **kwargs: Any) -> Episode:
    """A fresh episode of ``task`` with its main needle at ``depth``."""
    if task not in _SPECS:
        raise DataError(f"unknown task {task!r}; expected one of {list(MIX_TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"needle depth must be in [0, 1], got {depth}")
    return _SPECS[task](rng, depth, **kwargs)


# --------------------------------------------------------------------------- assembly


def insert_at_depths(lines: Sequence[str], inserts: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
    """Join haystack lines with inserts placed at character-fraction depths (snapped to line starts).

    Returns the text and the character offset of each insert. Inserts sharing a boundary keep their
    relative order (stable by depth, then list order).
    """
    total = sum(len(ln) for ln in lines)
    cum = [0]
    for ln in lines:
        cum.append(cum[-1] + len(ln))
    slots: list[tuple[int, float, int]] = []
    for k, (depth, _) in enumerate(inserts):
        target = depth * total
        # nearest line boundary to the target character position
        lo, hi = 0, len(lines)
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[mid] < target:
                lo = mid + 1
            else:
                hi = mid
        idx = lo if lo == 0 or abs(cum[lo] - target) <= abs(target - cum[lo - 1]) else lo - 1
        slots.append((idx, depth, k))
    slots.sort()
    parts: list[str] = []
    offsets = [0] * len(inserts)
    pos = 0
    prev = 0
    for idx, _, k in slots:
        chunk = "".join(lines[prev:idx])
        parts.append(chunk)
        pos += len(chunk)
        offsets[k] = pos
        parts.append(inserts[k][1])
        pos += len(inserts[k][1])
        prev = idx
    parts.append("".join(lines[prev:]))
    return "".join(parts), offsets


def fit_lines(
    lines: Sequence[str],
    inserts: Sequence[tuple[float, str]],
    suffix: str,
    length: int,
    counter: Callable[[str], int],
) -> tuple[int, str, list[int]]:
    """Longest prefix of ``lines`` whose assembled text + ``suffix`` measures <= ``length`` tokens.

    Per-line counts overestimate the joined text (BPE merges "\\n" with indentation), so callers draw extra
    lines and this binary-searches the exact fit. Returns (tokens, text, insert offsets); tokens may exceed
    ``length`` only when even one line does not fit.
    """

    def measure(k: int) -> tuple[int, str, list[int]]:
        text, offsets = insert_at_depths(lines[:k], inserts)
        return counter(text + suffix), text, offsets

    lo, hi = 0, len(lines)
    best = measure(lo)
    if best[0] > length:
        return best
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = measure(mid)
        if cand[0] <= length:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return best


def build_example(
    task: str,
    length: int,
    depth: float,
    haystack: Haystack,
    counter: Callable[[str], int],
    rng: random.Random,
    example_id: str,
    **task_kwargs: Any,
) -> dict[str, Any]:
    """One example whose ``context + query`` measures at most ``length`` tokens (as close as lines allow)."""
    ep = make_episode(task, rng, depth, **task_kwargs)
    overhead = counter(ep.query) + sum(counter(t) for _, t in ep.inserts)
    lines = haystack.draw(rng, max(1, int((length - overhead) * 1.5) + 8), counter)
    n, context, offsets = fit_lines(lines, ep.inserts, ep.query, length, counter)
    if n > length:
        raise DataError(f"{task}: length {length} tokens is too short for the needles and query ({n} tokens)")
    return {
        "task": task,
        "id": example_id,
        "context": context,
        "query": ep.query,
        "answer": ep.answer,
        "answers": ep.answers,
        "needle_depth": depth,
        "needle_char_offset": offsets[ep.main],
        "length_tokens": n,
        "target_length": length,
    }


def generate_examples(
    task: str,
    n: int,
    length: int,
    tokenizer: Any | None = None,
    seed: int = 0,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    haystack: Haystack | None = None,
    texts: Sequence[str] | None = None,
    files: Iterable[str | Path] | None = None,
    chars_per_token: float = 4.0,
    **task_kwargs: Any,
) -> list[dict[str, Any]]:
    """``n`` examples of ``task`` at ``length`` tokens, cycling over ``depths``.

    Haystack source, first available: ``haystack``, ``texts``, ``files``, else the default corpus's test
    split. ``tokenizer`` may be an HF tokenizer, a ``tokenizers.Tokenizer`` or a callable; ``None`` means
    lengths are approximated as characters / ``chars_per_token``.
    """
    if n < 0 or length < 1 or not depths:
        raise DataError(f"need n >= 0, length >= 1 and at least one depth (n={n}, length={length})")
    hay = haystack or (Haystack(texts) if texts is not None else default_haystack(files))
    counter = make_token_counter(tokenizer, chars_per_token)
    out = []
    for i in range(n):
        depth = float(depths[i % len(depths)])
        rng = random.Random(f"mchar-task:{seed}:{task}:{length}:{i}")
        out.append(
            build_example(task, length, depth, hay, counter, rng, f"{task}-{length}-{i:04d}", **task_kwargs)
        )
    return out


# --------------------------------------------------------------------------- export


def export_jsonl(examples: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (sorted keys, UTF-8) so identical examples give identical files."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8", newline="\n") as fh:
        for ex in examples:
            fh.write(json.dumps(ex, sort_keys=True, ensure_ascii=False) + "\n")
    return p


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read back ``export_jsonl`` output."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def task_yaml_body(generate: bool, max_gen_toks: int = 24) -> str:
    """The output/metric part of an lm-eval task YAML: exact match on generation, or loglikelihood acc/ppl."""
    if generate:
        body = (
            "output_type: generate_until\n"
            "generation_kwargs:\n"
            '  until: ["\\n"]\n'
            f"  max_gen_toks: {max_gen_toks}\n"
            "  do_sample: false\n"
            "metric_list:\n"
            "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
            '    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]\n'
        )
    else:
        body = (
            "output_type: loglikelihood\n"
            "metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        )
    return body + "metadata:\n  version: 1.0\n"


def _task_yaml(name: str, data_file: Path, generate: bool, max_gen_toks: int) -> str:
    # Absolute path: lm-eval resolves data_files relative to the working directory, not the YAML.
    head = (
        f"tag:\n  - mchar_synthetic{'_gen' if generate else ''}\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file.resolve()))}\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}{{query}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
    )
    return head + task_yaml_body(generate, max_gen_toks)


def write_task_suite(
    out_dir: str | Path,
    tokenizer: Any | None = None,
    lengths: Sequence[int] = (1024, 2048, 4096),
    n_per: int = 20,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    haystack: Haystack | None = None,
    texts: Sequence[str] | None = None,
    files: Iterable[str | Path] | None = None,
) -> dict[str, Path]:
    """Generate ``data/{task}_{length}.jsonl`` plus lm-eval YAMLs for every task x length.

    Two lm-eval tasks per file: ``mchar_{task}_{length}`` (loglikelihood: acc = answer is the greedy
    continuation) and ``mchar_{task}_{length}_gen`` (generate_until + exact match). Point
    ``TaskManager(include_path=out_dir)`` at the directory. Returns task name -> YAML path.
    """
    out = Path(out_dir)
    hay = haystack or (Haystack(texts) if texts is not None else default_haystack(files))
    written: dict[str, Path] = {}
    for task in tasks:
        for length in lengths:
            examples = generate_examples(
                task, n_per, length, tokenizer, seed=seed, depths=depths, haystack=hay
            )
            data = export_jsonl(examples, out / "data" / f"{task}_{length}.jsonl")
            max_gen = 48 if task == "variable_tracking" else 24
            for generate in (False, True):
                name = f"mchar_{task}_{length}{'_gen' if generate else ''}"
                yaml_path = out / f"{name}.yaml"
                yaml_path.write_text(_task_yaml(name, data, generate, max_gen), encoding="utf-8")
                written[name] = yaml_path
    return written


# --------------------------------------------------------------------------- training mix


def make_training_window(
    haystack: Haystack,
    length: int,
    seed: int,
    tokenizer: Any | None = None,
    num_episodes: int = 2,
    tasks: Sequence[str] = TASKS,
    chars_per_token: float = 4.0,
) -> tuple[str, list[tuple[int, int]]]:
    """A window of corpus text (<= ``length`` tokens) with retrieval episodes spliced in, plus answer char spans.

    Each episode places its needles early and its ``query + answer`` line later, at a random distance, so a base
    LM trained on these windows gets a reward for attending far back (the skill the eval tasks probe). The last
    episode's query closes the window, so the answer lands in the horizon that GistNet/LensNet score. The spans
    ``(start, end)`` locate every answer in the text (for answer-weighted losses).
    """
    rng = random.Random(f"mchar-mix:{seed}:{length}")
    counter = make_token_counter(tokenizer, chars_per_token)
    inserts: list[tuple[float, str]] = []
    answers: list[tuple[int, int, int]] = []  # (insert index, chars before the answer, answer chars)
    for e in range(num_episodes):
        task = rng.choice(list(tasks))
        ep = make_episode(task, rng, rng.uniform(0.0, 0.6))
        last = max(d for d, _ in ep.inserts)
        inserts.extend(ep.inserts)
        at = 1.0 if e == num_episodes - 1 else rng.uniform(min(1.0, last + 0.05), 1.0)
        inserts.append((at, ep.query + ep.answer + "\n"))
        answers.append((len(inserts) - 1, len(ep.query), len(ep.answer)))
    overhead = sum(counter(t) for _, t in inserts)
    lines = haystack.draw(rng, max(1, int((length - overhead) * 1.5) + 8), counter)
    _, text, offsets = fit_lines(lines, inserts, "", length, counter)
    return text, [(offsets[k] + before, offsets[k] + before + n) for k, before, n in answers]
