#!/usr/bin/env bash
# pgbench across a socket takeover (`pgrelay run --takeover`): does any login or
# transaction fail while one pgrelay process hands its listening socket to another?
#
# Starts `pgrelay demo` only for its PostgreSQL primary, then a pgrelay of its own in
# front of it (transaction mode unless POOL_MODE says otherwise, takeover_socket set), and
# runs, one after the other:
#
#   1. pgbench -C -c 20 -T 30   (a new login for every transaction)
#   2. pgbench    -c 50 -T 30   (50 connections held for the whole run)
#
# TAKEOVER_AT seconds into each run, a new process takes over with --takeover; the
# script prints pgbench's summary, its exit code, and the old process's exit code.
#
# Usage: scripts/takeover_pgbench.sh
# Environment: PGBIN (/usr/lib/postgresql/15/bin), PGRELAY (target/release/pgrelay; the
# new process may be another binary: PGRELAY_NEW, default the same), SECONDS_PER_RUN (30),
# TAKEOVER_AT (10), POOL_MODE (transaction; with session, each of the 50 clients holds a
# server connection, which moves with it) and POOL_SIZE (20; 60 in session mode).
#
# Everything it starts is ended on exit, and every wait is bounded.

set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGRELAY=${PGRELAY:-target/release/pgrelay}
PGRELAY_NEW=${PGRELAY_NEW:-$PGRELAY}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-30}
TAKEOVER_AT=${TAKEOVER_AT:-10}
POOL_MODE=${POOL_MODE:-transaction}
if [[ $POOL_MODE == session ]]; then POOL_SIZE=${POOL_SIZE:-60}; else POOL_SIZE=${POOL_SIZE:-20}; fi

for program in "$PGRELAY" "$PGRELAY_NEW" "$PGBIN/pgbench" "$PGBIN/pg_isready"; do
    [[ -x $program ]] || { echo "not found or not executable: $program" >&2; exit 2; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/takeover_pgbench.XXXXXX")
DEMO_PID=""
RELAY_PID=""
PGBENCH_PID=""

log() { echo "[$(date +%T)] $*" >&2; }

# Ends a process this script started, by its id, and waits (bounded) until it is gone.
end_process() {
    local pid=$1 signal=${2:-TERM}
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    set +e
    end_process "$PGBENCH_PID" INT
    end_process "$RELAY_PID"
    end_process "$DEMO_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DEMO_PORT=$(free_port)
PORT=$(free_port)

log "starting pgrelay demo (for its primary)"
"$PGRELAY" demo --port "$DEMO_PORT" >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
for _ in $(seq 1200); do
    grep -q "Press Ctrl-C" "$WORK/demo.out" 2>/dev/null && break
    kill -0 "$DEMO_PID" 2>/dev/null || { cat "$WORK/demo.out" "$WORK/demo.err" >&2; exit 1; }
    sleep 0.1
done
grep -q "Press Ctrl-C" "$WORK/demo.out" || { echo "pgrelay demo did not start within 120 s" >&2; exit 1; }
PRIMARY_ADDR=$(awk '$1 == "primary" { print $2 }' "$WORK/demo.out")
PRIMARY_PORT=${PRIMARY_ADDR##*:}

export PGPASSWORD=app PGCONNECT_TIMEOUT=10
log "pgbench -i on the primary ($PRIMARY_ADDR)"
timeout 120 "$PGBIN/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$PRIMARY_PORT" -U app app >"$WORK/init.out" 2>&1 \
    || { cat "$WORK/init.out" >&2; exit 1; }

SOCKET=$WORK/takeover.sock
cat >"$WORK/pgrelay.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
metrics_listen = ""
shutdown_timeout = "20s"
takeover_socket = "$SOCKET"

[pool]
mode = "$POOL_MODE"
size = $POOL_SIZE

[[users]]
name = "app"
password = "app"

[databases.app]
primary = "$PRIMARY_ADDR"
EOF

GENERATION=0
start_first() {
    "$PGRELAY" run -c "$WORK/pgrelay.toml" 2>"$WORK/relay.$GENERATION.log" &
    RELAY_PID=$!
    for _ in $(seq 200); do
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" && return 0
        sleep 0.1
    done
    echo "pgrelay did not start" >&2
    cat "$WORK/relay.$GENERATION.log" >&2
    exit 1
}

# Starts the next process with --takeover; waits for the old one and prints its exit code.
take_over() {
    local old=$RELAY_PID
    GENERATION=$((GENERATION + 1))
    log "takeover: new process (generation $GENERATION) from $PGRELAY_NEW"
    "$PGRELAY_NEW" run -c "$WORK/pgrelay.toml" --takeover "$SOCKET" 2>"$WORK/relay.$GENERATION.log" &
    RELAY_PID=$!
    local status=0
    # The old process is a child of this shell: `wait` gives its exit code.
    timeout 60 tail --pid="$old" -f /dev/null || true
    wait "$old" || status=$?
    log "the old process exited with $status"
    echo "old process exit code: $status"
}

run_pgbench() {
    local name=$1
    shift
    log "pgbench $* -T $SECONDS_PER_RUN (takeover at ${TAKEOVER_AT}s)"
    "$PGBIN/pgbench" "$@" -j 2 -T "$SECONDS_PER_RUN" -h 127.0.0.1 -p "$PORT" -U app app \
        >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PGBENCH_PID=$!
    sleep "$TAKEOVER_AT"
    take_over
    local status=0
    wait "$PGBENCH_PID" || status=$?
    PGBENCH_PID=""
    echo "== pgbench $* -T $SECONDS_PER_RUN: exit code $status"
    grep -E "number of (transactions actually processed|failed transactions)|^tps|aborted|average connection time" \
        "$WORK/$name.out" || true
    grep -E "aborted|error|FATAL|could not" "$WORK/$name.err" | sort | uniq -c | head -10 || true
}

start_first
run_pgbench logins -C -c 20
run_pgbench held -c 50
log "logs of the pgrelay processes:"
for f in "$WORK"/relay.*.log; do
    echo "--- $(basename "$f")"
    grep -E "takeover|took the|handed the|exited|shutdown|ERROR|WARN" "$f" | cut -c1-200 | head -20
    echo "clients handed over to the next process: $(grep -c "client handed over" "$f" || true)"
    echo "clients taken over from the previous one: $(grep -c "client taken over" "$f" || true)"
done
