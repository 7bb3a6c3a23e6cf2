"""Schema changes and prepared statements: asyncpg and psycopg, through pgrelay in
transaction mode and on a direct connection, must see the same thing.

Eight clients of each driver share a pool of two server connections. Each runs the
same prepared `SELECT *`, then a column is added (through pgrelay, and then behind its
back on a direct connection), then each runs it again, outside and inside a
transaction. What every call returned (its column count, or the error class) is
recorded, and the record through pgrelay must equal the record on a direct connection.

Run by tests/drivers.rs with the connection details in PGRELAY_* variables; exits
non-zero, with a traceback, at the first difference.
"""

import asyncio
import os
import sys
import time
import traceback

import asyncpg
import psycopg

HOST = os.environ["PGRELAY_HOST"]
PORT = int(os.environ["PGRELAY_PORT"])
DIRECT_PORT = int(os.environ["PGRELAY_DIRECT_PORT"])
USER = os.environ["PGRELAY_USER"]
PASSWORD = os.environ["PGRELAY_PASSWORD"]
DATABASE = os.environ["PGRELAY_DATABASE"]
SCHEMA = os.environ["PGRELAY_SCHEMA"]
CLIENTS = 8


def log(message):
    print(f"[schema changes {time.strftime('%H:%M:%S')}] {message}", flush=True)


def outcome(rows):
    return f"ok {len(rows[0])} columns"


async def asyncpg_story(port, table):
    """What each call of the story returned, in order."""
    seen = []
    conns = [
        await asyncpg.connect(host=HOST, port=port, user=USER, password=PASSWORD, database=DATABASE, timeout=10)
        for _ in range(CLIENTS)
    ]
    select = f"SELECT * FROM {table} ORDER BY id"
    try:
        await conns[0].execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int, v int)")
        await conns[0].execute(f"INSERT INTO {table} VALUES (1, 2)")
        # Two clients in transactions at once: each server connection prepares it.
        held = [conns[0].transaction(), conns[1].transaction()]
        for conn, tx in zip(conns, held):
            await tx.start()
            await conn.fetchval("SELECT 1")
        for conn in conns[:2]:
            seen.append(outcome(await conn.fetch(select)))
        for tx in held:
            await tx.commit()
        for conn in conns[2:]:
            seen.append(outcome(await conn.fetch(select)))

        # A column added by one of the clients: the next call of every client sees it
        # (asyncpg prepares again on "cached plan must not change result type").
        await conns[0].execute(f"ALTER TABLE {table} ADD COLUMN w int DEFAULT 3")
        for conn in conns:
            seen.append(outcome(await conn.fetch(select)))

        # Inside a transaction asyncpg cannot prepare again: the error reaches the
        # application, and the call after the transaction works.
        await conns[0].execute(f"ALTER TABLE {table} ADD COLUMN x int DEFAULT 4")
        for conn in conns:
            try:
                async with conn.transaction():
                    seen.append(outcome(await conn.fetch(select)))
            except asyncpg.PostgresError as error:
                seen.append(type(error).__name__)
            seen.append(outcome(await conn.fetch(select)))
    finally:
        for conn in conns:
            await conn.close()
    return seen


def psycopg_story(port, table):
    seen = []
    dsn = f"host={HOST} port={port} user={USER} password={PASSWORD} dbname={DATABASE} connect_timeout=10"
    # prepare_threshold=0: every statement is prepared on its first run.
    conns = [psycopg.connect(dsn, autocommit=True, prepare_threshold=0) for _ in range(CLIENTS)]
    select = f"SELECT * FROM {table} ORDER BY id"

    def run(conn):
        try:
            seen.append(outcome(conn.execute(select).fetchall()))
        except psycopg.Error as error:
            seen.append(type(error).__name__)

    try:
        conns[0].execute(f"DROP TABLE IF EXISTS {table}")
        conns[0].execute(f"CREATE TABLE {table} (id int, v int)")
        conns[0].execute(f"INSERT INTO {table} VALUES (1, 2)")
        txs = [conns[0].transaction(), conns[1].transaction()]
        for conn, tx in zip(conns, txs):
            tx.__enter__()
            conn.execute("SELECT 1")
        for conn in conns[:2]:
            run(conn)
        for tx in txs:
            tx.__exit__(None, None, None)
        for conn in conns[2:]:
            run(conn)

        # Added by one of the clients, then by someone else entirely.
        conns[0].execute(f"ALTER TABLE {table} ADD COLUMN w int DEFAULT 3")
        for conn in conns:
            run(conn)
            run(conn)
        with psycopg.connect(
            f"host={HOST} port={DIRECT_PORT} user={USER} password={PASSWORD} dbname={DATABASE}", autocommit=True
        ) as outside:
            outside.execute(f"ALTER TABLE {table} ADD COLUMN x int DEFAULT 4")
        for conn in conns:
            try:
                with conn.transaction():
                    run(conn)
                    conn.execute("SELECT 1")
            except psycopg.Error as error:
                seen.append(type(error).__name__)
            run(conn)
    finally:
        for conn in conns:
            conn.close()
    return seen


def compare(driver, direct, relayed):
    log(f"{driver} direct:  {direct}")
    log(f"{driver} pgrelay: {relayed}")
    if direct != relayed:
        raise AssertionError(f"{driver}: pgrelay differs from a direct connection")


async def main():
    started = time.monotonic()
    table = f"{SCHEMA}.sc_asyncpg"
    compare("asyncpg", await asyncpg_story(DIRECT_PORT, table), await asyncpg_story(PORT, table))
    table = f"{SCHEMA}.sc_psycopg"
    compare("psycopg", psycopg_story(DIRECT_PORT, table), psycopg_story(PORT, table))
    log(f"ok in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
