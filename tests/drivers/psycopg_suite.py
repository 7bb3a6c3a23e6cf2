"""psycopg 3 through a transaction-mode pgrelay pool smaller than the number of clients.

Run by tests/drivers.rs with the connection details in PGRELAY_* variables. Every
statement runs as a named server-side prepared statement (prepare_threshold=0). Exits
non-zero, with a traceback, at the first failed check.
"""

import os
import sys
import threading
import time
import traceback

import psycopg
from psycopg import errors

HOST = os.environ["PGRELAY_HOST"]
PORT = int(os.environ["PGRELAY_PORT"])
USER = os.environ["PGRELAY_USER"]
PASSWORD = os.environ["PGRELAY_PASSWORD"]
DATABASE = os.environ["PGRELAY_DATABASE"]
POOL_SIZE = int(os.environ["PGRELAY_POOL_SIZE"])
WORKERS = int(os.environ.get("PGRELAY_WORKERS", "8"))
SESSION_MODE = os.environ.get("PGRELAY_POOL_MODE") == "session"
ROUNDS = int(os.environ.get("PGRELAY_ROUNDS", "6"))

TABLE = "drv_psycopg"
SCHEMA = os.environ["PGRELAY_SCHEMA"]  # owned by USER, made by the harness
INSERT = f"INSERT INTO {TABLE} (id, worker, val) VALUES (%s, %s, %s)"
SELECT_VAL = f"SELECT val FROM {TABLE} WHERE id = %s"
DIVIDE = "SELECT 10 / %s::int"


def log(message):
    print(f"[psycopg {time.strftime('%H:%M:%S')}] {message}", flush=True)


def connect(**kwargs):
    options = dict(
        host=HOST,
        port=PORT,
        user=USER,
        password=PASSWORD,
        dbname=DATABASE,
        connect_timeout=10,
        autocommit=True,
        prepare_threshold=0,  # every statement becomes a named server-side prepared statement
    )
    options.update(kwargs)
    return psycopg.connect(**options)


def one(conn, query, params=None):
    row = conn.execute(query, params).fetchone()
    assert row is not None, f"no row for {query!r}"
    return row[0]


def show(conn, setting):
    return one(conn, f"SHOW {setting}")


def value_of(conn, row_id):
    row = conn.execute(SELECT_VAL, (row_id,)).fetchone()
    return None if row is None else row[0]


def expect_error(kind, action, what):
    try:
        action()
    except kind as error:
        return error
    raise AssertionError(f"{what}: expected {kind.__name__}, got no error")


def setup():
    with connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.whereami")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, worker int NOT NULL, val int NOT NULL)")
        conn.execute(f"CREATE TABLE {SCHEMA}.whereami (place text)")
        conn.execute(f"INSERT INTO {SCHEMA}.whereami VALUES ('{SCHEMA}')")


def check_prepared_on_server(conn):
    """Inside a transaction (one server connection), the statement just executed is on the server."""
    with conn.transaction():
        conn.execute(SELECT_VAL, (-1,), prepare=True)
        held = one(
            conn,
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = %s",
            (SELECT_VAL.replace("%s", "$1"),),
        )
        assert held >= 1, "the named statement is not prepared on the server"


