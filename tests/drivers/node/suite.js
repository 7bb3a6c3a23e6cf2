// node-postgres (pg) through a transaction-mode pgrelay pool smaller than the number of
// clients. Run by tests/drivers.rs with the connection details in PGRELAY_* variables and
// NODE_PATH pointing at the installed node_modules (target/driver-node). Queries with a
// `name` are named server-side prepared statements, parsed once per connection; clients
// LISTEN and get notifications as `notification` events. Exits non-zero at the first
// failed check.
'use strict'

const assert = require('node:assert/strict')
const { Readable } = require('node:stream')
const { pipeline } = require('node:stream/promises')
const pg = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')

const env = process.env
const config = {
  host: env.PGRELAY_HOST,
  port: Number(env.PGRELAY_PORT),
  user: env.PGRELAY_USER,
  password: env.PGRELAY_PASSWORD,
  database: env.PGRELAY_DATABASE,
  connectionTimeoutMillis: 10000,
  query_timeout: 30000,
}
const SCHEMA = env.PGRELAY_SCHEMA // owned by the user, made by the harness
const POOL_SIZE = Number(env.PGRELAY_POOL_SIZE)
const WORKERS = Number(env.PGRELAY_WORKERS || 8)
const SESSION_MODE = env.PGRELAY_POOL_MODE === 'session'
const ROUNDS = Number(env.PGRELAY_ROUNDS || 6)

const TABLE = 'drv_node'
const INSERT = { name: 'insert', text: `INSERT INTO ${TABLE} (id, worker, val) VALUES ($1, $2, $3)` }
const SELECT_VAL = { name: 'select_val', text: `SELECT val FROM ${TABLE} WHERE id = $1` }
const DIVIDE = { name: 'divide', text: 'SELECT 10 / $1::int AS q' }

function log(message) {
  console.log(`[node-postgres ${new Date().toISOString().slice(11, 19)}] ${message}`)
}

const named = (statement, values) => ({ ...statement, values })

async function valueOf(client, id) {
  const result = await client.query(named(SELECT_VAL, [id]))
  return result.rows.length ? result.rows[0].val : null
}

async function show(client, setting) {
  return (await client.query(`SHOW ${setting}`)).rows[0][setting]
}

async function expectError(code, promise, what) {
  try {
    await promise
  } catch (error) {
    assert.equal(error.code, code, `${what}: ${error.message}`)
    return error
  }
  assert.fail(`${what}: expected SQLSTATE ${code}, got no error`)
}

async function connect(extra = {}) {
  const client = new pg.Client({ ...config, ...extra })
  await client.connect()
  return client
}

async function setup() {
  const client = await connect()
  try {
    await client.query(`DROP TABLE IF EXISTS ${TABLE}`)
    await client.query(`DROP TABLE IF EXISTS ${SCHEMA}.whereami`)
    await client.query(`CREATE TABLE ${TABLE} (id int PRIMARY KEY, worker int NOT NULL, val int NOT NULL)`)
    await client.query(`CREATE TABLE ${SCHEMA}.whereami (place text)`)
    await client.query(`INSERT INTO ${SCHEMA}.whereami VALUES ($1)`, [SCHEMA])
  } finally {
    await client.end()
  }
}

// A barrier: every worker is connected before any starts.
function barrier(count) {
  let arrived = 0
  let release
  const all = new Promise((resolve) => (release = resolve))
  return () => {
    arrived += 1
    if (arrived === count) release()
    return all
  }
}

