#!/usr/bin/env bash
# Installs what the driver compatibility suite (tests/drivers.rs) needs and a fresh Debian
# machine lacks. Idempotent, and quick once everything is there:
#   - apt: the pgjdbc jar (libpostgresql-jdbc-java), a JDK if javac is missing, python3-venv
#     if venvs cannot be made, Node.js and npm if missing;
#   - PyPI: psycopg 3 and asyncpg into a venv at $TARGET/driver-venv;
#   - npm: node-postgres and pg-copy-streams (tests/drivers/node/package-lock.json) into
#     $TARGET/driver-node.
# TARGET is $CARGO_TARGET_DIR, or target/ at the repository root. Nothing else outside
# TARGET changes except the apt packages.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"

PY_REQUIREMENTS=("psycopg[binary]==3.3.9" "asyncpg==0.32.0")
JDBC_JAR=/usr/share/java/postgresql.jar

# One install at a time, should two test runs start together.
exec 9>"$target/driver-install.lock"
flock 9

log() { printf '[drivers/install.sh] %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_packages=()
[ -f "$JDBC_JAR" ] || apt_packages+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || apt_packages+=(default-jdk-headless)
command -v python3 >/dev/null || apt_packages+=(python3)
if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt_packages+=(python3-venv)
fi
command -v node >/dev/null || apt_packages+=(nodejs)
command -v npm >/dev/null || apt_packages+=(npm)
if [ "${#apt_packages[@]}" -gt 0 ]; then
    log "apt-get install ${apt_packages[*]}"
    apt_log="$target/driver-apt.log"
    if ! { as_root apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${apt_packages[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log"
        exit 1
    fi
fi
[ -f "$JDBC_JAR" ] || { log "$JDBC_JAR is still missing"; exit 1; }

# Python: a venv of our own; the stamp records what it was made with.
venv="$target/driver-venv"
py_stamp="$venv/.pgrelay-requirements"
py_want="$(printf '%s\n' "$(python3 --version 2>&1)" "${PY_REQUIREMENTS[@]}")"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$py_stamp" 2>/dev/null)" != "$py_want" ] \
    || ! "$venv/bin/python" -c 'import psycopg, asyncpg' 2>/dev/null; then
    log "creating $venv with ${PY_REQUIREMENTS[*]}"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
    "$venv/bin/python" -c 'import psycopg, asyncpg'
    printf '%s\n' "$py_want" >"$py_stamp"
fi

# Node: `npm ci` from the committed lockfile, into a directory under target/.
node_dir="$target/driver-node"
node_stamp="$node_dir/.pgrelay-lock"
if [ ! -d "$node_dir/node_modules/pg" ] || [ ! -d "$node_dir/node_modules/pg-copy-streams" ] \
    || ! cmp -s "$here/node/package-lock.json" "$node_stamp"; then
    log "npm ci into $node_dir"
    mkdir -p "$node_dir"
    cp "$here/node/package.json" "$here/node/package-lock.json" "$node_dir/"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$here/node/package-lock.json" "$node_stamp"
fi

log "ready: $venv, $node_dir, $JDBC_JAR, $(command -v javac)"
