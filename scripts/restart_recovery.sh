#!/usr/bin/env bash
# How fast pgrelay serves again after a primary restart.
#
# Starts `pgrelay demo` (a throwaway primary and streaming replica behind pgrelay in
# transaction mode), then ROUNDS times: runs TPC-B-like pgbench (-c 20 -j 2) through
# pgrelay, restarts the primary with `pg_ctl restart -m fast` while it runs, and prints the
# seconds from the new server's "database system is ready to accept connections" log line
# to the first transaction committed through pgrelay after it. Two clocks are read, both
# this machine's:
#
#   - a probe: one psql session through pgrelay committing
#     `INSERT INTO restart_probe VALUES (clock_timestamp())` every PROBE_INTERVAL seconds;
#     the earliest row stamped after the ready line is the first commit (the row is stamped
#     as the INSERT runs, its commit follows within a millisecond). pgrelay holds the
#     statements sent while the server is down and runs them once it is back.
#   - pgbench's per-transaction log (-l): the earliest transaction that completed after the
#     ready line. pgbench ends a client at its first error, so a client whose transaction
#     the restart cut off no longer counts; if none is left, the column says "-".
#
# The server log's timestamps come from log_line_prefix '%m' (milliseconds).
#
# Usage: scripts/restart_recovery.sh            (after `cargo build --release`)
# Environment: ROUNDS (10), PGBIN (/usr/lib/postgresql/15/bin), PGRELAY
# (target/release/pgrelay), LOAD_BEFORE (2 s of load before each restart), ROUND_SECONDS
# (pgbench -T of each round, 7), PROBE_INTERVAL (0.01).
#
# Everything it starts (pgrelay demo, the restarted primary, pgbench, the probe) is ended
# on exit, and every wait is bounded.

set -euo pipefail

ROUNDS=${ROUNDS:-10}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGRELAY=${PGRELAY:-target/release/pgrelay}
LOAD_BEFORE=${LOAD_BEFORE:-2}
ROUND_SECONDS=${ROUND_SECONDS:-7}
PROBE_INTERVAL=${PROBE_INTERVAL:-0.01}

