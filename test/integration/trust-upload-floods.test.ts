import assert from 'node:assert/strict'
import { createHash, createSecretKey, randomBytes } from 'node:crypto'
import http from 'node:http'
import net from 'node:net'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as delay } from 'node:timers/promises'
import { request } from 'undici'
import { authorizationFor } from '../../peer/swarm/piece-http.ts'
import { buildImage, pushImage, type BuiltBlob } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

/*
 * Attack 8 (notes/trust-contract.md, "Upload port cannot be starved"): a
 * parent holds a blob; an attacker starves its upload port, (A) with idle TCP
 * connections that never send a request, (B) as a cluster member, with signed
 * piece requests for digests nobody holds that ask to wait two minutes. Children
 * pulling the blob then must still get it from the parent, not the origin.
 * The attacker's sockets come from 127.0.0.66, the children's from 127.0.0.1.
 */

const MIB = 1024 * 1024
const SECRET = 'trust-floods-cluster-secret-0123456'
const ATTACKER = '127.0.0.66'
const BLOB = 24 * MIB

interface Flood {
  /** Sockets connected now. */
  connected: () => number
  /** Connections made since the start (reconnections included). */
  made: () => number
  /** How long each socket the parent closed had been open, ms. */
  closedAfter: number[]
  stop: () => void
}

/** `n` TCP connections that send nothing; each one the parent closes is opened again a second later, as an attacker would. */
function idleFlood (port: number, n: number): Flood {
  let stopped = false
  let made = 0
  const sockets = new Set<net.Socket>()
  const connected = new Set<net.Socket>()
  const timers = new Set<NodeJS.Timeout>()
  const closedAfter: number[] = []
  const open = (): void => {
    if (stopped) return
    const s = net.connect({ host: '127.0.0.1', port, localAddress: ATTACKER })
    let at = 0
    sockets.add(s)
    s.on('connect', () => { at = Date.now(); made++; connected.add(s) })
    s.on('data', () => {})
    s.on('error', () => {})
    s.on('close', () => {
      sockets.delete(s)
      connected.delete(s)
      if (stopped) return
      if (at !== 0) closedAfter.push(Date.now() - at)
      const timer = setTimeout(() => { timers.delete(timer); open() }, 1_000)
      timers.add(timer)
    })
  }
  for (let i = 0; i < n; i++) open()
  return {
    connected: () => connected.size,
    made: () => made,
    closedAfter,
    stop: () => {
      stopped = true
      for (const t of timers) clearTimeout(t)
      for (const s of sockets) s.destroy()
    }
  }
}

interface Pulled { child: string, status: number, bytes: number, sha256: string, fromPeers: number, fromOrigin: number }

async function pullBlob (child: TestPeer, origin: ThrottleProxy, blob: BuiltBlob): Promise<Pulled> {
  const before = await child.metrics()
  const res = await request(`${child.url}/v2/trust/floods/blobs/${blob.digest}?ns=${encodeURIComponent(origin.host)}`, { signal: AbortSignal.timeout(90_000) })
  const hash = createHash('sha256')
  let bytes = 0
  for await (const chunk of res.body) {
    hash.update(chunk as Buffer)
    bytes += (chunk as Buffer).length
  }
  const after = await child.metrics()
  const delta = (source: string): number => after.get('damselfly_fetched_bytes_total', { source }) - before.get('damselfly_fetched_bytes_total', { source })
  return { child: child.name, status: res.statusCode, bytes, sha256: `sha256:${hash.digest('hex')}`, fromPeers: delta('peer'), fromOrigin: delta('origin') }
}

function showPulls (pulls: Pulled[], originBytes: number): string {
  const total = pulls.length * BLOB
  const fromOrigin = pulls.reduce((s, p) => s + p.fromOrigin, 0)
  return `${pulls.map((p) => `${p.child}: ${p.status}, ${p.bytes} bytes, ${(p.fromPeers / MIB).toFixed(1)} MiB from peers, ${(p.fromOrigin / MIB).toFixed(1)} MiB from the origin`).join('; ')}; ` +
    `children took ${(100 * fromOrigin / total).toFixed(0)}% of their bytes from the origin; the origin sent ${originBytes} bytes (${(originBytes / BLOB).toFixed(2)}× the blob)`
}

