"""Service settings from the environment (the compose file and `make stack` set them).

One frozen dataclass, read once at start-up, so a typo in a variable fails loudly at boot
rather than at the first job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_limit(name: str, default: int) -> int:
    """A positive whole number; a bad value stops the service at boot with one line naming the variable."""
    text = os.environ.get(name, "").strip().replace("_", "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SystemExit(f"{name}={os.environ[name]!r}: expected a whole number") from None
    if value < 1:
        raise SystemExit(f"{name}={value}: must be >= 1")
    return value


MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    redis_url: str = field(default_factory=lambda: _env("SLMCL_REDIS_URL", "redis://127.0.0.1:6379/0"))
    s3_endpoint: str = field(default_factory=lambda: _env("SLMCL_S3_ENDPOINT", "127.0.0.1:9000"))
    s3_access_key: str = field(default_factory=lambda: _env("SLMCL_S3_ACCESS_KEY", ""))
    s3_secret_key: str = field(default_factory=lambda: _env("SLMCL_S3_SECRET_KEY", ""))
    s3_bucket: str = field(default_factory=lambda: _env("SLMCL_S3_BUCKET", "slmcl"))
    s3_secure: bool = field(default_factory=lambda: _env("SLMCL_S3_SECURE", "0") in ("1", "true", "yes"))
    s3_region: str = field(default_factory=lambda: _env("SLMCL_S3_REGION", "us-east-1"))
    # Where services cache datasets and adapters pulled from the store.
    work_dir: str = field(default_factory=lambda: _env("SLMCL_WORK_DIR", os.path.expanduser("~/.cache/slmcl/work")))
    queue: str = field(default_factory=lambda: _env("SLMCL_QUEUE", "slmcl-train"))
    # Evaluator replicas the monitor fans out to: "host:port,host:port" or "dns:///evaluator:50052".
    evaluators: str = field(default_factory=lambda: _env("SLMCL_EVALUATORS", "127.0.0.1:50052"))
    # Stages the monitor measures at once (each waits on its evaluation requests, which run elsewhere).
    monitor_stage_workers: int = field(default_factory=lambda: _env_limit("SLMCL_MONITOR_STAGE_WORKERS", 16))
    eval_shards_per_task: int = field(default_factory=lambda: _env_limit("SLMCL_EVAL_SHARDS_PER_TASK", 1))
    monitor_address: str = field(default_factory=lambda: _env("SLMCL_MONITOR_ADDRESS", "127.0.0.1:50051"))
    device: str = field(default_factory=lambda: _env("SLMCL_DEVICE", "auto"))
    # Where artifacts live, for slmcl.storage.factory.open_store: $SLMCL_STORE_URL, else the bucket of the
    # SLMCL_S3_* settings above (credentials stay in the environment, out of the URL, which may be logged).
    store_url: str = field(default_factory=lambda: _env("SLMCL_STORE_URL", ""))
    # Limits of what one client may ask of the monitor (refused with RESOURCE_EXHAUSTED before anything is written).
    # The largest request the monitor receives (gRPC max receive length): a spec with its dataset files.
    max_request_bytes: int = field(default_factory=lambda: _env_limit("SLMCL_MAX_REQUEST_BYTES", 256 * MIB))
    # One dataset file of a submitted spec: its size and its rows.
    max_dataset_bytes: int = field(default_factory=lambda: _env_limit("SLMCL_MAX_DATASET_BYTES", 128 * MIB))
    max_dataset_rows: int = field(default_factory=lambda: _env_limit("SLMCL_MAX_DATASET_ROWS", 1_000_000))
    # Experiments queued or running at once, over all clients.
    max_experiments_in_flight: int = field(default_factory=lambda: _env_limit("SLMCL_MAX_EXPERIMENTS_IN_FLIGHT", 16))
    # Runs of one experiment: len(strategies) x len(orders) x len(seeds).
    max_runs_per_experiment: int = field(default_factory=lambda: _env_limit("SLMCL_MAX_RUNS_PER_EXPERIMENT", 64))

    def __post_init__(self) -> None:
        if not self.store_url:  # frozen: the derived default is set once, here
            object.__setattr__(self, "store_url", f"s3://{self.s3_bucket}?endpoint={self.s3_endpoint}"
                               f"&secure={int(self.s3_secure)}&region={self.s3_region}")

    def require_s3(self) -> None:
        if not self.s3_access_key or not self.s3_secret_key:
            raise SystemExit("SLMCL_S3_ACCESS_KEY and SLMCL_S3_SECRET_KEY must be set (see .env.example)")