def worker(index, barrier, pids, rows_written):
    conn = connect()
    # All client connections are open at once: more clients than server connections.
    barrier.wait()
    default_app = show(conn, "application_name")
    default_path = show(conn, "search_path")
    sets_its_own = index % 2 == 0
    if sets_its_own:
        conn.execute(f"SET application_name = 'psycopg_w{index}'")
        conn.execute(f"SET search_path TO {SCHEMA}, public")
        expect_app, expect_path = f"psycopg_w{index}", f"{SCHEMA}, public"
    else:
        expect_app, expect_path = default_app, default_path
    check_prepared_on_server(conn)
    written = 0
    for round_ in range(ROUNDS):
        base = index * 1000 + round_ * 10

        # A transaction that commits; it holds its server connection for a while so
        # the workers' transactions overlap.
        with conn.transaction():
            conn.execute(INSERT, (base, index, round_))
            pids.add(one(conn, "SELECT pg_backend_pid()"))
            conn.execute("SET LOCAL statement_timeout = '5s'")
            conn.execute("SELECT pg_sleep(0.02)")
        written += 1
        assert value_of(conn, base) == round_, "committed row missing"

        # A transaction that rolls back.
        with conn.transaction(force_rollback=True):
            conn.execute(INSERT, (base + 1, index, round_))
            assert value_of(conn, base + 1) == round_
        assert value_of(conn, base + 1) is None, "rolled-back row visible"

        # Session settings hold in later transactions, SET LOCAL does not, and no
        # other client's settings reach this one.
        assert show(conn, "application_name") == expect_app, (show(conn, "application_name"), expect_app)
        assert show(conn, "search_path") == expect_path, (show(conn, "search_path"), expect_path)
        assert show(conn, "statement_timeout") == "0", show(conn, "statement_timeout")
        if sets_its_own:
            assert one(conn, "SELECT place FROM whereami") == SCHEMA
        else:
            expect_error(errors.UndefinedTable, lambda: conn.execute("SELECT place FROM whereami"), "whereami")

        # A failing statement, then the same prepared statement succeeds.
        expect_error(errors.DivisionByZero, lambda: conn.execute(DIVIDE, (0,)), "10 / 0")
        assert one(conn, DIVIDE, (2,)) == 5

        # A unique violation, then the connection is usable.
        expect_error(errors.UniqueViolation, lambda: conn.execute(INSERT, (base, index, 0)), "duplicate id")
        assert value_of(conn, base) == round_

        # An error inside a transaction: the transaction is aborted until ROLLBACK.
        conn.execute("BEGIN")
        conn.execute(INSERT, (base + 2, index, round_))
        expect_error(errors.DivisionByZero, lambda: conn.execute(DIVIDE, (0,)), "10 / 0 in a transaction")
        expect_error(errors.InFailedSqlTransaction, lambda: conn.execute("SELECT 1"), "after an error")
        conn.execute("ROLLBACK")
        assert value_of(conn, base + 2) is None, "row of an aborted transaction visible"
        assert one(conn, "SELECT 1") == 1

        # The same through the transaction block: the exception rolls it back.
        def failing_block():
            with conn.transaction():
                conn.execute(INSERT, (base + 3, index, round_))
                conn.execute(INSERT, (base + 3, index, round_))

        expect_error(errors.UniqueViolation, failing_block, "duplicate in a transaction block")
        assert value_of(conn, base + 3) is None

        # Pipeline mode: several prepared statements in flight, then one Sync.
        with conn.pipeline() as pipeline:
            conn.execute(INSERT, (base + 4, index, round_))
            conn.execute(INSERT, (base + 5, index, round_))
            check = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id IN (%s, %s)", (base + 4, base + 5))
            pipeline.sync()
            assert check.fetchone()[0] == 2
        written += 2

    # COPY in and out, text and binary.
    rows = [(100000 + index * 1000 + k, index, k * k) for k in range(200)]
    with conn.cursor() as cur:
        with cur.copy(f"COPY {TABLE} (id, worker, val) FROM STDIN") as copy:
            for row in rows[:100]:
                copy.write_row(row)
        with cur.copy(f"COPY {TABLE} (id, worker, val) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int4", "int4"])
            for row in rows[100:]:
                copy.write_row(row)
        written += len(rows)
        query = f"COPY (SELECT id, worker, val FROM {TABLE} WHERE id >= 100000 AND worker = {index} ORDER BY id) TO STDOUT"
        with cur.copy(query) as copy:
            copy.set_types(["int4", "int4", "int4"])
            copied = list(copy.rows())
        assert copied == rows, "COPY TO STDOUT returned other rows"
        with cur.copy(query.replace("TO STDOUT", "TO STDOUT (FORMAT BINARY)")) as copy:
            copy.set_types(["int4", "int4", "int4"])
            copied = list(copy.rows())
        assert copied == rows, "binary COPY TO STDOUT returned other rows"

    # A COPY that fails on a duplicate key, then a COPY inside a transaction that rolls back.
    def failing_copy():
        with conn.cursor() as cur, cur.copy(f"COPY {TABLE} (id, worker, val) FROM STDIN") as copy:
            copy.write_row((200000 + index, index, 0))
            copy.write_row(rows[0])

    expect_error(errors.UniqueViolation, failing_copy, "COPY of a duplicate id")
    assert value_of(conn, 200000 + index) is None
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        with cur.copy(f"COPY {TABLE} (id, worker, val) FROM STDIN") as copy:
            copy.write_row((300000 + index, index, 1))
        assert value_of(conn, 300000 + index) == 1
    assert value_of(conn, 300000 + index) is None
    assert show(conn, "application_name") == expect_app
    rows_written.append(written)
    conn.close()


