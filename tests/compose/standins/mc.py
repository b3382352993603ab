#!/usr/local/python/bin/python
"""`mc` stand-in: `ready ALIAS`, `alias set NAME URL KEY SECRET`, `mb [--ignore-existing] NAME/BUCKET`."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ALIASES = Path(os.environ.get("HOME", "/root")) / ".mc-standin.json"


def ready(url: str) -> int:
    try:
        urllib.request.urlopen(url, timeout=3)
    except urllib.error.HTTPError:
        pass  # 403 without credentials: the gateway answers
    except OSError as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    aliases = json.loads(ALIASES.read_text()) if ALIASES.exists() else {}
    if argv[:1] == ["ready"]:
        name = argv[1] if len(argv) > 1 else "local"
        return ready(aliases.get(name, {}).get("url", "http://127.0.0.1:9000"))
    if argv[:2] == ["alias", "set"] and len(argv) == 6:
        aliases[argv[2]] = {"url": argv[3], "key": argv[4], "secret": argv[5]}
        ALIASES.write_text(json.dumps(aliases))
        ALIASES.chmod(0o600)
        print(f"Added `{argv[2]}` successfully.")
        return 0
    if argv[:1] == ["mb"]:
        from minio import Minio

        target = [a for a in argv[1:] if not a.startswith("--")][0]
        name, _, bucket = target.partition("/")
        alias = aliases[name]
        url = urllib.parse.urlparse(alias["url"])
        client = Minio(url.netloc, alias["key"], alias["secret"], secure=url.scheme == "https")
        if client.bucket_exists(bucket):
            if "--ignore-existing" in argv:
                print(f"Bucket `{target}` already exists.")
                return 0
            print(f"mc: bucket {target} exists", file=sys.stderr)
            return 1
        client.make_bucket(bucket)
        print(f"Bucket created successfully `{target}`.")
        return 0
    print(f"mc stand-in: unsupported: {' '.join(argv)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
