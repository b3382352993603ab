"""The one place that names where things live, in the object store and in Redis.

Object store (bucket ``$SLMCL_S3_BUCKET``), the source of truth:

    datasets/<sha256>.json                               dataset files, content-addressed
    experiments/<id>/experiment.json                     id, name, client request id, created_at
    experiments/<id>/spec.json                           the resolved spec (dataset paths are store: keys)
    experiments/<id>/checkpoints/<run_id>/step-<k>/      PEFT adapter (adapter_config.json, adapter_model.safetensors)
    experiments/<id>/runs/<run_id>/trained-<k>.json      training record of stage k (losses, tokens, seconds)
    experiments/<id>/runs/<run_id>/stage-<k>.json        committed stage record (scores + stability), as in `slmcl run`
    experiments/<id>/predictions/<run_id>/step-<k>/<task>.jsonl
    experiments/<id>/{scores.csv,stability.csv,train_loss.csv,summary.json}
    experiments/<id>/cache/...                           base evaluation and base distributions

Everything under ``experiments/<id>/`` is the results directory of ``slmcl run``.

Redis (live state and queues only):

    slmcl:experiments                 sorted set of experiment ids by creation time
    slmcl:experiment:<id>             hash: state, error, updated_at
    slmcl:request:<client_request_id> -> experiment id (idempotent submit)
    slmcl:events:<id>                 stream of ExperimentEvent fields (watch replays it)
    slmcl:stage-events                stream of "stage trained" notices, consumer group "monitor"
    slmcl:cancel:<id>                 set when the experiment is cancelled
    slmcl:stage-published:<id>        hash "<run_id>/<k>" -> stage-event id: each stage is announced once
"""

from __future__ import annotations

STORE_PREFIX = "store:"  # dataset paths in a service spec: "store:datasets/<sha>.json"

EXPERIMENTS_ZSET = "slmcl:experiments"
STAGE_EVENTS_STREAM = "slmcl:stage-events"
MONITOR_GROUP = "monitor"


def dataset_key(sha256: str) -> str:
    return f"datasets/{sha256}.json"


def experiment_prefix(exp_id: str) -> str:
    return f"experiments/{exp_id}"


def trained_key(run_id: str, step: int) -> str:
    return f"runs/{run_id}/trained-{step}.json"


def experiment_hash(exp_id: str) -> str:
    return f"slmcl:experiment:{exp_id}"


def request_key(client_request_id: str) -> str:
    return f"slmcl:request:{client_request_id}"


def events_stream(exp_id: str) -> str:
    return f"slmcl:events:{exp_id}"


def cancel_key(exp_id: str) -> str:
    return f"slmcl:cancel:{exp_id}"


def train_job_id(exp_id: str, run_id: str) -> str:
    return f"train-{exp_id}-{run_id}".replace(".", "_")


def stage_published_key(exp_id: str) -> str:
    return f"slmcl:stage-published:{exp_id}"