def run_workers():
    barrier = threading.Barrier(WORKERS, timeout=30)
    pids = set()
    rows_written = []
    failures = []

    def run(index):
        try:
            worker(index, barrier, pids, rows_written)
        except BaseException:
            failures.append(f"worker {index}:\n{traceback.format_exc()}")
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a worker hung"
    if failures:
        raise AssertionError("\n".join(failures))
    assert len(rows_written) == WORKERS
    log(f"{WORKERS} concurrent clients used {len(pids)} server connections: {sorted(pids)}")
    # Transaction mode shares fewer servers among more clients; session mode gives each its own.
    assert SESSION_MODE or WORKERS > POOL_SIZE
    assert 1 <= len(pids) <= POOL_SIZE, f"{len(pids)} server connections for a pool of {POOL_SIZE}"
    with connect() as conn:
        total = one(conn, f"SELECT count(*) FROM {TABLE}")
        assert total == sum(rows_written), (total, sum(rows_written))


def pipeline_checks():
    with connect() as conn:
        # Many statements in one pipeline, with Syncs between them.
        with conn.pipeline() as pipeline:
            cursors = [conn.execute(INSERT, (500000 + k, 99, k)) for k in range(20)]
            pipeline.sync()
            count = conn.execute(f"SELECT count(*), sum(val) FROM {TABLE} WHERE worker = 99")
        assert all(cur.rowcount == 1 for cur in cursors)
        assert count.fetchone() == (20, sum(range(20)))

        # An error in a pipeline aborts the rest up to the Sync; the connection stays usable.
        def failing_pipeline():
            with conn.pipeline():
                conn.execute(INSERT, (600000, 99, 0))
                conn.execute(INSERT, (500000, 99, 0))  # duplicate
                conn.execute(INSERT, (600001, 99, 0))

        expect_error(errors.UniqueViolation, failing_pipeline, "duplicate in a pipeline")
        # Up to the Sync the statements form one implicit transaction: none of them stays.
        assert value_of(conn, 600000) is None
        assert value_of(conn, 600001) is None

        # A transaction in a pipeline, rolled back by an error.
        def failing_transaction():
            with conn.pipeline(), conn.transaction():
                conn.execute(INSERT, (700000, 99, 0))
                conn.execute(DIVIDE, (0,))

        expect_error(errors.DivisionByZero, failing_transaction, "error in a pipelined transaction")
        assert value_of(conn, 700000) is None

        # A transaction in a pipeline that commits, with a SET that persists.
        with conn.pipeline(), conn.transaction():
            conn.execute(INSERT, (700001, 99, 1))
            conn.execute("SET application_name = 'psycopg_pipeline'")
        assert value_of(conn, 700001) == 1
        assert show(conn, "application_name") == "psycopg_pipeline"

    # Without autocommit: psycopg opens a transaction implicitly and holds it until commit().
    with connect(autocommit=False) as conn:
        conn.execute(INSERT, (800000, 98, 1))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.rollback()
        assert value_of(conn, 800000) is None
        conn.execute(INSERT, (800001, 98, 1))
        conn.commit()
        assert value_of(conn, 800001) == 1
        conn.commit()


# The server connections the suite's user holds apart from pgrelay's listener connection.
SERVERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE usename = current_user"
    " AND backend_type = 'client backend' AND application_name <> 'pgrelay listener'"
)


def payloads(conn, count):
    return [(n.channel, n.payload) for n in conn.notifies(timeout=10, stop_after=count)]


def listen_fanout():
    """listen_notify = "fanout" (transaction mode, the default): more clients LISTEN than
    the pool has servers, with prepared statements (prepare_threshold=0) and inside a
    transaction; pgrelay answers the LISTENs, holds one listener connection for them all,
    and each client gets every notification through notifies() while it holds no server."""
    channel = f"drv_fan_{USER}"
    marker = f"drv_fan_mark_{USER}"
    listeners = [connect() for _ in range(POOL_SIZE + 2)]
    in_tx = connect(autocommit=False)
    sender = connect()
    try:
        for conn in listeners:
            conn.execute(f"LISTEN {channel}")
            conn.execute(f"LISTEN {marker}")
        # Inside a transaction a LISTEN takes effect at COMMIT, as on the server.
        in_tx.execute(f"LISTEN {channel}")
        assert in_tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        sender.execute(f"NOTIFY {channel}, 'before commit'")
        in_tx.commit()
        servers = one(sender, SERVERS)
        assert servers <= POOL_SIZE, f"{len(listeners) + 1} listening clients hold {servers} servers"
        # The server connection a client gets knows nothing of its channels.
        assert one(listeners[0], "SELECT count(*) FROM pg_listening_channels()") == 0
        sender.execute(f"NOTIFY {channel}, 'to all'")
        # The others listened already when 'before commit' was sent.
        for index, conn in enumerate(listeners):
            got = payloads(conn, 2)
            assert got == [(channel, "before commit"), (channel, "to all")], f"listener {index}: {got}"
        got = payloads(in_tx, 1)
        assert got == [(channel, "to all")], f"the listener that LISTENed in a transaction: {got}"
        # UNLISTEN stops delivery to that client; a NOTIFY rolled back reaches nobody.
        listeners[0].execute(f"UNLISTEN {channel}")
        sender.execute(f"NOTIFY {channel}, 'after unlisten'")
        with sender.transaction():
            sender.execute(f"NOTIFY {channel}, 'rolled back'")
            raise psycopg.Rollback()
        sender.execute(f"NOTIFY {marker}, 'marker'")
        got = payloads(listeners[0], 1)
        assert got == [(marker, "marker")], f"after UNLISTEN: {got}"
        got = payloads(listeners[1], 2)
        assert got == [(channel, "after unlisten"), (marker, "marker")], f"after a rollback: {got}"
    finally:
        for conn in listeners + [in_tx, sender]:
            conn.close()