async function worker(index, wait, pids) {
  const setsItsOwn = index % 2 === 0
  // Odd workers send application_name at startup instead: that too must stay theirs.
  const startupApp = setsItsOwn ? undefined : `node_startup_w${index}`
  const client = await connect(startupApp ? { application_name: startupApp } : {})
  await wait()
  const defaultPath = await show(client, 'search_path')
  let expectApp, expectPath
  if (setsItsOwn) {
    await client.query(`SET application_name = 'node_w${index}'`)
    await client.query(named({ name: 'set_path', text: `SET search_path TO ${SCHEMA}, public` }, []))
    ;[expectApp, expectPath] = [`node_w${index}`, `${SCHEMA}, public`]
  } else {
    ;[expectApp, expectPath] = [startupApp, defaultPath]
  }
  let written = 0
  for (let round = 0; round < ROUNDS; round++) {
    const base = index * 1000 + round * 10

    // Commit; the transaction holds its server connection a while so they overlap.
    await client.query('BEGIN')
    await client.query(named(INSERT, [base, index, round]))
    pids.add((await client.query({ name: 'pid', text: 'SELECT pg_backend_pid() AS pid' })).rows[0].pid)
    await client.query("SET LOCAL statement_timeout = '5s'")
    await client.query(named({ name: 'sleep', text: 'SELECT pg_sleep($1)' }, [0.02]))
    await client.query('COMMIT')
    written += 1
    assert.equal(await valueOf(client, base), round, 'committed row missing')

    // Rollback.
    await client.query('BEGIN')
    await client.query(named(INSERT, [base + 1, index, round]))
    assert.equal(await valueOf(client, base + 1), round)
    await client.query('ROLLBACK')
    assert.equal(await valueOf(client, base + 1), null, 'rolled-back row visible')

    // Settings hold across transactions, SET LOCAL does not, nothing leaks.
    assert.equal(await show(client, 'application_name'), expectApp)
    assert.equal(await show(client, 'search_path'), expectPath)
    assert.equal(await show(client, 'statement_timeout'), '0')
    const whereami = { name: 'whereami', text: 'SELECT place FROM whereami' }
    if (setsItsOwn) {
      assert.equal((await client.query(whereami)).rows[0].place, SCHEMA)
    } else {
      await expectError('42P01', client.query(whereami), 'whereami')
    }

    // A failing statement (at execution and at Bind), then the same statement works.
    await expectError('22012', client.query(named(DIVIDE, [0])), '10 / 0')
    await expectError('22P02', client.query(named(DIVIDE, ['not a number'])), 'a bad parameter')
    assert.equal((await client.query(named(DIVIDE, [2]))).rows[0].q, 5)

    // A unique violation.
    await expectError('23505', client.query(named(INSERT, [base, index, 0])), 'duplicate id')
    assert.equal(await valueOf(client, base), round)

    // An error inside a transaction: aborted until ROLLBACK.
    await client.query('BEGIN')
    await client.query(named(INSERT, [base + 2, index, round]))
    await expectError('22012', client.query(named(DIVIDE, [0])), '10 / 0 in a transaction')
    await expectError('25P02', client.query(named(SELECT_VAL, [base])), 'after an error')
    await client.query('ROLLBACK')
    assert.equal(await valueOf(client, base + 2), null)
    assert.equal((await client.query('SELECT 1 AS one')).rows[0].one, 1)
  }

  // COPY in and out (pg-copy-streams), then a failing COPY and a rolled-back one.
  const rows = Array.from({ length: 200 }, (_, k) => [100000 + index * 1000 + k, index, k * k])
  await pipeline(
    Readable.from(rows.map((row) => row.join('\t') + '\n')),
    client.query(copyFrom(`COPY ${TABLE} (id, worker, val) FROM STDIN`))
  )
  written += rows.length
  const chunks = []
  const out = client.query(
    copyTo(`COPY (SELECT id, worker, val FROM ${TABLE} WHERE id >= 100000 AND worker = ${index} ORDER BY id) TO STDOUT`)
  )
  for await (const chunk of out) chunks.push(chunk)
  const copied = Buffer.concat(chunks)
    .toString()
    .split('\n')
    .filter(Boolean)
    .map((line) => line.split('\t').map(Number))
  assert.deepEqual(copied, rows, 'COPY TO STDOUT returned other rows')

  await expectError(
    '23505',
    pipeline(
      Readable.from([`${200000 + index}\t${index}\t0\n`, `${rows[0][0]}\t${index}\t0\n`]),
      client.query(copyFrom(`COPY ${TABLE} (id, worker, val) FROM STDIN`))
    ),
    'COPY of a duplicate id'
  )
  assert.equal(await valueOf(client, 200000 + index), null)
  await client.query('BEGIN')
  await pipeline(
    Readable.from([`${300000 + index}\t${index}\t1\n`]),
    client.query(copyFrom(`COPY ${TABLE} (id, worker, val) FROM STDIN`))
  )
  assert.equal(await valueOf(client, 300000 + index), 1)
  await client.query('ROLLBACK')
  assert.equal(await valueOf(client, 300000 + index), null)
  assert.equal(await show(client, 'application_name'), expectApp)
  await client.end()
  return written
}

