"""asyncpg through pgrelay: a transaction-mode pool smaller than the number of clients, or
a session-mode pool.

Run by tests/drivers.rs with the connection details in PGRELAY_* variables. asyncpg
prepares every statement it runs as a named server-side statement (its statement cache)
and runs `executemany` as a pipeline with one Sync. Exits non-zero, with a traceback, at
the first failed check.
"""

import asyncio
import csv
import io
import os
import sys
import time
import traceback

import asyncpg

HOST = os.environ["PGRELAY_HOST"]
PORT = int(os.environ["PGRELAY_PORT"])
USER = os.environ["PGRELAY_USER"]
PASSWORD = os.environ["PGRELAY_PASSWORD"]
DATABASE = os.environ["PGRELAY_DATABASE"]
SCHEMA = os.environ["PGRELAY_SCHEMA"]  # owned by USER, made by the harness
POOL_SIZE = int(os.environ["PGRELAY_POOL_SIZE"])
WORKERS = int(os.environ.get("PGRELAY_WORKERS", "8"))
SESSION_MODE = os.environ.get("PGRELAY_POOL_MODE") == "session"
ROUNDS = int(os.environ.get("PGRELAY_ROUNDS", "6"))

TABLE = "drv_asyncpg"
INSERT = f"INSERT INTO {TABLE} (id, worker, val) VALUES ($1, $2, $3)"
SELECT_VAL = f"SELECT val FROM {TABLE} WHERE id = $1"
DIVIDE = "SELECT 10 / $1::int"


def log(message):
    print(f"[asyncpg {time.strftime('%H:%M:%S')}] {message}", flush=True)


async def connect(**kwargs):
    return await asyncpg.connect(
        host=HOST,
        port=PORT,
        user=USER,
        password=PASSWORD,
        database=DATABASE,
        timeout=10,
        command_timeout=30,
        **kwargs,
    )


async def expect_error(kind, awaitable, what):
    try:
        await awaitable
    except kind as error:
        return error
    raise AssertionError(f"{what}: expected {kind.__name__}, got no error")


async def setup():
    conn = await connect()
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.whereami")
        await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, worker int NOT NULL, val int NOT NULL)")
        await conn.execute(f"CREATE TABLE {SCHEMA}.whereami (place text)")
        await conn.execute(f"INSERT INTO {SCHEMA}.whereami VALUES ($1)", SCHEMA)
    finally:
        await conn.close()