for program in "$PGRELAY" "$PGBIN/pgbench" "$PGBIN/psql" "$PGBIN/pg_ctl"; do
    [[ -x $program ]] || { echo "not found or not executable: $program" >&2; exit 2; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/restart_recovery.XXXXXX")
DEMO_PID=""
PROBE_PID=""
FEEDER_PID=""
PGBENCH_PID=""
DATA=""
PG_USER=""

log() { echo "[$(date +%T)] $*" >&2; }

# pg_ctl, within `limit` seconds, as the owner of the data directory (PostgreSQL refuses
# to run as root; run as root, the demo's cluster belongs to an unprivileged user).
pg_ctl_as_owner() {
    local limit=$1
    shift
    if [[ $(id -un) == "$PG_USER" ]]; then
        (cd / && timeout "$limit" "$PGBIN/pg_ctl" "$@")
    else
        (cd / && timeout "$limit" runuser -u "$PG_USER" -- "$PGBIN/pg_ctl" "$@")
    fi
}

# Ends a process this script started, by its id, and waits (bounded) until it is gone.
end_process() {
    local pid=$1 signal=${2:-TERM}
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    set +e
    end_process "$PGBENCH_PID" INT
    end_process "$FEEDER_PID"
    end_process "$PROBE_PID"
    # The primary restarted by pg_ctl is no child of the demo, which cannot stop it: stop
    # it here, before the demo removes its directory.
    if [[ -n $DATA && -f $DATA/postmaster.pid ]]; then
        pg_ctl_as_owner 60 stop -D "$DATA" -m fast -w -t 50 >/dev/null 2>&1
    fi
    end_process "$DEMO_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free port for pgrelay.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

log "starting pgrelay demo on port $PORT"
"$PGRELAY" demo --port "$PORT" >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
for _ in $(seq 1200); do
    grep -q "Press Ctrl-C" "$WORK/demo.out" 2>/dev/null && break
    kill -0 "$DEMO_PID" 2>/dev/null || { cat "$WORK/demo.out" "$WORK/demo.err" >&2; exit 1; }
    sleep 0.1
done
grep -q "Press Ctrl-C" "$WORK/demo.out" || { echo "pgrelay demo did not start within 120 s" >&2; exit 1; }

PGRELAY_ADDR=$(sed -n 's/^pgrelay is running on \([0-9.:]*\) in front of:$/\1/p' "$WORK/demo.out")
PRIMARY_ADDR=$(awk '$1 == "primary" { print $2 }' "$WORK/demo.out")
CONFIG=$(sed -n 's/^The configuration in use is //p' "$WORK/demo.out")
CLUSTER_DIR=$(dirname "$CONFIG")
DATA=$CLUSTER_DIR/primary
SERVER_LOG=$CLUSTER_DIR/primary.log
PG_USER=$(stat -c %U "$DATA")
RELAY_PORT=${PGRELAY_ADDR##*:}
PRIMARY_PORT=${PRIMARY_ADDR##*:}
log "pgrelay $PGRELAY_ADDR, primary $PRIMARY_ADDR (data $DATA, run as $PG_USER)"

export PGPASSWORD=app PGCONNECT_TIMEOUT=10
direct() { timeout 60 "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PRIMARY_PORT" -U app -d app "$@"; }

log "pgbench -i on the primary"
timeout 120 "$PGBIN/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$PRIMARY_PORT" -U app app >"$WORK/init.out" 2>&1 \
    || { cat "$WORK/init.out" >&2; exit 1; }
direct -c "CREATE TABLE restart_probe (at timestamptz NOT NULL)"

# The probe: one psql session through pgrelay, fed one INSERT per interval. psql goes on
# after an error (no ON_ERROR_STOP): a statement the restart cut off fails, the next runs.
mkfifo "$WORK/probe.fifo"
"$PGBIN/psql" -X -q -h 127.0.0.1 -p "$RELAY_PORT" -U app -d app <"$WORK/probe.fifo" >/dev/null 2>"$WORK/probe.err" &
PROBE_PID=$!
(
    exec >"$WORK/probe.fifo"
    while :; do
        echo "INSERT INTO restart_probe VALUES (clock_timestamp());"
        sleep "$PROBE_INTERVAL"
    done
) &
FEEDER_PID=$!

# Epoch seconds (with fractions) of a '%m' log timestamp: "2026-01-02 03:04:05.678 UTC".
epoch_of() { date -d "$1" +%s.%N; }

printf '\n| restart | server ready (log) | first commit after, probe | first commit after, pgbench | pgbench transactions | pgbench clients ended by an error |\n'
printf '|---|---|---|---|---|---|\n'
for round in $(seq "$ROUNDS"); do
    prefix=$WORK/pgbench_$round
    timeout $((ROUND_SECONDS + 60)) "$PGBIN/pgbench" -n -c 20 -j 2 -T "$ROUND_SECONDS" -l --log-prefix="$prefix" \
        -h 127.0.0.1 -p "$RELAY_PORT" -U app app >"$prefix.out" 2>&1 &
    PGBENCH_PID=$!
    sleep "$LOAD_BEFORE"

    offset=$(stat -c %s "$SERVER_LOG")
    pg_ctl_as_owner 120 restart -D "$DATA" -m fast -w -t 100 -l "$SERVER_LOG" >"$WORK/restart_$round.out" 2>&1 \
        || { cat "$WORK/restart_$round.out" >&2; exit 1; }
    ready_line=""
    for _ in $(seq 200); do
        ready_line=$(tail -c +"$((offset + 1))" "$SERVER_LOG" | grep -m1 "database system is ready to accept connections" || true)
        [[ -n $ready_line ]] && break
        sleep 0.05
    done
    [[ -n $ready_line ]] || { echo "round $round: no ready line in $SERVER_LOG" >&2; exit 1; }
    ready_stamp=$(awk '{ print $1, $2, $3 }' <<<"$ready_line")
    ready=$(epoch_of "$ready_stamp")

    wait "$PGBENCH_PID" || true
    PGBENCH_PID=""

    probe_first=$(direct -c "SELECT extract(epoch FROM min(at)) FROM restart_probe WHERE at > to_timestamp($ready)")
    probe=$( [[ -n $probe_first ]] && awk -v a="$probe_first" -v r="$ready" 'BEGIN { printf "%.3f s", a - r }' || echo "-")
    # pgbench -l lines: client transaction latency script epoch_seconds epoch_microseconds.
    bench=$(cat "$prefix".[0-9]* 2>/dev/null | awk -v r="$ready" '
        $3 ~ /^[0-9]+$/ { t = $5 + $6 / 1e6; if (t > r && (best == "" || t < best)) best = t }
        END { if (best == "") print "-"; else printf "%.3f s", best - r }')
    transactions=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$prefix.out")
    ended=$(grep -c "aborted in command" "$prefix.out" || true)
    printf '| %d | %s | %s | %s | %s | %s |\n' "$round" "${ready_stamp#* }" "$probe" "$bench" "${transactions:--}" "$ended"
done
