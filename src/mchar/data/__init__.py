"""Data: local corpus discovery/splitting, BPE tokenizer, synthetic long-context tasks, DataModules.

Heavy imports (lightning, datasets) live in ``mchar.data.datamodules`` only, so importing this package
stays cheap.
"""

from mchar.data.corpus import CorpusSplits, DataError, SplitReport, discover_corpus, split_of
from mchar.data.tasks import (
    TASKS,
    Haystack,
    export_jsonl,
    generate_examples,
    load_jsonl,
    make_training_window,
    write_task_suite,
)
from mchar.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    make_encoder,
    make_token_counter,
    tokenizer_fingerprint,
    train_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TASKS",
    "Haystack",
    "export_jsonl",
    "generate_examples",
    "load_jsonl",
    "make_training_window",
    "write_task_suite",
    "CorpusSplits",
    "DataError",
    "SplitReport",
    "discover_corpus",
    "load_tokenizer",
    "make_encoder",
    "make_token_counter",
    "split_of",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
