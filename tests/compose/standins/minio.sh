#!/bin/sh
# `minio server DIR [--console-address ADDR]` -> SeaweedFS `weed mini` with its S3 gateway on :9000.
set -e
[ "$1" = server ] || { echo "minio stand-in: only 'server DIR' is supported" >&2; exit 2; }
dir="${2:-/data}"
mkdir -p "$dir/weed" "$dir/logs"
export AWS_ACCESS_KEY_ID="${MINIO_ROOT_USER:?MINIO_ROOT_USER is required}"
export AWS_SECRET_ACCESS_KEY="${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is required}"
cd "$dir"
exec weed -logdir="$dir/logs" mini -dir="$dir/weed" -ip=127.0.0.1 -ip.bind=0.0.0.0 -s3.port=9000 \
    -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0