async def worker(index, barrier, pids):
    sets_its_own = index % 2 == 0
    # Odd workers set application_name at startup instead: that too must stay theirs.
    startup_app = None if sets_its_own else f"asyncpg_startup_w{index}"
    conn = await connect(server_settings={"application_name": startup_app} if startup_app else None)
    await barrier.wait()  # all client connections are open at once
    default_path = await conn.fetchval("SHOW search_path")
    if sets_its_own:
        await conn.execute(f"SET application_name = 'asyncpg_w{index}'")
        await conn.execute(f"SET search_path TO {SCHEMA}, public")
        expect_app, expect_path = f"asyncpg_w{index}", f"{SCHEMA}, public"
    else:
        expect_app, expect_path = startup_app, default_path
    insert = await conn.prepare(INSERT)
    select = await conn.prepare(SELECT_VAL)
    divide = await conn.prepare(DIVIDE)
    written = 0
    for round_ in range(ROUNDS):
        base = index * 1000 + round_ * 10

        # Commit; the transaction holds its server connection a while so they overlap.
        async with conn.transaction():
            await insert.fetch(base, index, round_)
            pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            await conn.execute("SET LOCAL statement_timeout = '5s'")
            await conn.fetchval("SELECT pg_sleep(0.02)")
        written += 1
        assert await select.fetchval(base) == round_, "committed row missing"

        # Rollback.
        transaction = conn.transaction()
        await transaction.start()
        await insert.fetch(base + 1, index, round_)
        assert await select.fetchval(base + 1) == round_
        await transaction.rollback()
        assert await select.fetchval(base + 1) is None, "rolled-back row visible"

        # Settings hold across transactions, SET LOCAL does not, and nothing leaks.
        assert await conn.fetchval("SHOW application_name") == expect_app
        assert await conn.fetchval("SHOW search_path") == expect_path
        assert await conn.fetchval("SHOW statement_timeout") == "0"
        if sets_its_own:
            assert await conn.fetchval("SELECT place FROM whereami") == SCHEMA
        else:
            await expect_error(
                asyncpg.UndefinedTableError, conn.fetchval("SELECT place FROM whereami"), "whereami"
            )

        # A failing statement, then the same prepared statement works.
        await expect_error(asyncpg.DivisionByZeroError, divide.fetchval(0), "10 / 0")
        assert await divide.fetchval(2) == 5

        # A unique violation, then the connection is usable.
        await expect_error(asyncpg.UniqueViolationError, insert.fetch(base, index, 0), "duplicate id")
        assert await select.fetchval(base) == round_

        # An error inside a transaction: aborted until ROLLBACK.
        await conn.execute("BEGIN")
        await insert.fetch(base + 2, index, round_)
        await expect_error(asyncpg.DivisionByZeroError, divide.fetchval(0), "10 / 0 in a transaction")
        await expect_error(asyncpg.InFailedSQLTransactionError, select.fetchval(base), "after an error")
        await conn.execute("ROLLBACK")
        assert await select.fetchval(base + 2) is None
        assert await conn.fetchval("SELECT 1") == 1

        # The same through a transaction block.
        async def failing_block():
            async with conn.transaction():
                await insert.fetch(base + 3, index, round_)
                await insert.fetch(base + 3, index, round_)

        await expect_error(asyncpg.UniqueViolationError, failing_block(), "duplicate in a transaction block")
        assert await select.fetchval(base + 3) is None

        # executemany: Bind/Execute for every row, one Sync.
        await conn.executemany(INSERT, [(base + 4, index, round_), (base + 5, index, round_)])
        written += 2
        assert await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id IN ($1, $2)", base + 4, base + 5) == 2

    # COPY: records in (binary), a query out, a table out, a file-like in.
    rows = [(100000 + index * 1000 + k, index, k * k) for k in range(200)]
    result = await conn.copy_records_to_table(TABLE, records=rows[:150], columns=["id", "worker", "val"])
    assert result == "COPY 150", result
    text = io.StringIO()
    for row in rows[150:]:
        text.write("\t".join(map(str, row)) + "\n")
    result = await conn.copy_to_table(
        TABLE, source=io.BytesIO(text.getvalue().encode()), columns=["id", "worker", "val"]
    )
    assert result == "COPY 50", result
    written += len(rows)
    out = io.BytesIO()
    result = await conn.copy_from_query(
        f"SELECT id, worker, val FROM {TABLE} WHERE id >= $1 AND worker = $2 ORDER BY id",
        100000,
        index,
        output=out,
        format="csv",
    )
    assert result == "COPY 200", result
    copied = [tuple(map(int, row)) for row in csv.reader(io.StringIO(out.getvalue().decode()))]
    assert copied == rows, "copy_from_query returned other rows"

    # A COPY that fails on a duplicate key, then a COPY in a transaction that rolls back.
    await expect_error(
        asyncpg.UniqueViolationError,
        conn.copy_records_to_table(TABLE, records=[(200000 + index, index, 0), rows[0]]),
        "COPY of a duplicate id",
    )
    assert await select.fetchval(200000 + index) is None
    transaction = conn.transaction()
    await transaction.start()
    await conn.copy_records_to_table(TABLE, records=[(300000 + index, index, 1)])
    assert await select.fetchval(300000 + index) == 1
    await transaction.rollback()
    assert await select.fetchval(300000 + index) is None
    assert await conn.fetchval("SHOW application_name") == expect_app
    await conn.close()
    return written


async def run_workers():
    barrier = asyncio.Barrier(WORKERS)
    pids = set()
    results = await asyncio.wait_for(
        asyncio.gather(*(worker(i, barrier, pids) for i in range(WORKERS)), return_exceptions=True), 60
    )
    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failures:
        text = "\n".join(f"worker {i}:\n{''.join(traceback.format_exception(r))}" for i, r in failures)
        raise AssertionError(text)
    log(f"{WORKERS} concurrent clients used {len(pids)} server connections: {sorted(pids)}")
    # Transaction mode shares fewer servers among more clients; session mode gives each its own.
    assert SESSION_MODE or WORKERS > POOL_SIZE
    assert 1 <= len(pids) <= POOL_SIZE, f"{len(pids)} server connections for a pool of {POOL_SIZE}"
    conn = await connect()
    try:
        total = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
        assert total == sum(results), (total, sum(results))
    finally:
        await conn.close()


