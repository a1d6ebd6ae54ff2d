"""The keys of summary.json and metrics.jsonl — defined here once; run.py writes them, the CLI prints them,
dptrain-report reads them, the tests check them.

The key strings are a published format (other tools read summary.json): add keys, never rename one.
"""

from __future__ import annotations

# results
TEST_ACC = "test/acc"
TEST_LOSS = "test/loss"  # metrics.jsonl only
TRAIN_LOSS = "train/loss"
TRAIN_ACC = "train/acc"  # the epoch's accuracy on the examples trained on (ledger.py: noised under dp metrics)

# the privacy budget, fixed before training (budget.Budget.summary writes them, in this order)
EPS = "privacy/eps"  # the target ε; None when σ was given
DELTA = "privacy/delta"
NOISE_MULTIPLIER = "privacy/noise_multiplier"
ACCOUNTANT = "privacy/accountant"
SAMPLING = "privacy/sampling"
EPS_GUARANTEED = "privacy/eps_guaranteed"  # False under shuffle sampling: the accountant assumes Poisson
SECURE = "privacy/secure"  # sampler and noise drawn from OS entropy (privacy.secure), not from the seed
SECURE_NOISE = "privacy/secure_noise"  # deprecated, kept for readers of older summaries: equals SECURE
SAMPLE_RATE = "privacy/sample_rate"
STEPS = "privacy/steps"
EPS_SPENT = "privacy/eps_spent"  # the accountant's ε for the steps taken (also per epoch in metrics.jsonl)
# mechanisms run on the training examples before training, [σ, q, steps] each (dataset.normalize=dp's statistics);
# EPS_SPENT is their composition with training's steps. [] when none
PRIOR = "privacy/prior"
# every release derived from the private examples (ledger.py): model, DP statistics, training and validation metrics,
# one row each {release, what, mechanism, noise_multiplier, sample_rate, steps, ..., eps_alone, eps_marginal};
# EPS_SPENT composes them all. None for a non-private run
LEDGER = "privacy/ledger"
# releases made outside ε (log.train_metrics=nonprivate: "training metrics"; log.val_metrics=nonprivate on a held-out
# private split: "validation metrics"): [] when ε covers everything the run wrote
EPS_EXCLUDES = "privacy/eps_excludes"
PRIVACY = (EPS, DELTA, NOISE_MULTIPLIER, ACCOUNTANT, SAMPLING, EPS_GUARANTEED, SECURE, SECURE_NOISE, SAMPLE_RATE,
           STEPS, EPS_SPENT, PRIOR, LEDGER, EPS_EXCLUDES)
STREAMS = "privacy/streams"  # where each random stream came from (privacy/streams.py: seed keys, or OS entropy)
# model.checkpoint's provenance (models.checkpoint_provenance): path, and when it came from a dptrain run, that
# run's ε spent, δ, dataset, ... (its own checkpoint's nested); None without a checkpoint
CHECKPOINT = "privacy/checkpoint"
CHECKPOINT_EPS_SPENT = "privacy/checkpoint_eps_spent"  # that run's ε spent: it composes with ours if data overlap

# performance
SAMPLES_PER_S = "perf/samples_per_s"
PEAK_MEM_MB = "perf/peak_mem_mb"  # this run's peak from its start (tracking.py): CUDA max allocated, else peak RSS
STEP_MS = "perf/step_ms"  # median over the run's optimizer steps

# what ran, where
ENGINE, MODEL, DATASET = "engine", "model", "dataset"
VAL_SUFFIX = "-val"  # DATASET + this: a run on a held-out split of that training set (dataset.val_fraction > 0)
# where the weights came from (finetune.weights_from): "fine-tuned from <timm weights tag>", "fine-tuned from
# checkpoint <file>" or "from scratch"; model.trainable (all, head, bias, lora) and the parameters it trains
INIT, TRAINABLE, TRAINABLE_PARAMS = "model/init", "model/trainable", "model/trainable_params"
EPOCH, STEP = "epoch", "step"  # metrics.jsonl: this line's epoch and the optimizer steps so far
# epochs trained, as expected passes over the training set: epoch k ends at step round(k / q) (epochs._epoch_end), and a
# partial last epoch counts its fraction of steps: a run of config.epochs = 15 reports 15
EPOCHS = "epochs"
WALL_S, DEVICE, MACHINE, COMMIT = "wall_s", "device", "machine", "commit"
# provenance (tracking.git_state): whether the tracked files differed from COMMIT, and the sha256 of `git diff HEAD`
COMMIT_DIRTY, COMMIT_DIFF = "commit_dirty", "commit_diff_sha256"
NAME = "name"  # the run name: outputs/<name>/..., and the report's table name
CONFIG = "config"  # the resolved config
RESUMED = "resumed"  # one {step, commit, at} per resume (resume=<run dir>, checkpoint.py); [] if never interrupted
WARNINGS = "warnings"  # what the run found suspicious and logged as WARNING (a diverging loss, run.py); [] if nothing

# summary.json's keys, in file order
SUMMARY = (TEST_ACC, TRAIN_LOSS, TRAIN_ACC, *PRIVACY, STREAMS, CHECKPOINT, CHECKPOINT_EPS_SPENT, SAMPLES_PER_S,
           PEAK_MEM_MB, STEP_MS, ENGINE, MODEL, INIT, TRAINABLE, TRAINABLE_PARAMS, DATASET, EPOCHS, WALL_S, DEVICE,
           MACHINE, COMMIT, COMMIT_DIRTY, COMMIT_DIFF, NAME, RESUMED, WARNINGS, CONFIG)
METRICS = (EPOCH, STEP, TRAIN_LOSS, TRAIN_ACC, TEST_ACC, TEST_LOSS, EPS_SPENT)  # one metrics.jsonl line


# failed.json, written instead of summary.json when a run stops after its budget began to be spent (a divergence):
# what went wrong, the steps that count as spent (STEP) and the privacy keys with the ε of those steps
STATUS = "status"  # "failed"
ERROR = "error"  # the one-line error
FAILED = (STATUS, ERROR, STEP, *PRIVACY, ENGINE, MODEL, DATASET, WALL_S, COMMIT, COMMIT_DIRTY, COMMIT_DIFF, NAME,
          CONFIG)


def column(key: str) -> str:
    """A key's dptrain-report csv column: privacy/ and perf/ drop their prefix (eps_spent, step_ms); the others
    join with "_" (test_acc)."""
    group, _, rest = key.rpartition("/")
    return rest if group in ("privacy", "perf") else key.replace("/", "_")


# the summary keys dptrain-report tabulates, in csv column order
REPORTED = (MODEL, DATASET, ENGINE, EPS, EPS_SPENT, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, ACCOUNTANT,
            SAMPLING, TEST_ACC, TRAIN_LOSS, SAMPLES_PER_S, STEP_MS, PEAK_MEM_MB, WALL_S, COMMIT, MACHINE,
            CHECKPOINT_EPS_SPENT, TRAIN_ACC, COMMIT_DIRTY)
COLUMNS = {column(k): k for k in REPORTED}  # csv column → summary key