async function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

async function runWorkers() {
  const wait = barrier(WORKERS)
  const pids = new Set()
  const results = await withTimeout(
    Promise.allSettled(Array.from({ length: WORKERS }, (_, i) => worker(i, wait, pids))),
    60000,
    'the workers'
  )
  const failures = results
    .map((result, i) => [i, result])
    .filter(([, result]) => result.status === 'rejected')
    .map(([i, result]) => `worker ${i}: ${result.reason && result.reason.stack}`)
  if (failures.length) throw new Error(failures.join('\n'))
  log(`${WORKERS} concurrent clients used ${pids.size} server connections: ${[...pids].sort()}`)
  // Transaction mode shares fewer servers among more clients; session mode gives each its own.
  assert.ok(SESSION_MODE || WORKERS > POOL_SIZE)
  assert.ok(pids.size >= 1 && pids.size <= POOL_SIZE, `${pids.size} server connections for a pool of ${POOL_SIZE}`)
  const written = results.reduce((sum, result) => sum + result.value, 0)
  const client = await connect()
  try {
    const total = Number((await client.query(`SELECT count(*) AS n FROM ${TABLE}`)).rows[0].n)
    assert.equal(total, written)
  } finally {
    await client.end()
  }
}

// A pg.Pool larger than pgrelay's, with more tasks than connections.
async function poolChecks() {
  const pool = new pg.Pool({ ...config, max: WORKERS })
  try {
    const tasks = Array.from({ length: 4 * WORKERS }, async (_, k) => {
      const client = await pool.connect()
      try {
        await client.query('BEGIN')
        await client.query(named(INSERT, [900000 + k, 97, k]))
        const pid = (await client.query({ name: 'pid', text: 'SELECT pg_backend_pid() AS pid' })).rows[0].pid
        await client.query(named({ name: 'sleep', text: 'SELECT pg_sleep($1)' }, [0.01]))
        await client.query('COMMIT')
        assert.equal(await valueOf(client, 900000 + k), k)
        return pid
      } finally {
        client.release()
      }
    })
    const pids = await withTimeout(Promise.all(tasks), 60000, 'the pool tasks')
    assert.ok(new Set(pids).size <= POOL_SIZE, `${new Set(pids).size} server connections`)
    const count = await pool.query(`SELECT count(*) AS n FROM ${TABLE} WHERE worker = 97`)
    assert.equal(Number(count.rows[0].n), 4 * WORKERS)
    for (let i = 0; i < WORKERS; i++) {
      await expectError('22012', pool.query(named(DIVIDE, [0])), '10 / 0 via the pool')
    }
    assert.equal((await pool.query(named(DIVIDE, [5]))).rows[0].q, 2)
  } finally {
    await pool.end()
  }
}

// The server connections the suite's user holds apart from pgrelay's listener connection.
const SERVERS =
  "SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = current_user" +
  " AND backend_type = 'client backend' AND application_name <> 'pgrelay listener'"

// The `notification` events of `client`, one at a time: next(what) waits at most 10 s.
function inbox(client) {
  const received = []
  const waiting = []
  client.on('notification', (message) => {
    const item = [message.channel, message.payload]
    const resolve = waiting.shift()
    if (resolve) resolve(item)
    else received.push(item)
  })
  return (what) =>
    received.length
      ? Promise.resolve(received.shift())
      : withTimeout(new Promise((resolve) => waiting.push(resolve)), 10000, what)
}