async def pool_checks():
    """An asyncpg Pool larger than pgrelay's, with more tasks than connections."""
    pool = await asyncpg.create_pool(
        host=HOST,
        port=PORT,
        user=USER,
        password=PASSWORD,
        database=DATABASE,
        min_size=WORKERS,
        max_size=WORKERS,
        command_timeout=30,
    )
    try:
        async with pool.acquire() as conn:
            default_app = await conn.fetchval("SHOW application_name")

        async def task(k):
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute(INSERT, 900000 + k, 97, k)
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    await conn.fetchval("SELECT pg_sleep(0.01)")
                # A setting the pool's reset (RESET ALL) on release must undo.
                await conn.execute(f"SET application_name = 'asyncpg_pool_{k}'")
                assert await conn.fetchval("SELECT val FROM drv_asyncpg WHERE id = $1", 900000 + k) == k
                assert await conn.fetchval("SHOW application_name") == f"asyncpg_pool_{k}"
                return pid

        pids = await asyncio.wait_for(asyncio.gather(*(task(k) for k in range(4 * WORKERS))), 60)
        assert len(set(pids)) <= POOL_SIZE, pids
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM drv_asyncpg WHERE worker = 97") == 4 * WORKERS
            assert await conn.fetchval("SHOW application_name") == default_app, "RESET ALL on release lost"
        # Errors through the pool leave its connections usable.
        for _ in range(WORKERS):
            await expect_error(asyncpg.DivisionByZeroError, pool.fetchval(DIVIDE, 0), "10 / 0 via the pool")
        assert await pool.fetchval(DIVIDE, 5) == 2
    finally:
        await asyncio.wait_for(pool.close(), 30)


async def large_values():
    """A prepared statement run with a small, then large values, each twice (fetchval)."""
    conn = await connect()
    try:
        st = await conn.prepare("SELECT $1::bytea")
        assert await st.fetchval(b"foo") == b"foo"
        for size in (70_000, 200_000, 1 << 20):
            for _ in range(2):
                value = await asyncio.wait_for(st.fetchval(b"f" * size), 30)
                assert value == b"f" * size, f"{size} bytes came back as {len(value)}"
    finally:
        await conn.close()


async def short_sessions_with_types():
    """Dozens of short connections that create types and domains, use composite and range
    values through asyncpg's type introspection, and disconnect."""
    for k in range(36):
        conn = await connect()
        try:
            async with conn.transaction():
                await conn.execute(f"DROP TYPE IF EXISTS {SCHEMA}.pair_{k} CASCADE")
                await conn.execute(f"CREATE TYPE {SCHEMA}.pair_{k} AS (a int, b text)")
                await conn.execute(f"DROP DOMAIN IF EXISTS {SCHEMA}.positive_{k}")
                await conn.execute(f"CREATE DOMAIN {SCHEMA}.positive_{k} AS int CHECK (VALUE > 0)")
            pair = await conn.fetchval(f"SELECT ROW($1::int, $2::text)::{SCHEMA}.pair_{k}", k, "x" * k)
            assert tuple(pair) == (k, "x" * k), pair
            assert await conn.fetchval(f"SELECT $1::{SCHEMA}.positive_{k}", k + 1) == k + 1
            span = await conn.fetchval("SELECT int4range($1, $2)", k, k + 10)
            assert (span.lower, span.upper) == (k, k + 10), span
            spans = await conn.fetchval("SELECT ARRAY[int4range(1, $1), int4range($1, 100)]", k + 2)
            assert len(spans) == 2
        finally:
            if k % 3 == 0:
                # Leave abruptly, as a crashed client would.
                conn.terminate()
            else:
                await conn.close()
    conn = await connect()
    try:
        for k in range(36):
            await conn.execute(f"DROP TYPE {SCHEMA}.pair_{k} CASCADE")
            await conn.execute(f"DROP DOMAIN {SCHEMA}.positive_{k}")
    finally:
        await conn.close()


async def next_notification(received, what):
    """The next notification the listener got, waiting at most 10 s for it."""
    try:
        return await asyncio.wait_for(received.get(), 10)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}: no notification within 10 s") from None


# The server connections the suite's user holds apart from pgrelay's listener connection.
SERVERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE usename = current_user"
    " AND backend_type = 'client backend' AND application_name <> 'pgrelay listener'"
)


