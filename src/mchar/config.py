"""Structured configuration: the schema every Hydra composition is validated against.

Hydra composes YAML from ``conf/``; OmegaConf merges it into these dataclasses, which rejects unknown keys and
wrong types; :func:`check_semantics` then rejects impossible combinations. All of it happens before any model
or data is touched, and every failure is a :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from mchar.errors import MCharError

STAGES = ("base_lm", "gistnet", "lensnet", "e2e", "eval", "report")
POLICIES = (
    "lensnet",
    "recency",
    "sink_recent",
    "tree_recency",
    "gists_only",
    "similarity",
    "lexical",
    "random",
    "attention",
    "oracle",
)
QUERY_SCORERS = ("similarity", "lexical")  # what a settle may blend into a policy's scores
QUERY_REBUILDS = (
    "off",
    "recent",
    "coarsest",
)  # what a settle starts from (mchar.core.session's, kept light here)
EVAL_TASKS = ("passkey", "niah_multikey", "kv_retrieval", "variable_tracking")
MIX_TASKS = (*EVAL_TASKS, "copy")  # the training mix may also draw ``copy`` episodes (dense induction signal)
RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")


class ConfigError(MCharError, ValueError):
    """A configuration problem, reported as one line naming the offending key."""


@dataclass
class LocalLMConfig:
    """Architecture of the small Llama-style base LM mchar trains itself (used when ``model.kind=local``)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    vocab_size: int = 8192
    max_positions: int = 8192
    rope_theta: float = 10000.0
    head_dim: int = 0  # 0: hidden_size // num_heads
    # Hand-wired previous-token + induction heads (mchar.base.induction_prior): a CPU-trained base never formed
    # them. Needs a large rope_theta (1e10) and head_dim 64 for its distance-invariant matching.
    induction_prior: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """The frozen base LM: an HF hub id or local directory; ``kind=local`` builds it first if missing."""

    kind: str = "local"  # "local" (mchar builds it) | "hf" (any AutoModelForCausalLM)
    name: str = "local_small"
    name_or_path: str = ""
    dtype: str = "float32"
    trust_remote_code: bool = False
    local: LocalLMConfig = field(default_factory=LocalLMConfig)


@dataclass
class DataConfig:
    """Local corpus (split by file) and the windows the LightningDataModules cut from it."""

    globs: list[str] = field(default_factory=lambda: ["stdlib"])
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    # which files are train / val / test: fixed apart from ``seed``, so seed replicates of the side nets on a reused
    # base keep the base's held-out files held out (with the split tied to ``seed``, seed=1 made some of the base's
    # training files "test" documents)
    split_seed: int = 0
    # what the side nets validate on (held-out synthetic retrieval windows, LensNet's validation WCs and candidates):
    # fixed apart from ``seed`` too, so seed replicates are compared on the same held-out draws (tied to ``seed``, the
    # draw moved LensNet's Spearman more than any setting did: docs/FINDINGS.md, *Seed replicates on the same held-out
    # draws*)
    val_seed: int = 0
    max_files: int | None = None
    window: int = 512
    stride: int | None = None
    batch_size: int = 8
    num_workers: int = 0
    task_mix_fraction: float = 0.3
    mix_episodes: int = 2  # retrieval episodes spliced into each synthetic training window
    mix_answer_tail: int = 0  # corpus tokens after a synthetic window's last answer (put it in the horizon)
    mix_tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))  # episode kinds in the mix
    tokenizer_max_chars: int = 20_000_000
    cache_dir: str = ""


@dataclass
class TreeConfig:
    """Shape and storage of the MegaContext tree."""

    block_size: int = 32
    depth: int = 2
    storage: str = "memory"  # memory | disk
    gist_dtype: str = "float16"
    position_mode: str = "centre"  # centre | start | end


