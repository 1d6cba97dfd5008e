#!/bin/sh
# Runs one service by name: entrypoint.sh launch|config|notify|analytics
set -eu
case "${1:-}" in
    config | launch | notify | analytics) exec python -m "services.$1" ;;
    *)
        echo "usage: IMAGE config|launch|notify|analytics" >&2
        exit 64
        ;;
esac