function assertFromParent (pulls: Pulled[], origin: ThrottleProxy, blob: BuiltBlob, parentUploaded: number): void {
  const figures = `${showPulls(pulls, origin.bytesDown())}; the parent uploaded ${(parentUploaded / MIB).toFixed(1)} MiB`
  for (const p of pulls) {
    assert.equal(p.status, 200, figures)
    assert.equal(p.sha256, blob.digest, `${p.child} got the blob intact: ${figures}`)
  }
  assert.ok(pulls.every((p) => p.fromPeers >= BLOB - MIB), `every child took ≈ the blob from peers: ${figures}`)
  assert.ok(pulls.reduce((s, p) => s + p.fromOrigin, 0) <= MIB, `children took ≈ nothing from the origin: ${figures}`)
  assert.ok(origin.bytesDown() <= MIB + 64 * 1024, `origin egress ≈ 0: ${figures}`)
  // The children may pass pieces on to each other, but at least one copy came from the parent.
  assert.ok(parentUploaded >= BLOB - MIB, `the parent served ≥ one copy: ${figures}`)
}

async function holders (scheduler: TestScheduler, digest: string): Promise<string[]> {
  const tasks = await (await request(`${scheduler.httpUrl}/api/v1/tasks`)).body.json() as Array<{ digest: string, completeHolders: string[] }>
  return tasks.find((t) => t.digest === digest)?.completeHolders ?? []
}