@dataclass
class AllocatorConfig:
    """Working-context budget (W_max) and the focus policy that spends it."""

    budget: int = 512
    policy: str = "lensnet"
    n_diff: int = 4
    tau_expand: float = 0.1
    tau_collapse: float = 0.1
    # relative-score policies (lensnet, similarity, random, attention) always spend the budget
    fill_budget: bool = True
    group_score: str = "parent"  # how K siblings score as one collapse candidate: mean | max | parent
    cooldown: int = 2
    protect_recent: int = 64
    stochastic: bool = False
    temperature: float = 1.0
    top_k: int = 4
    refocus_every: int | None = None  # default: every block
    # content-scoring policies (lensnet, similarity, attention) rate each LOD>=2 gist by the best of its children, so the
    # allocator can walk down to a needle under a coarse gist (mchar.core.lookahead)
    lookahead: bool = True
    # the same for the settle before an answer only (null = lookahead): lookahead=false query_lookahead=true streams
    # on one-step scores and still walks down to a needle once the question is known
    query_lookahead: bool | None = None
    # refocus rounds at a prompt's end before answering (stops at the first round without edits): walking from an
    # LOD2 gist down to a raw needle takes two; one round is the ablation
    query_rounds: int = 4
    # the allocator's cooldown during those rounds (the streaming cooldown damps oscillation, but at the question it
    # vetoes re-expanding what was just collapsed and ends the settle early); null = the streaming cooldown
    query_cooldown: int | None = 0
    # weight of the query scorer's z-scores blended into a relative-score policy's during those rounds only (the
    # question is known then; streaming perplexity never settles, so it is unaffected): chosen on the validation
    # split's multi-key needles; 0 = the policy's own scores (the ablation)
    query_similarity: float = 4.0
    # what that blend scores the entries by: `lexical` (the summed rarity of the question's token ids each entry's
    # span holds: tells apart needles that share their wording and differ in one key, as multi-key needles do) or
    # `similarity` (cosine of mean embeddings with the question's)
    query_scorer: str = "lexical"
    # a lexical settle scorer reads each entry's span, the block before it and this many blocks after it (what answers
    # the question follows its match: 1 gives a multi-key needle's key block its value block's hits); the `lexical`
    # policy settles on that scorer too. Streaming never reads ahead (a LensNet input reading ahead cost code ΔNLL).
    # 1: chosen on the validation split's multi-key needles (512 / 1,024 tokens, 0 -> 1: lensnet 0.37 / 0.60 -> 0.53 /
    # 0.67, lexical 0.50 / 0.77 -> 0.70 / 0.80, random 0.63 / 0.67 -> 0.63 / 0.83; 2 lifts lensnet to 0.63 / 0.80 but
    # costs lexical and random multi-key and passkey accuracy); 0 = the ablation
    query_follow: int = 1
    # the settle's lexical scorer weighs each query token by IDF to this power: > 1 lets the rarest tokens (a needle's
    # key) outweigh the words every needle shares; the `lexical` policy settles on it too; 1 = plain IDF
    query_idf_power: float = 3.0
    # the settle's lexical scorer ignores query tokens that more than this many of the tree's blocks hold (the words
    # every needle shares), so a needle worded like the asked one scores nothing instead of a little and no longer
    # takes the free slots of a budget-filling settle; null = every token counts. 4: chosen on the validation split's
    # tasks (multi-key right of 60, lensnet / lexical / random: null 52 / 52 / 53, 2: 47 / 53 / 47, 3: 54 / 59 / 55,
    # 4: 54 / 58 / 56, 5: 55 / 54 / 54; passkey 60 / 60 / 60 at 4); docs/FINDINGS.md
    query_max_df: int | None = 4
    # what the settle starts from: `coarsest` (a fresh WC: the coarsest cover and the protected tail), `recent` (that
    # cover with the newest gists expanded, as a session starts) or `off` (the stream's WC, the ablation): with a fresh
    # WC what streaming left raw (the values of needles worded like the asked one, recent blocks that do not answer
    # the question) must earn its slot again under the settle's scores. With query_idf_power 3, chosen on the
    # validation split's multi-key needles (512 + 1,024 tokens, 60 examples; off -> recent -> coarsest: lensnet 41 ->
    # 46 -> 52 right, random 49 -> 50 -> 53, lexical 46 -> 47 -> 52; passkey 59-60 of 60 throughout); docs/FINDINGS.md
    query_rebuild: str = "coarsest"
    # the allocator's expand threshold during those rounds (null = the streaming one: with fill_budget, any gist may
    # take a free slot, and at the question the free slots go to needles worded like the asked one); a number opens
    # only entries whose settle z-score exceeds it and leaves the rest of the budget unused (off: it cost passkeys on
    # the validation split and left the multi-key needle where it was; docs/FINDINGS.md)
    query_tau_expand: float | None = None
    # the allocator's churn guard during those rounds (group_score=parent: skip an expand that would be the lowest
    # keep-score); false = skip it where the expand and the next block both fit, filling the settle's free slots
    # (the ablation: on the validation tasks it lifted lexical / tree_recency and cost lensnet multi-key needles,
    # docs/FINDINGS.md, *The churn guard at the settle*)
    query_churn_guard: bool = True
    # weight of the recency ramp's z-scores (newest first) in the settle's blend of every blending policy but
    # tree_recency (whose own scores are that ramp) and lexical (whose settle fills newest first already): the free
    # slots left after the question's matches go to its surroundings; 0 = the policy's own order (the default)
    query_recency: float = 0.0
    # the `attention` policy (H2O / SnapKV at entry granularity): the mass an entry receives from the newest
    # `attention_queries` tokens (null = K), over every layer or only `attention_layer` (negative = from the top),
    # summed over its slots or, with `attention_per_slot`, averaged (a gist's one slot against a block's K)
    attention_queries: int | None = None
    attention_layer: int | None = None
    attention_per_slot: bool = False


@dataclass
class GistNetConfig:
    """GistNet architecture and its substitutability training."""

    kind: str = "transformer"  # transformer | mean
    layers: int = 2
    heads: int = 4
    width: int = 128
    pooling: str = "mean"  # mean | query | cls
    head: str = "mlp"  # linear | mlp
    shared: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_steps: int = 200
    horizon: int = 64
    loss: str = "kl+nll"  # kl | nll | kl+nll
    contrastive_weight: float = 0.0
    substitutable_threshold: float = 0.5
    contrastive_margin: float = 0.2
    warmup_steps: int = 10
    # validate and export an exponential moving average of GistNet's weights with this decay; null = the last step's
    ema_decay: float | None = None
    raw_prob: float = 0.25  # share of raw blocks in the random training layouts
    # share of raw blocks in the validation mix (``dnll``): fixed apart from raw_prob, so ablations stay comparable
    val_raw_prob: float = 0.25
    # newest blocks of the prefix that always stay raw in the training layouts: > 1 trains gists behind a raw present,
    # as a session holds them (on the quickstart's base 12 lets LOD2 gists and a session's cover carry far needles:
    # docs/FINDINGS.md, *Gists trained behind raw blocks*)
    keep_raw_blocks: int = 1
    # each training layout keeps a number of newest blocks raw drawn from keep_raw_blocks..keep_raw_max (null = always
    # keep_raw_blocks): gists trained both behind a raw present and next to the horizon
    keep_raw_max: int | None = None
    # the same for the validation layouts: fixed apart from keep_raw_blocks, so ablations stay comparable
    val_keep_raw_blocks: int = 1
    # weight of a second loss per step on an upper level (LOD2+) alone behind upper_keep_raw_blocks raw blocks, its
    # gists built from level-1 gists without gradient: trains the upper levels where a session keeps them without
    # moving the level-1 net (with shared: false; a shared net still moves); 0 = off
    upper_weight: float = 0.0
    upper_keep_raw_blocks: int = 12
    # share of training steps on a session-like WC at allocator.budget (recency-first cover + random edits: gists
    # behind a raw present) instead of a random mix of levels; 0 = off
    session_share: float = 0.0
    session_edits: int = 3  # at most this many random legal edits to a session-like training WC
    val_windows: int = 32  # held-out windows for the final metrics
    val_retrieval_windows: int = 0  # held-out synthetic retrieval windows for a second validation
    # validate every N train steps and once before the first (the training trend); None = once, at the end
    val_every: int | None = None
    # output = block mean + the trunk's correction (zero at init): starts at the summary a gist-exposed base reads
    residual_mean: bool = False
    # start from the GistNet the local base trained with (base_lm.gist_exposure_summary=gistnet) instead of an
    # untrained one: the compressor whose output that base learnt to read
    init_from_base: bool = False


