"""The names of things in Redis (live state and queues only).

Keys of the object store, the source of truth, are the core's: ``slmcl.protocol.layout`` (everything
under ``experiments/<id>/`` is the results tree of ``slmcl run``; datasets and caches beside it).


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