async def listen_fanout():
    """listen_notify = "fanout" (transaction mode, the default): more clients add_listener
    (a LISTEN through fetch: the extended protocol) than the pool has servers, one of them
    inside a transaction; pgrelay answers the LISTENs, holds one listener connection for
    them all, and each client's callback gets every notification while it holds no server."""
    channel = f"drv_fan_{USER}"
    marker = f"drv_fan_mark_{USER}"
    listeners = [await connect() for _ in range(POOL_SIZE + 2)]
    sender = await connect()
    queues = [asyncio.Queue() for _ in listeners]
    callbacks = []
    try:
        for queue in queues:
            def on_notification(_conn, _pid, chan, payload, queue=queue):
                queue.put_nowait((chan, payload))

            callbacks.append(on_notification)
        for conn, callback in zip(listeners[:-1], callbacks):
            await conn.add_listener(channel, callback)
            await conn.add_listener(marker, callback)
        # Inside a transaction a LISTEN takes effect at COMMIT, as on the server.
        async with listeners[-1].transaction():
            await listeners[-1].add_listener(channel, callbacks[-1])
            await sender.execute(f"NOTIFY {channel}, 'before commit'")
        servers = await sender.fetchval(SERVERS)
        assert servers <= POOL_SIZE, f"{len(listeners)} listening clients hold {servers} servers"
        # The server connection a client gets knows nothing of its channels.
        assert await listeners[0].fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        await sender.execute(f"NOTIFY {channel}, 'to all'")
        # The others listened already when 'before commit' was sent.
        for index, queue in enumerate(queues):
            if index < len(queues) - 1:
                got = await next_notification(queue, f"listener {index}")
                assert got == (channel, "before commit"), f"listener {index}: {got}"
            got = await next_notification(queue, f"listener {index}")
            assert got == (channel, "to all"), f"listener {index}: {got}"
        # remove_listener (UNLISTEN) stops delivery to that client; a NOTIFY rolled back
        # reaches nobody.
        await listeners[0].remove_listener(channel, callbacks[0])
        await sender.execute(f"NOTIFY {channel}, 'after unlisten'")
        try:
            async with sender.transaction():
                await sender.execute(f"NOTIFY {channel}, 'rolled back'")
                raise SourceFailed("roll back")
        except SourceFailed:
            pass
        await sender.execute(f"NOTIFY {marker}, 'marker'")
        got = await next_notification(queues[0], "after remove_listener")
        assert got == (marker, "marker"), f"after remove_listener: {got}"
        got = [await next_notification(queues[1], f"after a rollback {k}") for k in range(2)]
        assert got == [(channel, "after unlisten"), (marker, "marker")], f"after a rollback: {got}"
    finally:
        for conn in listeners + [sender]:
            await conn.close()


async def listen_notify():
    """LISTEN/NOTIFY with add_listener: the listener gets each notification while it sends
    nothing; the sender is another connection. In session mode the listener LISTENs on its
    own server; in transaction mode pgrelay's listener connection does."""
    channel = f"drv_chan_{USER}"
    listener = await connect()
    sender = await connect()
    try:
        received = asyncio.Queue()

        def on_notification(_conn, _pid, chan, payload):
            received.put_nowait((chan, payload))

        await listener.add_listener(channel, on_notification)
        # The first notification right after LISTEN is not lost.
        await sender.execute(f"NOTIFY {channel}, 'first'")
        assert await next_notification(received, "the first notification") == (channel, "first")
        # Fifty committed together reach the listener's server in one batch: all of them
        # come, in order.
        await sender.execute(f"SELECT pg_notify('{channel}', 'n' || g) FROM generate_series(1, 50) g")
        batch = [await next_notification(received, f"notification {g} of 50") for g in range(1, 51)]
        assert batch == [(channel, f"n{g}") for g in range(1, 51)], batch
        # Sent from a transaction: delivered when it commits.
        async with sender.transaction():
            for k in range(3):
                await sender.execute(f"NOTIFY {channel}, 'tx{k}'")
        batch = [await next_notification(received, f"transaction notification {k}") for k in range(3)]
        assert batch == [(channel, f"tx{k}") for k in range(3)], batch
        # The listener works as usual in between, and still listens afterwards. Only a
        # session-mode client's own server LISTENs (see docs/notifications.md).
        listening = [row[0] for row in await listener.fetch("SELECT pg_listening_channels()")]
        assert listening == ([channel] if SESSION_MODE else []), listening
        await sender.execute(f"NOTIFY {channel}, 'after a query'")
        assert await next_notification(received, "after a query") == (channel, "after a query")
        await listener.remove_listener(channel, on_notification)
        assert await listener.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    finally:
        await listener.close()
        await sender.close()


