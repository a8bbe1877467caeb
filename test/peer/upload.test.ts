import assert from 'node:assert/strict'
import { createSecretKey, randomBytes } from 'node:crypto'
import { request } from 'node:http'
import { test, type TestContext } from 'node:test'
import { silentLogger } from '../../src/logger.ts'
import { createMetricsRegistry, type Registry } from '../../src/metrics.ts'
import { MIB } from '../../src/pieces.ts'
import type { P2PNode } from '../../src/p2p/index.ts'
import { TokenBucket } from '../../src/rate.ts'
import { authorizationFor, pieceUrlPath } from '../../peer/swarm/piece-http.ts'
import type { LentPiece } from '../../peer/blobs/index.ts'
import { createUploadServer } from '../../peer/upload/index.ts'
import { TaskRegistry } from '../../peer/upload/tasks.ts'
import { freePorts } from '../helpers/ports.ts'

const digest = `sha256:${'cd'.repeat(32)}`

/** An upload server on loopback holding two pieces, sending at `bytesPerSecond`. */
interface Answer { status: number, bytes: number, body?: unknown }

async function server (t: TestContext, onePerPiece: boolean, bytesPerSecond: number, init: { concurrency?: number, resendMs?: number, clusterSecret?: string, landsInMs?: number, metrics?: Registry, corruptPieces?: boolean } = {}): Promise<{ pieces: Buffer[], port: number, get: (index: number, headers?: Record<string, string>, waitMs?: number) => Promise<Answer>, abandon: (index: number, headers?: Record<string, string>, waitMs?: number, leaveAfterMs?: number) => Promise<void>, lending: () => { lent: number, givenBack: number } }> {
  const pieces = [randomBytes(MIB), randomBytes(MIB)]
  const { landsInMs, metrics, ...options } = init
  /** Pieces still on their way until then: children waiting for one are all woken at once. */
  const landsAt = Date.now() + (landsInMs ?? 0)
  // One promise per piece, as the acquisition keeps it: every waiter wakes in the same turn.
  const landing = pieces.map(async piece => new Promise<Buffer>(resolve => setTimeout(() => { resolve(piece) }, landsInMs ?? 0)))
  let lent = 0
  let givenBack = 0
  const lend = async (index: number): Promise<LentPiece> => (landing[index] as Promise<Buffer>).then(data => {
    lent++
    let back = false
    return { data, release: () => { if (!back) givenBack++; back = true } }
  })
  const [port] = await freePorts(1) as [number]
  const node = { peerId: 'parent', addrs: () => [`/ip4/127.0.0.1/tcp/${port}`], handle: async () => {} } as unknown as P2PNode
  const uploads = createUploadServer({
    logger: silentLogger(),
    node,
    supply: {
      async held (_digest, index) { return Date.now() >= landsAt ? pieces[index] : undefined },
      heldLength: (_digest, index) => Date.now() >= landsAt ? pieces[index]?.length : undefined,
      whenLanded: (_digest, index) => Date.now() >= landsAt ? undefined : lend(index),
      async fetch () { throw new Error('not sent to the origin') },
      task: () => undefined
    },
    tasks: new TaskRegistry(),
    sentFor: () => false,
    rate: new TokenBucket(bytesPerSecond, { burst: 256 * 1024 }),
    metrics
  }, { http: { host: '127.0.0.1', port }, onePerPiece, ...options })
  await uploads.start()
  t.after(() => { uploads.stop() })
  const get = async (index: number, headers: Record<string, string> = {}, waitMs = 0): Promise<Answer> => new Promise((resolve, reject) => {
    request({ host: '127.0.0.1', port, path: pieceUrlPath(digest, index, waitMs), headers }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => { chunks.push(c) })
      res.on('end', () => {
        const all = Buffer.concat(chunks)
        resolve({ status: res.statusCode ?? 0, bytes: all.length, ...(res.statusCode === 200 ? {} : { body: JSON.parse(all.toString('utf8')) }) })
      })
    }).on('error', reject).end()
  })
  /** Asks for a piece and hangs up once the first bytes arrive; resolves when the server has seen the socket close. */
  const abandon = async (index: number, headers: Record<string, string> = {}, waitMs = 0, leaveAfterMs?: number): Promise<void> => new Promise((resolve, reject) => {
    const leave = (): void => {
      req.destroy()
      setTimeout(resolve, 300)
    }
    const req = request({ host: '127.0.0.1', port, path: pieceUrlPath(digest, index, waitMs), headers }, (res) => {
      if (leaveAfterMs === undefined) res.once('data', leave)
    })
    if (leaveAfterMs !== undefined) setTimeout(leave, leaveAfterMs)
    req.on('error', () => {})
    req.on('close', () => {})
    req.end()
    setTimeout(() => { reject(new Error('no bytes within 5 s')) }, 5_000).unref()
  })
  return { pieces, port, get, abandon, lending: () => ({ lent, givenBack }) }
}

