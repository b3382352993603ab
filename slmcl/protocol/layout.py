"""Where everything of an experiment lives in a store: the one module that spells keys.

A results tree is the same in both modes: ``slmcl run`` writes it into its output directory,
the services write it under ``experiments/<id>/`` of the object store. Every reader and
writer builds keys with these functions, so a layout change is one edit here.

::

    spec.json, spec.yaml                       the resolved spec (services: dataset paths are store: keys)
    .slmcl-results, data.json                  slmcl run: the marker of a results directory; the data files' hashes
    environment.json, report/                  slmcl run: device and versions; the report (slmcl.report)
    experiment.json                            services: id, name, client request id, created_at
    checkpoints/<run_id>/step-<k>/             PEFT adapter, or a merged model folder (OSF); + strategy_state.*
    runs/<run_id>/trained-<k>.json             training record of stage k (losses, tokens, seconds)
    runs/<run_id>/stage-<k>.json               committed stage record (scores + drift): the commit point
    runs/<run_id>/stopped.json                 the stability policy ended the run after this step
    predictions/<run_id>/step-<k>/<task>.jsonl per-example predictions (run "base", step 0: the base model)
    scores.csv, stability.csv, train_loss.csv, summary.json,
    comparison.csv, comparison.md,
    interventions.csv, estimates.csv,
    drift_attribution.csv, per_task.csv,
    per_task_steps.csv, reference_accuracy.csv tables rebuilt from the stage records
    tracking.json                              the tracker runs these results are mirrored to (tracking.mlflow)

Store-wide (outside any experiment): ``datasets/<sha256>.json`` (content-addressed uploads) and
``cache/`` (base evaluations and base distributions, keyed by what they depend on).
"""

from __future__ import annotations

from collections.abc import Sequence

SPEC_JSON = "spec.json"
# Written by `slmcl run` when it starts a results directory: a folder without it (and without the spec.json + runs/
# of results made before the marker existed) is the user's, and slmcl writes nothing into it.
RESULTS_MARKER = ".slmcl-results"
DATA_JSON = "data.json"  # sha256, rows and bytes of every data file the results were made from (checked on resume)
SPEC_YAML = "spec.yaml"
EXPERIMENT_JSON = "experiment.json"
ENVIRONMENT_JSON = "environment.json"  # slmcl run: device and versions the results were computed with
TRACKING_JSON = "tracking.json"  # the MLflow parent run the results are mirrored to (slmcl.tracking)
REPORT_DIR = "report"  # slmcl run writes its report (index.html, tables/, figures/) here
TABLES = ("scores.csv", "stability.csv", "train_loss.csv", "summary.json", "comparison.csv", "comparison.md",
          "interventions.csv", "estimates.csv", "drift_attribution.csv", "per_task.csv",
          "per_task_steps.csv", "reference_accuracy.csv")
BASE_RUN = "base"  # the predictions of step 0 are the base model's, shared by every run
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a LoRA checkpoint is complete when both exist
MERGED_FILES = ("config.json", "model.safetensors")  # a merged-model checkpoint (OSF) is complete when both exist
DEFAULT_STRATEGY = "lora"  # the study's method: its run ids carry no strategy label


def checkpoint_complete(names: set[str] | frozenset[str]) -> bool:
    """Whether a checkpoint folder's file names (relative to it) make a complete checkpoint of either format."""
    return all(f in names for f in ADAPTER_FILES) or all(f in names for f in MERGED_FILES)


def order_id(order: Sequence[str]) -> str:
    return ".".join(order)  # '.' never appears in a task name (the spec refuses it)


def run_id(order: Sequence[str], seed: int, strategy: str = DEFAULT_STRATEGY, model: str = "") -> str:
    """``<order>-s<seed>`` for the study's method, ``<order>-s<seed>-<label>`` for any other strategy entry;
    ``-m<model label>`` after it when the experiment has several models."""
    base = f"{order_id(order)}-s{seed}"
    base = base if strategy == DEFAULT_STRATEGY else f"{base}-{strategy}"
    return f"{base}-m{model}" if model else base


def base_run(model: str = "") -> str:
    """Where the base model's predictions go: ``base``, or ``base-<model label>`` with several models."""
    return f"{BASE_RUN}-{model}" if model else BASE_RUN


def stage_key(rid: str, step: int) -> str:
    return f"runs/{rid}/stage-{step}.json"


def trained_key(rid: str, step: int) -> str:
    return f"runs/{rid}/trained-{step}.json"


def stopped_key(rid: str) -> str:
    """Written when the stability policy stopped run ``rid``: the step it ended after (no later stage exists)."""
    return f"runs/{rid}/stopped.json"


def runs_prefix(rid: str | None = None) -> str:
    return f"runs/{rid}" if rid else "runs"


def checkpoint_prefix(rid: str, step: int) -> str:
    return f"checkpoints/{rid}/step-{step}"


def predictions_key(rid: str, step: int, task: str) -> str:
    return f"predictions/{rid}/step-{step}/{task}.jsonl"


def is_stage_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith("stage-")


def is_trained_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith("trained-")


# -- store-wide keys ----------------------------------------------------------------------


def experiment_prefix(exp_id: str) -> str:
    return f"experiments/{exp_id}"


def dataset_key(sha256: str) -> str:
    return f"datasets/{sha256}.json"


def base_eval_cache_key(fingerprint: str, shard: str = "") -> str:
    """A base evaluation, keyed by everything it depends on (model, test bytes, rendering, decoding)."""
    return f"cache/base-eval/{fingerprint}{'-' + shard if shard else ''}.json"


def base_reference_logp_key(fingerprint: str) -> str:
    """The base model's next-token log-probabilities on a reference set (p_0 of the drift)."""
    return f"cache/base-reference-logp/{fingerprint}.safetensors"
