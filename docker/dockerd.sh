#!/usr/bin/env bash
# A private Docker daemon for building and running crfr's images on a machine without one.
#
#   docker/dockerd.sh start    # start it unless it answers; prints `export DOCKER_HOST=...`
#   docker/dockerd.sh stop     # stop the daemon this script started
#   docker/dockerd.sh env      # print `export DOCKER_HOST=...`
#
# Networking features that would touch the host's network rules are off: no bridge, no iptables, no IP
# forwarding or masquerading. Containers then run with the host network (`--network host`) or none, and reach
# only 127.0.0.1. All state (data, exec root, socket, pid file, log) lives under $CRFR_DOCKER_ROOT
# (default /tmp/crfr-docker); the socket is private, so a system daemon's /var/run/docker.sock is never touched.
set -euo pipefail

ROOT=${CRFR_DOCKER_ROOT:-/tmp/crfr-docker}
SOCK="unix://$ROOT/docker.sock"
PIDFILE="$ROOT/dockerd.pid"

answers() { DOCKER_HOST="$SOCK" docker info >/dev/null 2>&1; }

case "${1:-}" in
  start)
    if answers; then echo "export DOCKER_HOST=$SOCK"; exit 0; fi
    command -v dockerd >/dev/null || { echo "dockerd not found: apt-get install docker.io" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "dockerd needs root" >&2; exit 1; }
    mkdir -p "$ROOT/data" "$ROOT/exec"
    # setsid: the daemon outlives the shell that started it (the build script, a test), until `stop`.
    setsid dockerd --host "$SOCK" --data-root "$ROOT/data" --exec-root "$ROOT/exec" --pidfile "$PIDFILE" \
      --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
      >"$ROOT/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 60); do answers && break; sleep 1; done
    answers || { echo "dockerd did not come up; see $ROOT/dockerd.log" >&2; exit 1; }
    echo "export DOCKER_HOST=$SOCK"
    ;;
  stop)
    [ -f "$PIDFILE" ] || exit 0
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    ;;
  env)
    echo "export DOCKER_HOST=$SOCK"
    ;;
  *)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
