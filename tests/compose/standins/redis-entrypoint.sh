#!/bin/sh
# redis-server with protected mode off unless a config file is given, as the official image does.
set -e
if [ "$1" = redis-server ]; then
    case "$2" in
        *.conf) ;;
        *) shift; set -- redis-server "$@" --protected-mode no ;;
    esac
fi
exec "$@"