// listen_notify = "fanout" (transaction mode, the default): more clients LISTEN than the
// pool has servers, one with a named statement (the extended protocol) and one inside a
// transaction; pgrelay answers the LISTENs, holds one listener connection for them all,
// and each client gets every notification as a `notification` event while it holds no
// server.
async function listenFanout() {
  const channel = `drv_fan_${config.user}`
  const marker = `drv_fan_mark_${config.user}`
  const listeners = []
  for (let i = 0; i < POOL_SIZE + 2; i++) listeners.push(await connect())
  const sender = await connect()
  const next = listeners.map(inbox)
  try {
    for (const [index, client] of listeners.slice(0, -1).entries()) {
      if (index === 0) {
        await client.query({ name: 'listen_fan', text: `LISTEN ${channel}` })
      } else {
        await client.query(`LISTEN ${channel}`)
      }
      await client.query(`LISTEN ${marker}`)
    }
    // Inside a transaction a LISTEN takes effect at COMMIT, as on the server.
    const inTx = listeners[listeners.length - 1]
    await inTx.query('BEGIN')
    await inTx.query(`LISTEN ${channel}`)
    await sender.query(`NOTIFY ${channel}, 'before commit'`)
    await inTx.query('COMMIT')
    const servers = (await sender.query(SERVERS)).rows[0].n
    assert.ok(servers <= POOL_SIZE, `${listeners.length} listening clients hold ${servers} servers`)
    // The server connection a client gets knows nothing of its channels.
    const listening = await listeners[0].query('SELECT count(*)::int AS n FROM pg_listening_channels()')
    assert.equal(listening.rows[0].n, 0)
    await sender.query(`NOTIFY ${channel}, 'to all'`)
    // The others listened already when 'before commit' was sent.
    for (const [index, nextOf] of next.entries()) {
      if (index < listeners.length - 1) {
        assert.deepEqual(await nextOf(`listener ${index}`), [channel, 'before commit'], `listener ${index}`)
      }
      assert.deepEqual(await nextOf(`listener ${index}`), [channel, 'to all'], `listener ${index}`)
    }
    // UNLISTEN stops delivery to that client; a NOTIFY rolled back reaches nobody.
    await listeners[0].query({ name: 'unlisten_fan', text: `UNLISTEN ${channel}` })
    await sender.query(`NOTIFY ${channel}, 'after unlisten'`)
    await sender.query('BEGIN')
    await sender.query(`NOTIFY ${channel}, 'rolled back'`)
    await sender.query('ROLLBACK')
    await sender.query(`NOTIFY ${marker}, 'marker'`)
    assert.deepEqual(await next[0]('after UNLISTEN'), [marker, 'marker'], 'after UNLISTEN')
    assert.deepEqual(await next[1]('after a rollback'), [channel, 'after unlisten'], 'after a rollback')
    assert.deepEqual(await next[1]('the marker'), [marker, 'marker'], 'the marker')
  } finally {
    for (const client of [...listeners, sender]) await client.end()
  }
}

async function main() {
  const started = Date.now()
  log(`pg ${require('pg/package.json').version}, ${WORKERS} clients, pool of ${POOL_SIZE}`)
  await setup()
  await runWorkers()
  log('workers done')
  await poolChecks()
  log('pool checks done')
  if (!SESSION_MODE) {
    await listenFanout()
    log('LISTEN/NOTIFY fan-out done')
  }
  const client = await connect()
  try {
    await client.query(`DROP TABLE ${TABLE}`)
    await client.query(`DROP TABLE ${SCHEMA}.whereami`)
  } finally {
    await client.end()
  }
  log(`ok in ${((Date.now() - started) / 1000).toFixed(1)}s`)
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(error && error.stack ? error.stack : error)
    process.exit(1)
  }
)
