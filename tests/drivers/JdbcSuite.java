// pgjdbc through a transaction-mode pgrelay pool smaller than the number of clients.
//
// Run by tests/drivers.rs (compiled into target/driver-java) with the connection details in
// PGRELAY_* variables. prepareThreshold=1 makes every PreparedStatement a named server-side
// statement (S_1, S_2, ...) from its first execution; executeBatch pipelines several
// Bind/Execute pairs before one Sync; clients LISTEN and read getNotifications(). Exits
// non-zero at the first failed check.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashSet;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public final class JdbcSuite {
    static final String HOST = env("PGRELAY_HOST");
    static final int PORT = Integer.parseInt(env("PGRELAY_PORT"));
    static final String USER = env("PGRELAY_USER");
    static final String PASSWORD = env("PGRELAY_PASSWORD");
    static final String DATABASE = env("PGRELAY_DATABASE");
    static final String SCHEMA = env("PGRELAY_SCHEMA"); // owned by USER, made by the harness
    static final int POOL_SIZE = Integer.parseInt(env("PGRELAY_POOL_SIZE"));
    static final int WORKERS = Integer.parseInt(System.getenv().getOrDefault("PGRELAY_WORKERS", "8"));
    static final boolean SESSION_MODE = "session".equals(System.getenv("PGRELAY_POOL_MODE"));
    static final int ROUNDS = Integer.parseInt(System.getenv().getOrDefault("PGRELAY_ROUNDS", "6"));

    static final String TABLE = "drv_jdbc";
    static final String INSERT = "INSERT INTO " + TABLE + " (id, worker, val) VALUES (?, ?, ?)";
    static final String SELECT_VAL = "SELECT val FROM " + TABLE + " WHERE id = ?";
    static final String DIVIDE = "SELECT 10 / ?::int";

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null) {
            throw new IllegalStateException(name + " is not set");
        }
        return value;
    }

    static void log(String message) {
        System.out.printf("[pgjdbc %tT] %s%n", new java.util.Date(), message);
        System.out.flush();
    }

    static void check(boolean condition, String what) {
        if (!condition) {
            throw new AssertionError(what);
        }
    }

    static void checkEquals(Object expected, Object actual, String what) {
        if (expected == null ? actual != null : !expected.equals(actual)) {
            throw new AssertionError(what + ": expected <" + expected + "> but was <" + actual + ">");
        }
    }

    interface SqlAction {
        void run() throws SQLException;
    }

    static SQLException expectError(String sqlState, SqlAction action, String what) {
        try {
            action.run();
        } catch (SQLException error) {
            checkEquals(sqlState, error.getSQLState(), what + " (" + error.getMessage() + ")");
            return error;
        }
        throw new AssertionError(what + ": expected SQLSTATE " + sqlState + ", got no error");
    }

    static Connection connect(String applicationName) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", USER);
        props.setProperty("password", PASSWORD);
        props.setProperty("prepareThreshold", "1");
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "30");
        props.setProperty("sslmode", "disable");
        if (applicationName != null) {
            props.setProperty("ApplicationName", applicationName);
        }
        return DriverManager.getConnection("jdbc:postgresql://" + HOST + ":" + PORT + "/" + DATABASE, props);
    }

    static String one(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            check(rs.next(), "no row for " + sql);
            return rs.getString(1);
        }
    }

    static Integer valueOf(PreparedStatement select, int id) throws SQLException {
        select.setInt(1, id);
        try (ResultSet rs = select.executeQuery()) {
            return rs.next() ? rs.getInt(1) : null;
        }
    }

    static void insert(PreparedStatement insert, int id, int worker, int val) throws SQLException {
        insert.setInt(1, id);
        insert.setInt(2, worker);
        insert.setInt(3, val);
        checkEquals(1, insert.executeUpdate(), "rows inserted");
    }

    static int divide(PreparedStatement divide, int by) throws SQLException {
        divide.setInt(1, by);
        try (ResultSet rs = divide.executeQuery()) {
            check(rs.next(), "no quotient");
            return rs.getInt(1);
        }
    }

    static void setup() throws SQLException {
        try (Connection conn = connect(null); Statement st = conn.createStatement()) {
            st.execute("DROP TABLE IF EXISTS " + TABLE);
            st.execute("DROP TABLE IF EXISTS " + SCHEMA + ".whereami");
            st.execute("CREATE TABLE " + TABLE + " (id int PRIMARY KEY, worker int NOT NULL, val int NOT NULL)");
            st.execute("CREATE TABLE " + SCHEMA + ".whereami (place text)");
            st.execute("INSERT INTO " + SCHEMA + ".whereami VALUES ('" + SCHEMA + "')");
        }
    }

    static int worker(int index, CyclicBarrier barrier, Set<Integer> pids) throws Exception {
        boolean setsItsOwn = index % 2 == 0;
        // Odd workers send application_name at startup instead: that too must stay theirs.
        String startupApp = setsItsOwn ? null : "jdbc_startup_w" + index;
        int written = 0;
        try (Connection conn = connect(startupApp)) {
            barrier.await(30, TimeUnit.SECONDS); // all client connections are open at once
            String defaultPath = one(conn, "SHOW search_path");
            String expectApp;
            String expectPath;
            if (setsItsOwn) {
                try (Statement st = conn.createStatement()) {
                    st.execute("SET application_name = 'jdbc_w" + index + "'");
                    st.execute("SET search_path TO " + SCHEMA + ", public");
                }
                expectApp = "jdbc_w" + index;
                expectPath = SCHEMA + ", public";
            } else {
                expectApp = startupApp;
                expectPath = defaultPath;
            }
            try (PreparedStatement insert = conn.prepareStatement(INSERT);
                    PreparedStatement select = conn.prepareStatement(SELECT_VAL);
                    PreparedStatement divide = conn.prepareStatement(DIVIDE);
                    PreparedStatement pid = conn.prepareStatement("SELECT pg_backend_pid()");
                    PreparedStatement whereami = conn.prepareStatement("SELECT place FROM whereami");
                    PreparedStatement count = conn.prepareStatement(
                            "SELECT count(*) FROM " + TABLE + " WHERE worker = ? AND id BETWEEN ? AND ?")) {
                for (int round = 0; round < ROUNDS; round++) {
                    int base = index * 1000 + round * 10;

                    // Commit; the transaction holds its server connection a while so they overlap.
                    conn.setAutoCommit(false);
                    insert(insert, base, index, round);
                    try (ResultSet rs = pid.executeQuery()) {
                        check(rs.next(), "no pid");
                        pids.add(rs.getInt(1));
                    }
                    try (Statement st = conn.createStatement()) {
                        st.execute("SET LOCAL statement_timeout = '5s'");
                        st.execute("SELECT pg_sleep(0.02)");
                    }
                    conn.commit();
                    written += 1;
                    conn.setAutoCommit(true);
                    checkEquals(round, valueOf(select, base), "committed row");

                    // Rollback.
                    conn.setAutoCommit(false);
                    insert(insert, base + 1, index, round);
                    checkEquals(round, valueOf(select, base + 1), "row inside its transaction");
                    conn.rollback();
                    conn.setAutoCommit(true);
                    checkEquals(null, valueOf(select, base + 1), "rolled-back row");

                    // Settings hold across transactions, SET LOCAL does not, nothing leaks.
                    checkEquals(expectApp, one(conn, "SHOW application_name"), "application_name");
                    checkEquals(expectPath, one(conn, "SHOW search_path"), "search_path");
                    checkEquals(setsItsOwn ? SCHEMA : "public", conn.getSchema(), "current_schema()");
                    checkEquals("0", one(conn, "SHOW statement_timeout"), "statement_timeout");
                    if (setsItsOwn) {
                        try (ResultSet rs = whereami.executeQuery()) {
                            check(rs.next(), "no place");
                            checkEquals(SCHEMA, rs.getString(1), "whereami");
                        }
                    } else {
                        expectError("42P01", () -> whereami.executeQuery().close(), "whereami");
                    }

                    // A failing statement, then the same prepared statement works.
                    expectError("22012", () -> divide(divide, 0), "10 / 0");
                    checkEquals(5, divide(divide, 2), "10 / 2");

                    // A unique violation.
                    expectError("23505", () -> insert(insert, base, index, 0), "duplicate id");
                    checkEquals(round, valueOf(select, base), "row after a duplicate");

                    // An error inside a transaction: aborted until ROLLBACK.
                    conn.setAutoCommit(false);
                    insert(insert, base + 2, index, round);
                    expectError("22012", () -> divide(divide, 0), "10 / 0 in a transaction");
                    expectError("25P02", () -> valueOf(select, base), "after an error");
                    conn.rollback();
                    conn.setAutoCommit(true);
                    checkEquals(null, valueOf(select, base + 2), "row of an aborted transaction");

                    // A batch: several Bind/Execute before one Sync, in a transaction.
                    conn.setAutoCommit(false);
                    for (int k = 3; k < 8; k++) {
                        insert.setInt(1, base + k);
                        insert.setInt(2, index);
                        insert.setInt(3, round);
                        insert.addBatch();
                    }
                    int[] counts = insert.executeBatch();
                    conn.commit();
                    conn.setAutoCommit(true);
                    written += counts.length;
                    checkEquals(5, counts.length, "batch size");
                    for (int updated : counts) {
                        checkEquals(1, updated, "batch row count");
                    }
                    count.setInt(1, index);
                    count.setInt(2, base + 3);
                    count.setInt(3, base + 7);
                    try (ResultSet rs = count.executeQuery()) {
                        check(rs.next(), "no count");
                        checkEquals(5, rs.getInt(1), "batch rows");
                    }

                    // A batch with a duplicate fails as a whole in its transaction.
                    conn.setAutoCommit(false);
                    insert.setInt(1, base + 8);
                    insert.setInt(2, index);
                    insert.setInt(3, round);
                    insert.addBatch();
                    insert.setInt(1, base);
                    insert.addBatch();
                    expectError("23505", insert::executeBatch, "batch with a duplicate");
                    conn.rollback();
                    conn.setAutoCommit(true);
                    checkEquals(null, valueOf(select, base + 8), "row of a failed batch");
                }
            }

            // COPY in and out with CopyManager, then a failing COPY and a rolled-back one.
            CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder data = new StringBuilder();
            List<String> expected = new ArrayList<>();
            for (int k = 0; k < 200; k++) {
                String line = (100000 + index * 1000 + k) + "\t" + index + "\t" + (k * k);
                data.append(line).append('\n');
                expected.add(line);
            }
            long copied = copy.copyIn("COPY " + TABLE + " (id, worker, val) FROM STDIN", new StringReader(data.toString()));
            checkEquals(200L, copied, "rows copied in");
            written += 200;
            StringWriter out = new StringWriter();
            long copiedOut = copy.copyOut("COPY (SELECT id, worker, val FROM " + TABLE + " WHERE id >= 100000 AND worker = "
                    + index + " ORDER BY id) TO STDOUT", out);
            checkEquals(200L, copiedOut, "rows copied out");
            List<String> lines = new ArrayList<>(List.of(out.toString().split("\n")));
            checkEquals(expected, lines, "COPY TO STDOUT");

            String duplicate = (200000 + index) + "\t" + index + "\t0\n" + expected.get(0) + "\n";
            expectError("23505", () -> {
                try {
                    copy.copyIn("COPY " + TABLE + " (id, worker, val) FROM STDIN", new StringReader(duplicate));
                } catch (java.io.IOException e) {
                    throw new SQLException(e);
                }
            }, "COPY of a duplicate id");
            try (PreparedStatement select = conn.prepareStatement(SELECT_VAL)) {
                checkEquals(null, valueOf(select, 200000 + index), "row of a failed COPY");
                conn.setAutoCommit(false);
                copy.copyIn("COPY " + TABLE + " (id, worker, val) FROM STDIN",
                        new StringReader((300000 + index) + "\t" + index + "\t1\n"));
                checkEquals(1, valueOf(select, 300000 + index), "row copied in a transaction");
                conn.rollback();
                conn.setAutoCommit(true);
                checkEquals(null, valueOf(select, 300000 + index), "row of a rolled-back COPY");
            }
            checkEquals(expectApp, one(conn, "SHOW application_name"), "application_name at the end");
        }
        return written;
    }

    /** The server connections the suite's user holds apart from pgrelay's listener connection. */
    static final String SERVERS = "SELECT count(*) FROM pg_stat_activity WHERE usename = current_user"
            + " AND backend_type = 'client backend' AND application_name <> 'pgrelay listener'";

    static void exec(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute(sql);
        }
    }

    /** The next `count` notifications of `conn` as "channel:payload", through getNotifications. */
    static List<String> notifications(Connection conn, int count, String what) throws SQLException {
        PGConnection pg = conn.unwrap(PGConnection.class);
        List<String> got = new ArrayList<>();
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
        while (got.size() < count) {
            long left = TimeUnit.NANOSECONDS.toMillis(deadline - System.nanoTime());
            check(left > 0, what + ": " + got.size() + " of " + count + " notifications within 10 s: " + got);
            PGNotification[] batch = pg.getNotifications((int) left);
            if (batch != null) {
                for (PGNotification notification : batch) {
                    got.add(notification.getName() + ":" + notification.getParameter());
                }
            }
        }
        return got;
    }

    /**
     * listen_notify = "fanout" (transaction mode, the default): more clients LISTEN (the
     * extended protocol, as pgjdbc sends every statement) than the pool has servers, one
     * of them with autoCommit off; pgrelay answers the LISTENs, holds one listener
     * connection for them all, and each client gets every notification through
     * getNotifications() while it holds no server.
     */
    static void listenFanout() throws Exception {
        String channel = "drv_fan_" + USER;
        String marker = "drv_fan_mark_" + USER;
        List<Connection> listeners = new ArrayList<>();
        try (Connection sender = connect(null)) {
            for (int i = 0; i < POOL_SIZE + 2; i++) {
                listeners.add(connect(null));
            }
            for (Connection conn : listeners.subList(0, listeners.size() - 1)) {
                exec(conn, "LISTEN " + channel);
                exec(conn, "LISTEN " + marker);
            }
            // With autoCommit off the LISTEN goes with pgjdbc's BEGIN and takes effect at
            // commit, as on the server.
            Connection inTx = listeners.get(listeners.size() - 1);
            inTx.setAutoCommit(false);
            exec(inTx, "LISTEN " + channel);
            exec(sender, "NOTIFY " + channel + ", 'before commit'");
            inTx.commit();
            inTx.setAutoCommit(true);
            int servers = Integer.parseInt(one(sender, SERVERS));
            check(servers <= POOL_SIZE, listeners.size() + " listening clients hold " + servers + " servers");
            // The server connection a client gets knows nothing of its channels.
            checkEquals("0", one(listeners.get(0), "SELECT count(*) FROM pg_listening_channels()"),
                    "channels of the server connection");
            exec(sender, "NOTIFY " + channel + ", 'to all'");
            // The others listened already when 'before commit' was sent.
            for (int i = 0; i < listeners.size() - 1; i++) {
                checkEquals(List.of(channel + ":before commit", channel + ":to all"),
                        notifications(listeners.get(i), 2, "listener " + i), "listener " + i);
            }
            checkEquals(List.of(channel + ":to all"), notifications(inTx, 1, "the listener with autoCommit off"),
                    "the listener with autoCommit off");
            // UNLISTEN stops delivery to that client; a NOTIFY rolled back reaches nobody.
            exec(listeners.get(0), "UNLISTEN " + channel);
            exec(sender, "NOTIFY " + channel + ", 'after unlisten'");
            sender.setAutoCommit(false);
            exec(sender, "NOTIFY " + channel + ", 'rolled back'");
            sender.rollback();
            sender.setAutoCommit(true);
            exec(sender, "NOTIFY " + marker + ", 'marker'");
            checkEquals(List.of(marker + ":marker"), notifications(listeners.get(0), 1, "after UNLISTEN"),
                    "after UNLISTEN");
            checkEquals(List.of(channel + ":after unlisten", marker + ":marker"),
                    notifications(listeners.get(1), 2, "after a rollback"), "after a rollback");
        } finally {
            for (Connection conn : listeners) {
                conn.close();
            }
        }
    }

    public static void main(String[] args) throws Exception {
        long started = System.nanoTime();
        log("pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION + ", " + WORKERS + " clients, pool of "
                + POOL_SIZE);
        setup();
        CyclicBarrier barrier = new CyclicBarrier(WORKERS);
        Set<Integer> pids = Collections.synchronizedSet(new HashSet<>());
        ExecutorService executor = Executors.newFixedThreadPool(WORKERS);
        List<Future<Integer>> futures = new ArrayList<>();
        for (int i = 0; i < WORKERS; i++) {
            final int index = i;
            futures.add(executor.submit(() -> worker(index, barrier, pids)));
        }
        int written = 0;
        List<String> failures = new ArrayList<>();
        for (int i = 0; i < WORKERS; i++) {
            try {
                written += futures.get(i).get(60, TimeUnit.SECONDS);
            } catch (Exception e) {
                StringWriter trace = new StringWriter();
                (e.getCause() != null ? e.getCause() : e).printStackTrace(new java.io.PrintWriter(trace));
                failures.add("worker " + i + ": " + trace);
                barrier.reset();
            }
        }
        executor.shutdownNow();
        if (!failures.isEmpty()) {
            throw new AssertionError(String.join("\n", failures));
        }
        log(WORKERS + " concurrent clients used " + pids.size() + " server connections: " + pids);
        check(SESSION_MODE || WORKERS > POOL_SIZE, "more clients than servers");
        check(pids.size() >= 1 && pids.size() <= POOL_SIZE, pids.size() + " server connections for a pool of " + POOL_SIZE);
        if (!SESSION_MODE) {
            listenFanout();
            log("LISTEN/NOTIFY fan-out done");
        }
        try (Connection conn = connect(null)) {
            checkEquals(String.valueOf(written), one(conn, "SELECT count(*) FROM " + TABLE), "rows in the table");
            try (Statement st = conn.createStatement()) {
                st.execute("DROP TABLE " + TABLE);
                st.execute("DROP TABLE " + SCHEMA + ".whereami");
            }
        }
        log(String.format("ok in %.1fs", (System.nanoTime() - started) / 1e9));
    }
}