@dataclass
class LensNetConfig:
    """LensNet architecture and its counterfactual-utility training."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_steps: int = 200
    horizon: int = 64
    loss: str = "bradley_terry"  # bradley_terry | regression
    # the training targets: sampled = horizon-NLL gains on the true next tokens; expected = the same gains in
    # expectation under the full-context model's next-token distribution (KL to it; less noise per token)
    utility: str = "sampled"
    # expected / mixed training targets against the full-context distribution sharpened (logits / T); validation
    # still measures against T = 1
    teacher_temperature: float = 1.0
    # expected / mixed training targets except on the horizon tokens the teacher misses with at least this much of
    # its mass on its argmax: those take the sampled gain (a teacher confidently answering a question wrongly would
    # teach fetching the wrong needle); 0 = every token it misses; null = off
    teacher_gate: float | None = None
    # Bradley-Terry pair weights normalised over the batch (windows with large utilities dominate) or per window
    pair_norm: str = "batch"
    # Bradley-Terry pair weights: |u_i - u_j| (gap: large gains decide) or 1 for every ordered pair (rank: what
    # validation's Spearman counts)
    pair_weight: str = "gap"
    candidates: int = 16
    warmup_steps: int = 10
    # validate and export an exponential moving average of LensNet's weights with this decay (null = the last step's
    # weights): one training run's endpoint moved the retrieval documents' ΔNLL by 0.02-0.05; 0.99 lowered it on both
    # large held-out splits for three seeds out of three (docs/FINDINGS.md, *Averaging LensNet's weights*)
    ema_decay: float | None = 0.99
    tail_tokens: int = 32
    random_edits: int = 3  # random legal edits applied to initial_context per step (WC diversity)
    # share of training WCs built by random expansion from the coarsest cover instead of recency-first: puts
    # LOD1 gists and raw blocks everywhere in the history, so far-back needles become candidates
    random_fill: float = 0.5
    # share of training WCs that are the allocator's own output from LensNet's current scores (DAgger-style
    # on-policy states; drawn after random_fill's choice, so 0.5 + 0.5 = half on-policy, a quarter each other kind)
    on_policy: float = 0.0
    # share of training WCs that are the question-time settle's for the batch's first window (the coarsest cover
    # refocused on LensNet's scores plus the allocator.query_* lexical blend, as a session settles before an answer),
    # so LensNet learns what fills the slots a found needle leaves; 0 = off (the ablation)
    settle_states: float = 0.0
    # cosine(entry, mean of the newest query_tokens tail embeddings) as a LensNet input feature (0 = off)
    query_tokens: int = 16
    # a linear path from log distance / log width / query similarity to the score, initialised to rank like
    # recency (-recency_prior x log1p(distance)); 0 = off (the ablation)
    recency_prior: float = 0.5
    # the same linear path's initial weight on query similarity: untrained, LensNet then ranks like recency plus
    # similarity (a needle that matches the question outranks a few blocks of distance); 0 = off
    similarity_prior: float = 0.0
    # the lexical policy's block score (summed IDF of the newest lexical_tokens token ids in each entry's span or the
    # lexical_lookback blocks before it, z-scored per WC) as a LensNet input feature (0 = off): needles worded alike
    # differ in token ids, not in mean embeddings (docs/FINDINGS.md, *A lexical input for LensNet*)
    lexical_tokens: int = 16
    lexical_lookback: int = 1
    # ... and the lexical_follow blocks after it (a needle's key block then also holds its value block's hits; 1 cost
    # the quickstart LensNet 0.085 code / 0.072 retrieval ΔNLL on heldout_large's validation documents, paired)
    lexical_follow: int = 0
    # that feature's IDF power and df cap (query tokens more than lexical_max_df of the blocks hold count nothing; null
    # = all count), as the settle sharpens its own lexical scorer (allocator.query_idf_power / query_max_df): 1 / null
    # weigh the words every needle shares a little, so a distractor's value looks asked for too
    lexical_idf_power: float = 1.0
    lexical_max_df: int | None = None
    # the prior path's initial weight on that feature (needs lexical_tokens > 0 and recency_prior > 0; 0 = off): 1
    # lowered the quickstart LensNet's ΔNLL on the 120+120 validation documents of heldout_large by 0.097 on code and
    # 0.074 on retrieval documents (paired; 0 = feature only: 0.023 / 0.060; 3: 0.042 / 0.095)
    lexical_prior: float = 1.0
    # the prior path's learning rate as a multiple of lensnet.lr: at 1 its weights stay near their init in a 400-step
    # fit (lexical 0.95 from 1.0, distance -0.41 from -0.5), so the init, not the data, sets the recency / lexical
    # balance; larger lets training choose it (no effect without recency_prior)
    prior_lr_scale: float = 1.0
    # what LensNet reads for a raw block: the mean of its K token embeddings, or its LOD1 gist (the learned summary
    # keeps the order and identity of the tokens a mean loses; docs/FINDINGS.md, *Raw blocks seen through their gists*)
    raw_embedding: str = "mean"
    # train on this exported GistNet instead of this run's (e.g. LensNet ablations over the quickstart's fixed
    # GistNet under their own names; the eval of the same run then uses it too); "" = this run's gistnet export
    gistnet_dir: str = ""
    # corpus tokens after a synthetic window's last answer in LensNet's windows (None = data.mix_answer_tail);
    # horizon - a few tokens puts the question at the end of the prefix, where LensNet's query tail reads it
    mix_answer_tail: int | None = None
    # share of LensNet's training windows that are synthetic retrieval episodes (None = data.task_mix_fraction); on
    # the quickstart (sweeps/lensnet_mix_quick.yaml, seeds 0-2) code only (0) has the same mean ΔNLL as data's 0.7
    # (0.178 vs 0.177) and loses passkey@1024 (0.30-0.60 vs 0.93-0.97)
    task_mix_fraction: float | None = None
    alloc_rounds: int = 16  # refocus rounds when validating allocator gain
    # where validation allocation starts: recent = the session's recency-first WC, protected tail and edit cap
    # (what the deployed allocator gets); coarsest = greedy fill from the coarsest cover, scores alone decide
    alloc_start: str = "recent"
    val_windows: int = 16
    val_retrieval_windows: int = 0  # held-out synthetic retrieval windows for a second validation
    # WCs drawn per kind and validation batch for the rank metrics (each one more variant forward): more draws, a
    # steadier Spearman on few held-out windows (8 on the quickstart's retrieval windows: seeds 0 / 1 agree)
    val_wc_draws: int = 1
    # validate every N train steps and once before the first (the training trend); None = once, at the end
    val_every: int | None = None


@dataclass
class E2EConfig:
    """End-to-end fine-tuning of GistNet + LensNet on allocator WCs (stage ``e2e``)."""

    schedule: str = "alternate"  # alternate | joint
    train_gistnet: bool = True
    train_lensnet: bool = True
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lr: float = 3e-4
    max_steps: int = 100
    # start from the gistnet / lensnet exports of another experiment name (artifacts/<stage>/<init_from>), so an e2e
    # ablation gets its own name and never overwrites what it starts from; None = this run's own exports
    init_from: str | None = None


@dataclass
class BaseLMTrainConfig:
    """Training of mchar's own small base LM (stage ``base_lm``)."""

    force: bool = False  # retrain even when artifacts/base_lm/<name> exists
    max_steps: int = 600
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    answer_weight: float = 10.0  # loss weight of the answer tokens of synthetic retrieval windows
    # Induction warm-up: a batch of synthetic copy windows (mchar.data.copy_batches) added to every step's loss.
    # 0 = off. With 32 x 64 tokens the retrieval base learned to copy on a CPU in ~1,500 steps (bench induction).
    copy_batch: int = 0
    copy_length: int = 64
    copy_pool: int = 256  # copy windows draw random token ids from [0, copy_pool)
    copy_from_step: int = 0  # global step at which the copy term starts
    copy_only_steps: int = 0  # its first N steps train the copy term alone (text batches skipped)
    # Gist exposure (mchar.lit.gist_exposure): weight of a second loss on the same batch with a random mix of
    # blocks replaced by mean summaries at their span's position (tree.block_size / tree.depth), so the base
    # learns to read one-slot summaries. 0 = off.
    gist_exposure: float = 0.0
    gist_exposure_raw_prob: float = 0.5  # share of blocks left raw in an exposure layout
    # share of exposure layouts that are a session's WC at allocator.budget (summaries behind a raw present)
    gist_exposure_session_share: float = 0.0
    # what writes the exposure's summaries: "mean" (parameter-free block mean) or "gistnet" (a GistNet shaped by
    # gistnet.*, trained with the base on the exposure loss and saved beside it; gistnet.init_from_base uses it)
    gist_exposure_summary: str = "mean"
    # Short-window phases before the final ``max_steps`` at ``data.window`` (same tokens per step): retrieval is
    # learned on short windows first. One step count per window.
    curriculum_windows: list[int] = field(default_factory=list)
    curriculum_steps: list[int] = field(default_factory=list)
    val_batches: int = 8
    task_eval_examples: int = 32
    task_eval_length: int = 512


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments mchar exposes (anything else: ``trainer.extra``)."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int | None = None  # overrides the stage's own max_steps when set
    val_check_interval: int | None = None
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    enable_progress_bar: bool = True
    deterministic: bool = False
    resume: bool = False  # continue from <stage_dir>/checkpoints/last.ckpt when it exists
    checkpoint_every: int | None = None  # train steps between checkpoints (default: min(steps, 50))
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    """MLflow tracking: ``tracking_uri`` empty means $MLFLOW_TRACKING_URI, else SQLite in the run directory."""

    tracking_uri: str = ""
    experiment_name: str = "mchar"
    run_name: str = ""
    log_checkpoints: bool = True


