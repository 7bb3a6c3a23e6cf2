#!/bin/bash
# Container health check: GET /healthz on pgrelay's metrics listener; healthy on HTTP 200.
#
# The runtime image has no curl or wget, on purpose (nothing to fetch with, fewer packages to
# patch), and bash's /dev/tcp is enough for one GET. Orchestrators with their own HTTP probes
# (Kubernetes: see docker/k8s/statefulset.yaml) do not use this.
#
# PGRELAY_HEALTH_ADDR: the address to ask, default 127.0.0.1:9930. It must match the port of
# server.metrics_listen; with metrics_listen = "" there is no endpoint and the check fails.
set -u

addr=${PGRELAY_HEALTH_ADDR:-127.0.0.1:9930}
host=${addr%:*}
port=${addr##*:}
host=${host#[}
host=${host%]}

exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$addr" >&3
# "HTTP/1.1 200 OK"
IFS=' ' read -r -t 2 _version status _reason <&3 || exit 1
[ "$status" = 200 ]