/** A run request's answer: status, the pieces it says it holds, and its body. */
async function getRun (port: number, index: number, count: number): Promise<{ status: number, pieces: string | undefined, body: Buffer }> {
  return new Promise((resolve, reject) => {
    request({ host: '127.0.0.1', port, path: pieceUrlPath(digest, index, 0, count) }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => { chunks.push(c) })
      res.on('end', () => { resolve({ status: res.statusCode ?? 0, pieces: res.headers['x-damselfly-pieces'] as string | undefined, body: Buffer.concat(chunks) }) })
    }).on('error', reject).end()
  })
}

test('a run of pieces is answered with the one asked for and those after it held here, up to the first that is not; a seed answers one at a time', async (t) => {
  const holder = await server(t, false, 64 * MIB)
  const run = await getRun(holder.port, 0, 4)
  assert.equal(run.status, 200)
  assert.equal(run.pieces, '2', 'piece 2 is not held: the run stops before it')
  assert.ok(run.body.equals(Buffer.concat(holder.pieces)))
  const last = await getRun(holder.port, 1, 4)
  assert.equal(last.pieces, undefined, 'nothing after it: a plain answer')
  assert.ok(last.body.equals(holder.pieces[1] as Buffer))
  const seed = await server(t, true, 64 * MIB)
  const one = await getRun(seed.port, 0, 4)
  assert.equal(one.pieces, undefined)
  assert.ok(one.body.equals(seed.pieces[0] as Buffer))
})

test('with the test fault on, every piece of a run goes out corrupted, not only the first', async (t) => {
  const holder = await server(t, false, 64 * MIB, { corruptPieces: true })
  const run = await getRun(holder.port, 0, 2)
  assert.equal(run.pieces, '2')
  for (let k = 0; k < 2; k++) {
    const sent = run.body.subarray(k * MIB, (k + 1) * MIB)
    assert.equal(sent.length, MIB)
    assert.ok(!sent.equals(holder.pieces[k] as Buffer), `piece ${k} was corrupted`)
  }
})

const child = (id: string, port: number): Record<string, string> => ({ 'x-damselfly-child': `${id} ${port}` })