@dataclass
class EvalConfig:
    """Evaluation at budget (stage ``eval``)."""

    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    history_multiple: int = 8
    # a fixed history length in tokens instead of history_multiple x budget: a budget sweep then scores the same
    # documents (and the same full-context reference) at every budget
    history_tokens: int | None = None
    documents: int = 8
    # held-out *retrieval* documents scored the same way, a second perplexity set (metrics ``ppl_retrieval/...``):
    # test-split files with retrieval episodes spliced in like the training mix (data.mix_tasks, data.mix_episodes),
    # the last answer data.mix_answer_tail tokens before the end, so the scored tokens depend on far context. The
    # code documents alone cannot show a memory's worth where the base gains nothing from far history; 0 = off
    retrieval_documents: int = 0
    # which held-out split the documents, retrieval documents and task haystacks come from: test (reported numbers) or
    # val (tuning a setting without looking at the test documents)
    split: str = "test"
    # each document is a window of one held-out file (false: files concatenated with EOS between, then cut)
    documents_within_files: bool = True
    final_tokens: int = 64
    tasks: list[str] = field(default_factory=list)
    task_lengths: list[int] = field(default_factory=list)
    task_examples: int = 8
    task_policies: list[str] = field(default_factory=list)  # empty: same as ``policies``
    task_output: str = "generate"  # generate (exact match) | loglikelihood (acc = answer is greedy)
    task_dir: str = ""  # lm-eval YAML folder; empty: the repository's evals/tasks
    # per-example task outcomes (task, doc id, target, the answer given, the metric, the doc's short fields such as
    # needle_depth) as task_samples_<policy>_<local|ruler>.jsonl beside the results: which examples a policy misses,
    # paired across policies on the same examples; the long context text is left out
    log_samples: bool = True
    ruler_tasks: list[str] = field(default_factory=list)  # e.g. niah_single_1, niah_multikey_2, ruler_vt
    ruler_lengths: list[int] = field(default_factory=list)
    refocus_every: int | None = None  # default: allocator.refocus_every, else one block
    full_context: bool = True  # also score the plain base on the whole document where it fits
    ci: str = "t"  # t | bootstrap (95 % interval of ΔNLL over documents)
    sink_blocks: int = 1
    oracle_horizon: int | None = None  # default: the next refocus_every tokens
    # the oracle (an eval-only upper bound, ~20x a policy's cost: it measures every entry's counterfactual at every
    # refocus) scores only the first N documents, so the policies can use many; None = all documents
    oracle_documents: int | None = None
    focus_map_policy: str = ""  # default: lensnet if evaluated, else the first policy
    gistnet_dir: str = ""  # explicit exported GistNet (default: the gistnet stage's result)
    lensnet_dir: str = ""  # explicit exported LensNet (default: the lensnet stage's result)
    # where the evaluation runs: auto = the trainer's accelerator (cuda with trainer=gpu/ddp/fsdp, else cpu);
    # or cpu / cuda / cuda:N
    device: str = "auto"
    # with an e2e LoRA adapter: full context, recency and sink_recent (raw tokens only) are scored on the base without
    # it, the frozen LM as it ships; false = every policy and the reference on the adapted base
    plain_baselines: bool = False


