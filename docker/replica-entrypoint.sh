#!/bin/bash
# Entrypoint of the replica service: on first start, waits for the primary and clones it with
# pg_basebackup -R (which writes standby.signal and primary_conninfo), then hands over to the
# postgres image's own entrypoint, which finds an existing data directory and starts a hot
# standby. On later starts the clone is already there and streaming resumes from the slot.
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:?}" "${PRIMARY_PORT:=5432}"
: "${REPLICATION_USER:?}" "${REPLICATION_PASSWORD:?}" "${REPLICATION_SLOT:?}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"

    echo "replica: waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
    # The primary listens on TCP only once its init scripts (role and slot) have run.
    until pg_isready --quiet --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" --username "$REPLICATION_USER"; do
        sleep 1
    done

    echo "replica: cloning the primary"
    # gosu: the data directory must belong to postgres, which refuses to run as root.
    PGPASSWORD="$REPLICATION_PASSWORD" gosu postgres pg_basebackup \
        --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" --username "$REPLICATION_USER" \
        --pgdata "$PGDATA" --slot "$REPLICATION_SLOT" --wal-method stream \
        --checkpoint fast --write-recovery-conf --no-password
fi

exec docker-entrypoint.sh "$@"