async def error_mid_batch():
    """executemany of rows of 32 KB whose third row violates the primary key: asyncpg
    watches for the server's error while it is still sending and stops early, as it does
    on a direct connection (its generator is not drained). How far it gets first depends on
    how much the socket buffers on the way take while the error travels back: asyncpg's own
    test of this, with 128 rows (4 MB), drains them all now and then even on a direct
    connection, and through pgrelay there are two sockets, with room for up to 36 MB on
    this kernel when pgrelay falls behind (a busy machine). 2048 rows (64 MB), of which it
    must not pull three quarters, tell early from late."""
    table = "drv_asyncpg_batch"
    rows_in_batch = 2048
    pulled = []
    for attempt in range(3):
        conn = await connect()
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, pad text)")
            pos = 0

            def rows():
                nonlocal pos
                while pos < rows_in_batch:
                    pos += 1
                    if pos <= 3:
                        yield pos % 2, "a"  # rows 1 and 3 share id 1
                    else:
                        yield pos, "a" * 32768

            await expect_error(
                asyncpg.UniqueViolationError,
                conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", rows()),
                "a duplicate in the third row",
            )
            pulled.append(pos)
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
            await conn.execute(f"DROP TABLE {table}")
        finally:
            await conn.close()
    log(f"executemany stopped after pulling {pulled} of {rows_in_batch} rows")
    assert all(pos < rows_in_batch * 3 // 4 for pos in pulled), f"the error arrived late: {pulled} rows pulled"


class SourceFailed(Exception):
    pass


async def copy_aborted_by_client():
    """A COPY whose record generator (or data source) raises: asyncpg sends CopyFail, then
    a cancel request, and raises the generator's exception. The cancel must not hit the
    statements that follow, on the same server (in a transaction) or not."""
    conn = await connect()
    try:

        def records(base):
            for k in range(1000):
                if k == 500:
                    raise SourceFailed("the record generator failed")
                yield (base + k, 96, k)

        class FailingSource:
            def __init__(self):
                self.chunks = 0

            def __aiter__(self):
                return self

            async def __anext__(self):
                self.chunks += 1
                if self.chunks > 3:
                    raise SourceFailed("the data source failed")
                return f"{1_100_000 + self.chunks}\t96\t0\n".encode()

        columns = ["id", "worker", "val"]
        for round_ in range(5):
            await expect_error(
                SourceFailed,
                conn.copy_records_to_table(TABLE, records=records(1_000_000), columns=columns),
                "a generator that raises",
            )
            assert await conn.fetchval("SELECT 1 FROM pg_sleep(0.05)") == 1, "the next statement"
            await expect_error(
                SourceFailed,
                conn.copy_to_table(TABLE, source=FailingSource(), columns=columns),
                "a source that raises",
            )
            assert await conn.fetchval("SELECT 1 FROM pg_sleep(0.05)") == 1, "the next statement"
            # In a transaction, as a savepoint that rolls back: the server stays the same.
            async with conn.transaction():
                await conn.execute(INSERT, 1_200_000 + round_, 96, 0)

                async def in_savepoint():
                    async with conn.transaction():
                        await conn.copy_records_to_table(TABLE, records=records(1_300_000), columns=columns)

                await expect_error(SourceFailed, in_savepoint(), "a generator that raises in a savepoint")
                assert await conn.fetchval("SELECT 1 FROM pg_sleep(0.05)") == 1, "the next statement"
        assert await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE worker = 96") == 5
    finally:
        await conn.close()


async def main():
    started = time.monotonic()
    log(f"asyncpg {asyncpg.__version__}, {WORKERS} clients, pool of {POOL_SIZE}")
    await setup()
    await run_workers()
    log("workers done")
    await pool_checks()
    log("pool checks done")
    await large_values()
    log("large values done")
    await short_sessions_with_types()
    log("short sessions with types done")
    await listen_notify()
    log("LISTEN/NOTIFY done")
    if not SESSION_MODE:
        await listen_fanout()
        log("LISTEN/NOTIFY fan-out done")
    await error_mid_batch()
    log("error mid-batch done")
    await copy_aborted_by_client()
    log("COPY aborted by the client done")
    conn = await connect()
    try:
        await conn.execute(f"DROP TABLE {TABLE}")
        await conn.execute(f"DROP TABLE {SCHEMA}.whereami")
    finally:
        await conn.close()
    log(f"ok in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