@dataclass
class RootConfig:
    """The whole run: which stages to execute and every group's settings."""

    name: str = "default"
    seed: int = 0
    stages: list[str] = field(default_factory=lambda: ["base_lm"])
    run_dir: str = "runs"
    artifacts_dir: str = "artifacts"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    gistnet: GistNetConfig = field(default_factory=GistNetConfig)
    lensnet: LensNetConfig = field(default_factory=LensNetConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    base_lm: BaseLMTrainConfig = field(default_factory=BaseLMTrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")


def _share(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: must be in [0, 1], got {value}")


PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""Names that become folder and file names (``artifacts/<stage>/<name>``, ``reports/<name>.md``)."""


def check_semantics(cfg: RootConfig) -> None:
    """Reject impossible combinations that types alone cannot catch."""
    for key, value in (("name", cfg.name), ("model.name", cfg.model.name)):
        if not PLAIN_NAME.match(value):
            raise ConfigError(
                f"{key}: {value!r} names folders and reports, so it must be a plain name (letters, digits, '_', '.', '-')"
            )
    for stage in cfg.stages:
        _choice("stages", stage, STAGES)
    _choice("model.kind", cfg.model.kind, ("local", "hf"))
    if cfg.model.kind == "hf" and not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path: required when model.kind=hf (a hub id or a local directory)")
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16", "auto"))
    t = cfg.tree
    if isinstance(t.block_size, bool) or t.block_size < 2:
        raise ConfigError(f"tree.block_size: must be an integer >= 2, got {t.block_size!r}")
    if t.depth < 1:
        raise ConfigError(f"tree.depth: must be >= 1, got {t.depth}")
    _choice("tree.storage", t.storage, ("memory", "disk"))
    _choice("tree.gist_dtype", t.gist_dtype, ("float32", "float16", "bfloat16"))
    _choice("tree.position_mode", t.position_mode, ("centre", "start", "end"))
    a = cfg.allocator
    if a.budget < t.block_size:
        raise ConfigError(
            f"allocator.budget: {a.budget} is smaller than one block (tree.block_size={t.block_size})"
        )
    _choice("allocator.policy", a.policy, POLICIES)
    _choice("allocator.group_score", a.group_score, ("mean", "max", "parent"))
    for p in cfg.eval.policies:
        _choice("eval.policies", p, POLICIES)
    _positive("allocator.n_diff", a.n_diff)
    _positive("allocator.query_rounds", a.query_rounds)
    if a.query_cooldown is not None and a.query_cooldown < 0:
        raise ConfigError(f"allocator.query_cooldown: must be >= 0 or null, got {a.query_cooldown}")
    if not a.query_similarity >= 0:
        raise ConfigError(f"allocator.query_similarity: must be >= 0, got {a.query_similarity}")
    if not a.query_recency >= 0:
        raise ConfigError(f"allocator.query_recency: must be >= 0, got {a.query_recency}")
    _choice("allocator.query_scorer", a.query_scorer, QUERY_SCORERS)
    if a.query_follow < 0:
        raise ConfigError(f"allocator.query_follow: must be >= 0, got {a.query_follow}")
    _choice("allocator.query_rebuild", a.query_rebuild, QUERY_REBUILDS)
    if a.query_tau_expand is not None and not math.isfinite(a.query_tau_expand):
        raise ConfigError(
            f"allocator.query_tau_expand: must be a finite number or null, got {a.query_tau_expand}"
        )
    if not a.query_idf_power > 0:
        raise ConfigError(f"allocator.query_idf_power: must be > 0, got {a.query_idf_power}")
    _positive("allocator.query_max_df", a.query_max_df, allow_none=True)
    _positive("allocator.attention_queries", a.attention_queries, allow_none=True)
    n_layers = cfg.model.local.num_layers
    if (
        a.attention_layer is not None
        and cfg.model.kind == "local"
        and not -n_layers <= a.attention_layer < n_layers
    ):
        raise ConfigError(
            f"allocator.attention_layer: {a.attention_layer} is out of range for the {n_layers}-layer base "
            f"(model.local.num_layers)"
        )
    if a.protect_recent < 0 or a.cooldown < 0:
        raise ConfigError("allocator.protect_recent/allocator.cooldown: must be >= 0")
    g = cfg.gistnet
    _choice("gistnet.kind", g.kind, ("transformer", "mean"))
    _choice("gistnet.pooling", g.pooling, ("mean", "query", "cls"))
    _choice("gistnet.head", g.head, ("linear", "mlp"))
    _choice("gistnet.loss", g.loss, ("kl", "nll", "kl+nll"))
    if g.width % g.heads:
        raise ConfigError(f"gistnet.width: {g.width} is not divisible by gistnet.heads={g.heads}")
    _choice("lensnet.loss", cfg.lensnet.loss, ("bradley_terry", "regression"))
    _choice("lensnet.utility", cfg.lensnet.utility, LENSNET_UTILITIES)
    _positive("lensnet.teacher_temperature", cfg.lensnet.teacher_temperature)
    if cfg.lensnet.teacher_gate is not None and not 0.0 <= cfg.lensnet.teacher_gate < 1.0:
        raise ConfigError(f"lensnet.teacher_gate: must be null or in [0, 1), got {cfg.lensnet.teacher_gate}")
    _choice("lensnet.pair_norm", cfg.lensnet.pair_norm, LENSNET_PAIR_NORMS)
    _choice("lensnet.pair_weight", cfg.lensnet.pair_weight, LENSNET_PAIR_WEIGHTS)
    for key, decay in (
        ("gistnet.ema_decay", cfg.gistnet.ema_decay),
        ("lensnet.ema_decay", cfg.lensnet.ema_decay),
    ):
        if decay is not None and not 0.0 < decay < 1.0:
            raise ConfigError(f"{key}: must be null or in (0, 1), got {decay}")
    _choice("lensnet.alloc_start", cfg.lensnet.alloc_start, ("recent", "coarsest"))
    _choice("e2e.schedule", cfg.e2e.schedule, ("alternate", "joint"))
    _share("gistnet.raw_prob", g.raw_prob)
    _share("gistnet.val_raw_prob", g.val_raw_prob)
    for key, n in (
        ("gistnet.keep_raw_blocks", g.keep_raw_blocks),
        ("gistnet.val_keep_raw_blocks", g.val_keep_raw_blocks),
        ("gistnet.upper_keep_raw_blocks", g.upper_keep_raw_blocks),
    ):
        if n < 0:
            raise ConfigError(f"{key}: must be >= 0, got {n}")
    if g.keep_raw_max is not None and g.keep_raw_max < g.keep_raw_blocks:
        raise ConfigError(
            f"gistnet.keep_raw_max: must be null or >= gistnet.keep_raw_blocks ({g.keep_raw_blocks}), got {g.keep_raw_max}"
        )
    if g.upper_weight < 0:
        raise ConfigError(f"gistnet.upper_weight: must be >= 0 (0 = off), got {g.upper_weight}")
    _share("gistnet.session_share", g.session_share)
    if g.session_edits < 0:
        raise ConfigError(f"gistnet.session_edits: must be >= 0, got {g.session_edits}")
    if cfg.base_lm.gist_exposure < 0:
        raise ConfigError(f"base_lm.gist_exposure: must be >= 0 (0 = off), got {cfg.base_lm.gist_exposure}")
    _share("base_lm.gist_exposure_session_share", cfg.base_lm.gist_exposure_session_share)
    _choice("base_lm.gist_exposure_summary", cfg.base_lm.gist_exposure_summary, ("mean", "gistnet"))
    if cfg.base_lm.gist_exposure_summary == "gistnet" and cfg.base_lm.gist_exposure == 0:
        raise ConfigError(
            "base_lm.gist_exposure_summary=gistnet: needs base_lm.gist_exposure > 0 (it trains on that loss)"
        )
    if not 0.0 <= cfg.base_lm.gist_exposure_raw_prob < 1.0:
        raise ConfigError(
            f"base_lm.gist_exposure_raw_prob: must be in [0, 1), got {cfg.base_lm.gist_exposure_raw_prob}"
        )
    _share("lensnet.on_policy", cfg.lensnet.on_policy)
    _share("lensnet.settle_states", cfg.lensnet.settle_states)
    if cfg.lensnet.settle_states > 0 and cfg.allocator.query_scorer != "lexical":
        raise ConfigError(
            "lensnet.settle_states: the training settle scores questions lexically; needs allocator.query_scorer=lexical"
        )
    _share("lensnet.random_fill", cfg.lensnet.random_fill)
    mix = cfg.lensnet.task_mix_fraction
    if mix is not None and not 0.0 <= mix < 1.0:
        raise ConfigError(f"lensnet.task_mix_fraction: must be in [0, 1), got {mix}")
    tail = cfg.lensnet.mix_answer_tail
    if tail is not None and not 0 <= tail < cfg.data.window // 2:
        raise ConfigError(f"lensnet.mix_answer_tail: must be in [0, data.window/2), got {tail}")
    _positive("gistnet.val_every", g.val_every, allow_none=True)
    _positive("lensnet.val_every", cfg.lensnet.val_every, allow_none=True)
    if cfg.lensnet.query_tokens < 0:
        raise ConfigError(f"lensnet.query_tokens: must be >= 0 (0 = off), got {cfg.lensnet.query_tokens}")
    if cfg.lensnet.recency_prior < 0:
        raise ConfigError(f"lensnet.recency_prior: must be >= 0 (0 = off), got {cfg.lensnet.recency_prior}")
    lc = cfg.lensnet
    for key in ("lexical_tokens", "lexical_lookback", "lexical_follow"):
        if getattr(lc, key) < 0:
            raise ConfigError(f"lensnet.{key}: must be >= 0, got {getattr(lc, key)}")
    if lc.lexical_idf_power <= 0:
        raise ConfigError(f"lensnet.lexical_idf_power: must be > 0, got {lc.lexical_idf_power}")
    if lc.lexical_max_df is not None and lc.lexical_max_df < 1:
        raise ConfigError(f"lensnet.lexical_max_df: must be >= 1 or null, got {lc.lexical_max_df}")
    _positive("lensnet.prior_lr_scale", lc.prior_lr_scale)
    if lc.raw_embedding not in LENSNET_RAW_EMBEDDINGS:
        raise ConfigError(
            f"lensnet.raw_embedding: must be one of {', '.join(LENSNET_RAW_EMBEDDINGS)}, got {lc.raw_embedding!r}"
        )
    for key, needs in (("similarity_prior", "query_tokens"), ("lexical_prior", "lexical_tokens")):
        if getattr(lc, key) and not (getattr(lc, needs) > 0 and lc.recency_prior > 0):
            raise ConfigError(f"lensnet.{key}: needs lensnet.{needs} > 0 and lensnet.recency_prior > 0")
    if cfg.lensnet.width % cfg.lensnet.heads:
        raise ConfigError(
            f"lensnet.width: {cfg.lensnet.width} is not divisible by lensnet.heads={cfg.lensnet.heads}"
        )
    d = cfg.data
    _positive("data.window", d.window)
    _positive("data.batch_size", d.batch_size)
    if len(d.split) != 3 or abs(sum(d.split) - 1.0) > 1e-6 or min(d.split) <= 0:
        raise ConfigError(f"data.split: need three positive fractions summing to 1, got {list(d.split)}")
    for t in d.mix_tasks:
        _choice("data.mix_tasks", t, MIX_TASKS)
    if not 0.0 <= d.task_mix_fraction < 1.0:  # some natural windows always: the validation split needs them
        raise ConfigError(f"data.task_mix_fraction: must be in [0, 1), got {d.task_mix_fraction}")
    b = cfg.base_lm
    if len(b.curriculum_windows) != len(b.curriculum_steps):
        raise ConfigError(
            "base_lm.curriculum_steps: need one step count per entry of base_lm.curriculum_windows, got "
            f"{list(b.curriculum_steps)} for {list(b.curriculum_windows)}"
        )
    for w, n in zip(b.curriculum_windows, b.curriculum_steps, strict=True):
        if not 2 <= w <= d.window or n < 1:
            raise ConfigError(
                f"base_lm.curriculum_windows: phase ({w} tokens, {n} steps) needs 2 <= window <= data.window"
                f"={d.window} and steps >= 1"
            )
    if b.copy_batch < 0 or (b.copy_batch and (b.copy_length < 16 or b.copy_pool < 2)):
        raise ConfigError(
            f"base_lm.copy_batch: need copy_batch >= 0 and, when on, copy_length >= 16 and copy_pool >= 2 (got "
            f"{b.copy_batch}, {b.copy_length}, {b.copy_pool})"
        )
    if b.copy_from_step < 0 or b.copy_only_steps < 0 or (b.copy_only_steps and not b.copy_batch):
        raise ConfigError(
            "base_lm.copy_only_steps: need copy_from_step >= 0, copy_only_steps >= 0 and copy_batch > 0 when "
            f"copy_only_steps is set (got {b.copy_from_step}, {b.copy_only_steps}, copy_batch={b.copy_batch})"
        )
    m = cfg.model.local
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.local.hidden_size: {m.hidden_size} not divisible by model.local.num_heads")
    if m.head_dim < 0 or m.head_dim % 2:
        raise ConfigError(
            f"model.local.head_dim: need 0 (hidden_size // num_heads) or a positive even number, got {m.head_dim}"
        )
    if m.induction_prior:
        from mchar.base.induction_prior import check_prior

        problem = check_prior(
            m.hidden_size,
            m.num_heads,
            m.num_layers,
            m.resolved_head_dim,
            m.rope_theta,
            m.max_positions,
        )
        if problem:
            raise ConfigError(f"model.local.induction_prior: {problem}")
    if cfg.model.kind == "local" and d.window > m.max_positions:
        raise ConfigError(f"data.window: {d.window} exceeds model.local.max_positions={m.max_positions}")
    e = cfg.eval
    if e.history_multiple < 1:
        raise ConfigError("eval.history_multiple: must be >= 1")
    _positive("eval.history_tokens", e.history_tokens, allow_none=True)
    _positive("eval.documents", e.documents)
    _choice("eval.split", e.split, ("test", "val"))
    if e.retrieval_documents < 0:
        raise ConfigError(f"eval.retrieval_documents: must be >= 0, got {e.retrieval_documents}")
    if e.retrieval_documents and not cfg.data.mix_tasks:
        raise ConfigError(
            "eval.retrieval_documents: data.mix_tasks is empty, so there are no episodes to splice in"
        )
    if e.retrieval_documents and cfg.data.mix_answer_tail >= e.final_tokens:
        raise ConfigError(
            f"eval.retrieval_documents: the last answer sits data.mix_answer_tail={cfg.data.mix_answer_tail} tokens "
            f"before a document's end, outside its eval.final_tokens={e.final_tokens} scored tokens"
        )
    _positive("eval.oracle_documents", e.oracle_documents, allow_none=True)
    _positive("eval.final_tokens", e.final_tokens)
    _positive("eval.task_examples", e.task_examples)
    _positive("eval.refocus_every", e.refocus_every, allow_none=True)
    for p in e.task_policies:  # "full": the plain base over the whole prompt, the reference accuracy
        _choice("eval.task_policies", p, (*POLICIES, "full"))
    if e.focus_map_policy:
        _choice("eval.focus_map_policy", e.focus_map_policy, POLICIES)
    for name in e.tasks:
        _choice("eval.tasks", name, EVAL_TASKS)
    for name in e.ruler_tasks:
        _choice("eval.ruler_tasks", name, RULER_TASKS)
    for n in [*e.task_lengths, *e.ruler_lengths]:
        _positive("eval.task_lengths/eval.ruler_lengths", n)
    if e.tasks and not e.task_lengths:
        raise ConfigError("eval.task_lengths: required when eval.tasks is set (e.g. [512, 1024, 2048])")
    if e.ruler_tasks and not e.ruler_lengths:
        raise ConfigError("eval.ruler_lengths: required when eval.ruler_tasks is set (e.g. [1024])")
    _choice("eval.task_output", e.task_output, ("generate", "loglikelihood"))
    _choice("eval.ci", e.ci, ("t", "bootstrap"))
    _positive("trainer.max_steps", cfg.trainer.max_steps, allow_none=True)
    _choice("trainer.precision", str(cfg.trainer.precision), PRECISIONS)
    strategy, accelerator = str(cfg.trainer.strategy).lower(), str(cfg.trainer.accelerator).lower()
    if strategy.startswith("fsdp") and accelerator == "cpu":
        raise ConfigError(
            f"trainer.strategy={cfg.trainer.strategy}: Lightning's FSDP needs GPUs (trainer.accelerator=gpu); "
            "on CPUs use trainer=ddp_cpu"
        )
    _check_training_numbers(cfg)
    if not EVAL_DEVICE.match(str(cfg.eval.device)):
        raise ConfigError(f"eval.device: {cfg.eval.device!r} is not one of auto, cpu, cuda, cuda:N")


# how LensNet's targets are measured (on the true next tokens, or in expectation under the full-context model) and
# how its pair loss is normalised; the LensNet module checks the same lists
LENSNET_UTILITIES = ("sampled", "expected", "mixed")
LENSNET_PAIR_NORMS = ("batch", "window")
LENSNET_PAIR_WEIGHTS = ("gap", "rank")
# mirrors mchar.core.lensnet.RAW_EMBEDDINGS (config stays torch-free; a test pins the two together)
LENSNET_RAW_EMBEDDINGS = ("mean", "gist")
EVAL_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# what lightning.Trainer(precision=...) accepts (lightning.fabric.plugins.precision.precision._PRECISION_INPUT), so a
# typo stops here and not in the first fit, after the corpus and tokenizer work (config.py imports no Lightning)
PRECISIONS = (
    "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64",
)  # fmt: skip


def eval_device(cfg: RootConfig) -> str:
    """The torch device of the evaluation: ``eval.device``, with ``auto`` following the trainer's accelerator."""
    if cfg.eval.device != "auto":
        return cfg.eval.device
    return "cuda" if str(cfg.trainer.accelerator).lower() in ("gpu", "cuda") else "cpu"


def _at_least(key: str, value: int | float, low: int | float) -> None:
    if isinstance(value, bool) or value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value!r}")


def _check_training_numbers(cfg: RootConfig) -> None:
    """Seeds, learning rates, step counts and net sizes: a negative ``max_steps`` means "no limit" to Lightning and a
    negative seed fails deep inside numpy, so both stop here in one line instead."""
    for key, seed in (
        ("seed", cfg.seed),
        ("data.split_seed", cfg.data.split_seed),
        ("data.val_seed", cfg.data.val_seed),
    ):
        if isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ConfigError(f"{key}: must be in [0, 2**32), got {seed!r}")
    g, ln, e, b = cfg.gistnet, cfg.lensnet, cfg.e2e, cfg.base_lm
    for key, lr in (("base_lm.lr", b.lr), ("gistnet.lr", g.lr), ("lensnet.lr", ln.lr), ("e2e.lr", e.lr)):
        _positive(key, lr)
    for key, value in (
        ("base_lm.max_steps", b.max_steps),
        ("gistnet.max_steps", g.max_steps),
        ("lensnet.max_steps", ln.max_steps),
        ("e2e.max_steps", e.max_steps),
        ("base_lm.warmup_steps", b.warmup_steps),
        ("gistnet.warmup_steps", g.warmup_steps),
        ("lensnet.warmup_steps", ln.warmup_steps),
        ("base_lm.weight_decay", b.weight_decay),
        ("gistnet.weight_decay", g.weight_decay),
        ("lensnet.weight_decay", ln.weight_decay),
        ("lensnet.random_edits", ln.random_edits),
        ("lensnet.tail_tokens", ln.tail_tokens),
    ):
        _at_least(key, value, 0)
    for key, value in (
        ("gistnet.layers", g.layers),
        ("gistnet.heads", g.heads),
        ("gistnet.width", g.width),
        ("gistnet.horizon", g.horizon),
        ("gistnet.val_windows", g.val_windows),
        ("lensnet.layers", ln.layers),
        ("lensnet.heads", ln.heads),
        ("lensnet.width", ln.width),
        ("lensnet.horizon", ln.horizon),
        ("lensnet.alloc_rounds", ln.alloc_rounds),
        ("lensnet.val_windows", ln.val_windows),
        ("lensnet.val_wc_draws", ln.val_wc_draws),
        ("e2e.lora_rank", e.lora_rank),
    ):
        _at_least(key, value, 1)
    _at_least("lensnet.candidates", ln.candidates, 2)  # a ranking needs two entries
    _positive("e2e.lora_alpha", e.lora_alpha)