describe('the upload port cannot be starved (attack 8)', () => {
  let work: TmpDir
  let registry: TestRegistry
  let origin: ThrottleProxy
  let scheduler: TestScheduler
  let parent: TestPeer
  let parentId: string
  let blob: BuiltBlob
  const children: TestPeer[] = []
  const peers: TestPeer[] = []
  const flooders: Array<{ stop: () => void }> = []
  /** The idle connection of the first test: when the parent closed it, if it did. */
  const idle: { openedAt: number, closedAt: number | undefined, socket: net.Socket | undefined } = { openedAt: 0, closedAt: undefined, socket: undefined }

  before(async () => {
    work = await tmpDir('df-trust-floods-')
    registry = await startRegistry()
    origin = await startThrottleProxy({ targetPort: registry.port })
    const image = await buildImage(path.join(work.path, 'image'), { layers: [BLOB - 1536], seed: 'trust-floods', tag: 'v1' })
    await pushImage(image, `${registry.host}/trust/floods:v1`)
    blob = image.layers[0] as BuiltBlob
    assert.equal(blob.size, BLOB)
    scheduler = await startScheduler({ args: ['--cluster-secret', SECRET] })
    const secret = ['--cluster-secret', SECRET]
    parent = await startPeer({ registry: origin.url, scheduler: scheduler.address, name: 'parent', args: secret })
    peers.push(parent)
    const started = await Promise.all([1, 2, 3, 4].map(async (i) => startPeer({ registry: origin.url, scheduler: scheduler.address, name: `child-${i}`, args: secret })))
    children.push(...started)
    peers.push(...started)
    const warm = await pullBlob(parent, origin, blob)
    assert.equal(warm.sha256, blob.digest, 'the parent holds the blob')
    await waitFor(async () => (await holders(scheduler, blob.digest)).length === 1, { timeoutMs: 15_000, what: 'the scheduler to know the parent holds the blob' })
    const unsigned = await request(`http://127.0.0.1:${parent.uploadPort}/damselfly/v1/pieces/${blob.digest}/0?wait=0`)
    await unsigned.body.dump()
    assert.equal(unsigned.statusCode, 401, 'the upload port wants the cluster secret')
    parentId = String(unsigned.headers['x-damselfly-peer'])
  })

  after(async () => {
    for (const f of flooders) f.stop()
    idle.socket?.destroy()
    await Promise.allSettled(peers.map(async (p) => { await p.close() }))
    await scheduler?.close()
    await origin?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('a connection that sends nothing is closed by the parent within ~10 s', async () => {
    const socket = net.connect({ host: '127.0.0.1', port: parent.uploadPort, localAddress: ATTACKER })
    idle.socket = socket
    socket.on('error', () => {})
    socket.on('data', () => {})
    await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
    idle.openedAt = Date.now()
    socket.once('close', () => { idle.closedAt = Date.now() })
    await waitFor(async () => idle.closedAt !== undefined, { timeoutMs: 12_000, intervalMs: 100, what: 'the idle connection to be closed' }).catch(() => {})
    assert.ok(idle.closedAt !== undefined, `an idle connection was still open after ${((Date.now() - idle.openedAt) / 1000).toFixed(1)} s`)
    assert.ok(idle.closedAt - idle.openedAt <= 12_000, `closed after ${((idle.closedAt - idle.openedAt) / 1000).toFixed(1)} s`)
  })

  test('flood A: 600 idle connections from one address, then children still get the blob from the parent', async (t) => {
    const flood = idleFlood(parent.uploadPort, 600)
    flooders.push(flood)
    try {
      await waitFor(async () => flood.made() >= 600, { timeoutMs: 10_000, what: 'the flood to connect' }).catch(() => {})
      await delay(1_000)
      const held = flood.connected()
      origin.reset()
      const uploadedBefore = (await parent.metrics()).get('damselfly_uploaded_bytes_total')
      const pulls = await Promise.all(children.slice(0, 2).map(async (c) => pullBlob(c, origin, blob)))
      const uploaded = (await parent.metrics()).get('damselfly_uploaded_bytes_total') - uploadedBefore
      const closed = flood.closedAfter
      t.diagnostic(`flood: ${held} idle connections held when the children started, ${flood.connected()} at the end, ${flood.made()} made in all; ` +
        `the parent closed ${closed.length} (${closed.length === 0 ? '' : `after ${Math.min(...closed)}–${Math.max(...closed)} ms`}); the parent uploaded ${(uploaded / MIB).toFixed(1)} MiB meanwhile`)
      t.diagnostic(`${showPulls(pulls, origin.bytesDown())}; the parent uploaded ${(uploaded / MIB).toFixed(1)} MiB`)
      assertFromParent(pulls, origin, blob, uploaded)
    } finally {
      flood.stop()
      // These two now hold the blob; flood B's children must have only the parent to take it from.
      await Promise.all(children.slice(0, 2).map(async (c) => { await c.close() }))
    }
  })

  test('flood B: 200 signed two-minute waits for digests nobody holds are answered 404 at once, and children still get the blob from the parent', async (t) => {
    interface Asked { req: http.ClientRequest, sentAt: number, status: number | undefined, answeredAfter: number | undefined, error: string | undefined }
    const asked: Asked[] = []
    const waitMs = 120_000
    await waitFor(async () => (await holders(scheduler, blob.digest)).length === 1, { timeoutMs: 15_000, what: 'the parent to be the only holder again' })
    for (let i = 0; i < 200; i++) {
      const digest = `sha256:${randomBytes(32).toString('hex')}`
      const authorization = authorizationFor(createSecretKey(Buffer.from(SECRET)), `flood-member-${i}`, parentId, { digest, index: 0, waitMs })
      const req = http.request({ host: '127.0.0.1', port: parent.uploadPort, localAddress: ATTACKER, agent: false, path: `/damselfly/v1/pieces/${digest}/0?wait=${waitMs}`, headers: { authorization } })
      const a: Asked = { req, sentAt: Date.now(), status: undefined, answeredAfter: undefined, error: undefined }
      req.on('response', (res) => { a.status = res.statusCode; a.answeredAfter = Date.now() - a.sentAt; res.resume() })
      req.on('error', (err: NodeJS.ErrnoException) => { a.error ??= err.code ?? err.message })
      req.end()
      asked.push(a)
    }
    flooders.push({ stop: () => { for (const a of asked) a.req.destroy() } })
    try {
      await delay(5_000)
      const tally = (): string => {
        const by = new Map<string, number>()
        for (const a of asked) {
          const key = a.status !== undefined ? `${a.status}${a.answeredAfter !== undefined && a.answeredAfter > 5_000 ? ' (after 5 s)' : ''}` : a.error ?? 'no answer yet'
          by.set(key, (by.get(key) ?? 0) + 1)
        }
        return [...by.entries()].map(([k, n]) => `${n}× ${k}`).join(', ')
      }
      const within5s = tally()
      origin.reset()
      const uploadedBefore = (await parent.metrics()).get('damselfly_uploaded_bytes_total')
      const pulls = await Promise.all(children.slice(2, 4).map(async (c) => pullBlob(c, origin, blob)))
      const parentMetrics = await parent.metrics()
      const uploaded = parentMetrics.get('damselfly_uploaded_bytes_total') - uploadedBefore
      t.diagnostic(`the 200 flood requests 5 s after they were sent: ${within5s}; after the children's pulls: ${tally()}; ` +
        `the parent's piece answers so far: ${JSON.stringify(parentMetrics.byLabel('damselfly_piece_requests_total', 'status'))}`)
      t.diagnostic(`${showPulls(pulls, origin.bytesDown())}; the parent uploaded ${(uploaded / MIB).toFixed(1)} MiB`)
      assertFromParent(pulls, origin, blob, uploaded)
      const slow = asked.filter((a) => a.status !== 404 || (a.answeredAfter ?? Infinity) > 5_000)
      assert.equal(slow.length, 0, `flood requests not answered 404 within 5 s: ${within5s}`)
    } finally {
      for (const a of asked) a.req.destroy()
      if (idle.socket !== undefined) {
        t.diagnostic(idle.closedAt === undefined
          ? `the idle connection of the first test is still open after ${((Date.now() - idle.openedAt) / 1000).toFixed(1)} s`
          : `the idle connection of the first test was closed after ${((idle.closedAt - idle.openedAt) / 1000).toFixed(1)} s`)
      }
    }
  })
})