test('a seed sends a piece once: a second child asking is told busy and pointed at the first, another piece is not held up', async (t) => {
  // 1 MiB at 1 MiB/s: the first send takes about a second.
  const { get } = await server(t, true, MIB, { resendMs: 2_500 })
  const started = Date.now()
  const first = get(0, child('childA', 4101))
  await new Promise(resolve => setTimeout(resolve, 200))
  const [second, other] = await Promise.all([get(0, child('childB', 4102)), get(1)])
  assert.equal(second.status, 503, 'the same piece, while it is on its way to the first child')
  assert.deepEqual(second.body, { status: 'busy', try: [{ peerId: 'childA', upload: ['http://127.0.0.1:4101'] }] })
  assert.equal(other.status, 200, 'a different piece')
  assert.equal(other.bytes, MIB)
  assert.deepEqual(await first, { status: 200, bytes: MIB })
  const ended = Date.now()
  // Sent once: until the window is over, whoever asks is pointed at the child that has it.
  const third = await get(0, child('childC', 4103))
  assert.equal(third.status, 503)
  assert.deepEqual(third.body, { status: 'busy', try: [{ peerId: 'childA', upload: ['http://127.0.0.1:4101'] }] })
  // The window runs from the end of the send, not its start: behind a slow uplink the child has only just got it.
  await new Promise(resolve => setTimeout(resolve, Math.max(0, started + 2_600 - Date.now())))
  if (Date.now() < ended + 2_300) assert.equal((await get(0, child('childC', 4103))).status, 503, 'the window counted from the end of the send')
  // Past it, a child that got the piece and vanished costs the others nothing more: it is sent again.
  await new Promise(resolve => setTimeout(resolve, Math.max(0, ended + 2_600 - Date.now())))
  assert.deepEqual(await get(0, child('childC', 4103)), { status: 200, bytes: MIB })
})

test('a seed asked for one piece by many children waiting for it sends it to one of them when it lands', async (t) => {
  const { get, lending } = await server(t, true, 8 * MIB, { resendMs: 5_000, landsInMs: 500 })
  const answers = await Promise.all(['a', 'b', 'c', 'd', 'e', 'f'].map(async (id, i) => get(0, child(`child-${id}`, 4200 + i), 5_000)))
  assert.deepEqual(answers.map(a => a.status).sort(), [200, 503, 503, 503, 503, 503], JSON.stringify(answers))
  assert.equal(answers.find(a => a.status === 200)?.bytes, MIB)
  // Each waiter was lent the landed bytes; the one sent and the five refused all gave them back.
  await new Promise(resolve => setTimeout(resolve, 100))
  assert.deepEqual(lending(), { lent: 6, givenBack: 6 })
})

test('a seed whose send broke off sends the piece again at once', async (t) => {
  // 1 MiB at 512 KiB/s: the child hangs up long before the end.
  const { get, abandon } = await server(t, true, 512 * 1024, { resendMs: 60_000 })
  await abandon(0, child('childA', 4101))
  assert.deepEqual(await get(0, child('childB', 4102)), { status: 200, bytes: MIB })
})

test('a busy answer names the children a piece recently went to, at the address each asked from, never the asker', async (t) => {
  // One slot, 1 MiB at 2 MiB/s: each send holds it about half a second.
  const { get } = await server(t, false, 2 * MIB, { concurrency: 1 })
  const a = get(0, child('childA', 4101))
  await new Promise(resolve => setTimeout(resolve, 100))
  const busy = await get(0, child('childB', 4102))
  assert.equal(busy.status, 503)
  assert.deepEqual(busy.body, { status: 'busy', try: [{ peerId: 'childA', upload: ['http://127.0.0.1:4101'] }] })
  assert.deepEqual(await a, { status: 200, bytes: MIB })
  const b = get(0, child('childB', 4102))
  await new Promise(resolve => setTimeout(resolve, 100))
  // Most recent first, the asker left out.
  assert.deepEqual((await get(0, child('childA', 4101))).body, { status: 'busy', try: [{ peerId: 'childB', upload: ['http://127.0.0.1:4102'] }] })
  assert.deepEqual((await get(0, child('childC', 4103))).body, { status: 'busy', try: [{ peerId: 'childB', upload: ['http://127.0.0.1:4102'] }, { peerId: 'childA', upload: ['http://127.0.0.1:4101'] }] })
  assert.equal((await b).status, 200)
  // A child that gives port 0, or anything but an id and a port, is not named.
  const c = get(0, child('childD', 0))
  await new Promise(resolve => setTimeout(resolve, 100))
  const answer = await get(0, { 'x-damselfly-child': 'childE 4105 http://169.254.169.254' })
  assert.deepEqual((answer.body as { try?: Array<{ peerId: string }> }).try?.map(h => h.peerId), ['childB', 'childA'])
  assert.equal((await c).status, 200)
  const d = get(0, { 'x-damselfly-child': 'childE 4105 http://169.254.169.254' })
  await new Promise(resolve => setTimeout(resolve, 100))
  assert.deepEqual(((await get(0, {})).body as { try?: Array<{ peerId: string }> }).try?.map(h => h.peerId), ['childB', 'childA'])
  await d
})

