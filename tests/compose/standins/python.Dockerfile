# Stand-in for python:3.11-slim-bookworm where Docker Hub is unreachable (tests/compose/run.py):
# Debian's python3 (3.11 on bookworm) on a debootstrap minbase image, with a virtualenv first on PATH so
# that `pip install` works as in the official image (no PEP 668 "externally managed" refusal).
ARG BASE=slmcl-standin/debian:bookworm-minbase
FROM ${BASE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["python3"]
