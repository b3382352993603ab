# Stand-in for redis:7.4: Debian's redis-server (7.0) and redis-cli. Like the official image, the
# server runs in /data and, given no config file, with protected mode off (other containers connect).
ARG BASE=slmcl-standin/debian:bookworm-minbase
FROM ${BASE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["/bin/sh", "/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