test('with a cluster secret, a child is named only under the id its request proved', async (t) => {
  const secret = 'hints-secret'
  const { get } = await server(t, false, 2 * MIB, { concurrency: 1, clusterSecret: secret })
  const proved = (id: string, named: string, port: number): Record<string, string> => ({
    authorization: authorizationFor(createSecretKey(Buffer.from(secret)), id, 'parent', { digest, index: 0, waitMs: 0 }),
    ...child(named, port)
  })
  const liar = get(0, proved('childA', 'childZ', 4101))
  await new Promise(resolve => setTimeout(resolve, 100))
  const busy = await get(0, proved('childB', 'childB', 4102))
  assert.deepEqual(busy.body, { status: 'busy' }, 'childA claimed to be childZ: nobody is named')
  assert.equal((await liar).status, 200)
  const honest = get(0, proved('childA', 'childA', 4101))
  await new Promise(resolve => setTimeout(resolve, 100))
  assert.deepEqual((await get(0, proved('childB', 'childB', 4102))).body, { status: 'busy', try: [{ peerId: 'childA', upload: ['http://127.0.0.1:4101'] }] })
  assert.equal((await honest).status, 200)
})

test('any other node sends a piece to every child that asks', async (t) => {
  const { get } = await server(t, false, 4 * MIB)
  const [a, b] = await Promise.all([get(0), get(0)])
  assert.deepEqual(a, { status: 200, bytes: MIB })
  assert.deepEqual(b, { status: 200, bytes: MIB })
})

test('children waiting for a piece on its way are each lent its bytes and give them back once sent, or once they leave', async (t) => {
  const { get, abandon, lending } = await server(t, false, 4 * MIB, { landsInMs: 400 })
  // Two take it; one leaves as the bytes start coming, one while still waiting.
  const [a, b] = await Promise.all([get(0, {}, 5_000), get(0, {}, 5_000), abandon(0, {}, 5_000), abandon(0, {}, 5_000, 100)])
  assert.deepEqual(a, { status: 200, bytes: MIB })
  assert.deepEqual(b, { status: 200, bytes: MIB })
  await new Promise(resolve => setTimeout(resolve, 100))
  assert.deepEqual(lending(), { lent: 4, givenBack: 4 })
})

test('behind a slow uplink a parent sends two pieces at once and says busy to a third; a fast one sends all three', async (t) => {
  // 1 MiB/s: one 1 MiB piece takes a second, so only the two sends always allowed may run.
  const slowMetrics = createMetricsRegistry()
  const slow = await server(t, false, MIB, { metrics: slowMetrics })
  const answers = await Promise.all([slow.get(0), slow.get(1), slow.get(0)])
  assert.deepEqual(answers.map(a => a.status).sort(), [200, 200, 503], JSON.stringify(answers))
  const gauges = await slowMetrics.getMetricsAsJSON()
  const value = (name: string): number | undefined => gauges.find(m => m.name === name)?.values[0]?.value
  assert.equal(value('damselfly_upload_slots'), 2)
  assert.equal(value('damselfly_upload_rate_bytes'), MIB, 'the upload limit is the rate')
  // 64 MiB/s sends sixteen 1 MiB pieces in a quarter second: every slot (eight) may run.
  const fast = await server(t, false, 64 * MIB)
  assert.deepEqual((await Promise.all([fast.get(0), fast.get(1), fast.get(0)])).map(a => a.status), [200, 200, 200])
})