def listen_notify():
    """LISTEN/NOTIFY with the notifies() generator: the listener gets each notification
    while it sends nothing; the sender is another connection. In session mode the listener
    LISTENs on its own server; in transaction mode pgrelay's listener connection does."""
    channel = f"drv_chan_{USER}"
    with connect() as listener, connect() as sender:
        listener.execute(f"LISTEN {channel}")
        # The first notification right after LISTEN is not lost.
        sender.execute(f"NOTIFY {channel}, 'first'")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=1)]
        assert got == [(channel, "first")], f"the first notification: {got}"
        # Fifty committed together reach the listener's server in one batch: all of them
        # come, in order.
        sender.execute(f"SELECT pg_notify('{channel}', 'n' || g) FROM generate_series(1, 50) g")
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=50)]
        assert got == [f"n{g}" for g in range(1, 51)], f"a batch of 50: {got}"
        # Sent from a transaction: delivered when it commits.
        with sender.transaction():
            for k in range(3):
                sender.execute(f"NOTIFY {channel}, 'tx{k}'")
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=3)]
        assert got == ["tx0", "tx1", "tx2"], f"from a transaction: {got}"
        # The listener works as usual in between, and still listens afterwards. Only a
        # session-mode client's own server LISTENs (see docs/notifications.md).
        listening = listener.execute("SELECT pg_listening_channels()").fetchall()
        assert listening == ([(channel,)] if SESSION_MODE else []), listening
        sender.execute(f"NOTIFY {channel}, 'after a query'")
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
        assert got == ["after a query"], f"after a query: {got}"
        listener.execute(f"UNLISTEN {channel}")
        assert one(listener, "SELECT count(*) FROM pg_listening_channels()") == 0


class SourceFailed(Exception):
    pass


def copy_aborted_by_client():
    """An exception inside `with cur.copy(...)`: psycopg ends the COPY with CopyFail and
    its own message, expects the server's 57014 for it, and re-raises the exception; the
    connection goes on working, and a transaction is failed until it rolls back."""

    def aborted(conn, base):
        with conn.cursor() as cur, cur.copy(f"COPY {TABLE} (id, worker, val) FROM STDIN") as copy:
            copy.write_row((base, 96, 0))
            copy.write(f"{base + 1}\t96\t1\n".encode())
            raise SourceFailed("the data source failed")

    with connect() as conn:
        for round_ in range(3):
            expect_error(SourceFailed, lambda: aborted(conn, 1_000_000 + 10 * round_), "an exception in copy")
            assert one(conn, "SELECT 1 FROM pg_sleep(0.05)") == 1, "the next statement"
        assert one(conn, f"SELECT count(*) FROM {TABLE} WHERE worker = 96") == 0
    with connect(autocommit=False) as conn:
        conn.execute(INSERT, (1_100_000, 96, 0))
        expect_error(SourceFailed, lambda: aborted(conn, 1_100_001), "an exception in copy in a transaction")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert value_of(conn, 1_100_000) is None
        assert one(conn, "SELECT 1 FROM pg_sleep(0.05)") == 1, "the next statement"
        conn.commit()


def main():
    started = time.monotonic()
    log(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}), {WORKERS} clients, pool of {POOL_SIZE}")
    setup()
    run_workers()
    log("workers done")
    pipeline_checks()
    log("pipeline checks done")
    listen_notify()
    log("LISTEN/NOTIFY done")
    if not SESSION_MODE:
        listen_fanout()
        log("LISTEN/NOTIFY fan-out done")
    copy_aborted_by_client()
    log("COPY aborted by the client done")
    with connect() as conn:
        conn.execute(f"DROP TABLE {TABLE}")
        conn.execute(f"DROP TABLE {SCHEMA}.whereami")
    log(f"ok in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
