#!/bin/bash
# Runs once, when the primary's data directory is first created (the postgres image runs the
# files in /docker-entrypoint-initdb.d). Creates the application role and database, the
# replication role and slot used by docker/replica-entrypoint.sh, and lets that role connect
# for replication from the compose network. The image sources a .sh file that is not
# executable, so this script sets no shell options of its own (the entrypoint runs with -e).

: "${APP_PASSWORD:?}" "${REPLICATION_USER:?}" "${REPLICATION_PASSWORD:?}" "${REPLICATION_SLOT:?}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set app_password="$APP_PASSWORD" \
    --set replication_user="$REPLICATION_USER" \
    --set replication_password="$REPLICATION_PASSWORD" \
    --set replication_slot="$REPLICATION_SLOT" <<'SQL'
CREATE ROLE app LOGIN PASSWORD :'app_password';
CREATE DATABASE app OWNER app;
CREATE ROLE :"replication_user" LOGIN REPLICATION PASSWORD :'replication_password';
-- The slot keeps the WAL the replica has not received yet, also while it restarts.
SELECT pg_create_physical_replication_slot(:'replication_slot');
SQL

# "host all all all scram-sha-256" (added by the image) does not match replication
# connections: they need a line of their own.
echo "host replication $REPLICATION_USER all scram-sha-256" >> "$PGDATA/pg_hba.conf"
