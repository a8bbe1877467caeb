import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { buffer } from 'node:stream/consumers'
import { test, type TestContext } from 'node:test'
import { BufferPool, giveBack } from '../../src/buffer-pool.ts'
import { BlobDigestMismatchError, OriginUnavailableError, UnauthorizedError } from '../../src/errors.ts'
import { silentLogger } from '../../src/logger.ts'
import { createMetricsRegistry } from '../../src/metrics.ts'
import { MIB } from '../../src/pieces.ts'
import { createAccessChecker } from '../../peer/auth/index.ts'
import { createBlobService, type BlobService, type BlobServiceInit, type OpenBlobRequest } from '../../peer/blobs/index.ts'
import type { OriginDirective, PieceSource, PieceSourceContext, RemotePiece, TableEntry } from '../../peer/swarm/source.ts'
import { createPieceStore, type PieceStore } from '../../peer/piece-store/index.ts'
import { parseRegistryUrl } from '../../peer/upstream/index.ts'
import { FakeOrigin } from '../fakes/origin.ts'

const upstream = { ...parseRegistryUrl('http://registry.test:5000'), trusted: true }

async function setup (t: TestContext, init: { ttlMs?: number, maxOriginRuns?: number } = {}): Promise<{ origin: FakeOrigin, store: PieceStore, blobs: BlobService }> {
  const dir = await mkdtemp(join(tmpdir(), 'df-blobs-'))
  const logger = silentLogger()
  const origin = new FakeOrigin()
  const store = createPieceStore({ logger }, { dataDir: dir, flushDelayMs: 5 })
  await store.start()
  const access = createAccessChecker({ logger, origin }, { ttlMs: init.ttlMs ?? 60_000 })
  const blobs = createBlobService({ logger, store, origin, access, metrics: createMetricsRegistry() }, init.maxOriginRuns === undefined ? {} : { maxOriginRuns: init.maxOriginRuns })
  t.after(async () => {
    await blobs.stop()
    await store.stop()
    await rm(dir, { recursive: true, force: true })
  })
  return { origin, store, blobs }
}

function req (digest: string, extra: Partial<OpenBlobRequest> = {}): OpenBlobRequest {
  return { upstream, repo: 'team/app', digest, kind: 'blob', credentials: {}, ...extra }
}

async function readAll (blobs: BlobService, digest: string, range?: { start: number, end: number }, extra: Partial<OpenBlobRequest> = {}): Promise<Buffer> {
  const opened = await blobs.open(req(digest, extra))
  return buffer(await opened.read(range))
}

test('a cold blob comes from the origin once; the second read costs the origin nothing', async (t) => {
  const { origin, blobs, store } = await setup(t)
  const data = randomBytes(5 * MIB + 321)
  const digest = origin.addBlob('team/app', data)
  assert.ok((await readAll(blobs, digest)).equals(data))
  assert.equal(origin.bytesSent, data.length)
  assert.equal(origin.requests.filter(r => r.method === 'GET').length, 1, 'one ranged GET covers the run')
  assert.equal(store.info(digest)?.verified, true)

  const before = origin.requests.length
  assert.ok((await readAll(blobs, digest)).equals(data))
  assert.equal(origin.bytesSent, data.length)
  assert.equal(origin.requests.length, before, 'the access decision is cached too')
})

test('an unaligned range fetches only the pieces that cover it', async (t) => {
  const { origin, blobs } = await setup(t)
  const data = randomBytes(8 * MIB)
  const digest = origin.addBlob('team/app', data)
  const range = { start: Math.floor(1.3 * MIB), end: Math.floor(2.7 * MIB) }
  const got = await readAll(blobs, digest, range)
  assert.ok(got.equals(data.subarray(range.start, range.end + 1)))
  assert.equal(origin.bytesSent, 2 * MIB, 'pieces 1 and 2 only')
  const gets = origin.requests.filter(r => r.method === 'GET')
  assert.deepEqual(gets.map(g => g.range), [{ start: MIB, end: 3 * MIB - 1 }])
  // A range inside a held piece needs nothing more.
  assert.ok((await readAll(blobs, digest, { start: MIB + 5, end: MIB + 9 })).equals(data.subarray(MIB + 5, MIB + 10)))
  assert.equal(origin.bytesSent, 2 * MIB)
})

test('concurrent readers of a cold blob share one fetch', async (t) => {
  const { origin, blobs } = await setup(t)
  const data = randomBytes(6 * MIB)
  const digest = origin.addBlob('team/app', data)
  const results = await Promise.all(Array.from({ length: 6 }, async () => readAll(blobs, digest)))
  for (const r of results) assert.ok(r.equals(data))
  assert.equal(origin.bytesSent, data.length)
})

test('a body that breaks mid-way is resumed from the first missing piece', async (t) => {
  const { origin, blobs } = await setup(t)
  const data = randomBytes(4 * MIB)
  const digest = origin.addBlob('team/app', data)
  origin.failAfterBytes = Math.floor(1.5 * MIB)
  assert.ok((await readAll(blobs, digest)).equals(data))
  const gets = origin.requests.filter(r => r.method === 'GET').map(g => g.range)
  assert.deepEqual(gets, [{ start: 0, end: 4 * MIB - 1 }, { start: MIB, end: 4 * MIB - 1 }])
})

test('an origin serving bytes that do not match the digest never completes a read', async (t) => {
  const { origin, blobs, store } = await setup(t)
  const data = randomBytes(3 * MIB)
  const liar = `sha256:${createHash('sha256').update('something else').digest('hex')}`
  origin.blobs.set(liar, { data, mediaType: undefined, repos: new Set(['team/app']) })
  const opened = await blobs.open(req(liar))
  const stream = await opened.read(undefined)
  let received = 0
  await assert.rejects((async () => { for await (const chunk of stream) received += (chunk as Buffer).length })(), BlobDigestMismatchError)
  assert.ok(received < data.length, 'the last piece is withheld')
  assert.equal(store.info(liar), undefined)
})

test('private content is served only to callers the origin accepts, even from the cache', async (t) => {
  const { origin, blobs } = await setup(t)
  origin.privateRepos.add('team/app')
  const data = randomBytes(2 * MIB)
  const digest = origin.addBlob('team/app', data)
  const good = { authorization: origin.validAuth }
  assert.ok((await readAll(blobs, digest, undefined, { credentials: good })).equals(data))
  const sent = origin.bytesSent
  await assert.rejects(blobs.open(req(digest)), (err: unknown) => err instanceof UnauthorizedError && err.challenge === 'Basic realm="fake"')
  await assert.rejects(blobs.open(req(digest, { credentials: { authorization: 'Basic d3Jvbmc6d3Jvbmc=' } })), UnauthorizedError)
  // The same digest asked for through a public repository it does not belong to is unknown there.
  origin.addBlob('public/other', randomBytes(10))
  await assert.rejects(blobs.open(req(digest, { repo: 'public/other' })), /unknown/)
  assert.equal(origin.bytesSent, sent, 'refusals cost no blob bytes')
})

test('with the origin down, a recent yes still serves the cache; an unknown caller is not let in', async (t) => {
  const { origin, blobs } = await setup(t, { ttlMs: 0 })
  origin.privateRepos.add('team/app')
  const data = randomBytes(MIB)
  const digest = origin.addBlob('team/app', data)
  const good = { authorization: origin.validAuth }
  await readAll(blobs, digest, undefined, { credentials: good })
  origin.down = true
  const opened = await blobs.open(req(digest, { credentials: good }))
  assert.equal(opened.stale, true)
  assert.ok((await buffer(await opened.read(undefined))).equals(data))
  await assert.rejects(blobs.open(req(digest, { credentials: { authorization: 'Bearer other' } })), OriginUnavailableError)
  await assert.rejects(blobs.open(req(digest)), OriginUnavailableError)
})

test('a background prefetch completes the blob without holding up on-demand reads', async (t) => {
  const { origin, blobs, store } = await setup(t, { maxOriginRuns: 1 })
  const big = randomBytes(16 * MIB)
  const small = randomBytes(3 * MIB)
  const bigDigest = origin.addBlob('team/app', big)
  const smallDigest = origin.addBlob('team/app', small)
  const opened = await blobs.open(req(bigDigest))
  assert.equal(blobs.prefetch(opened.task), true)
  assert.equal(blobs.prefetch(opened.task), false, 'one prefetch per blob at a time')
  // Wait for the prefetch to hold the only origin slot, then read another blob on demand.
  while (!origin.requests.some(r => r.method === 'GET' && r.what === bigDigest)) await new Promise(resolve => setImmediate(resolve))
  assert.ok((await readAll(blobs, smallDigest, { start: 10, end: MIB + 10 })).equals(small.subarray(10, MIB + 11)))
  while (store.info(bigDigest)?.complete !== true) await new Promise(resolve => setTimeout(resolve, 5))
  const gets = origin.requests.filter(r => r.method === 'GET')
  const bigGets = gets.filter(r => r.what === bigDigest)
  assert.ok(bigGets.length >= 4, `prefetch asks for short runs (${bigGets.length} requests)`)
  assert.ok(bigGets.every(r => r.range !== undefined && r.range.end - r.range.start + 1 <= 4 * MIB))
  const onDemandAt = gets.findIndex(r => r.what === smallDigest)
  assert.ok(onDemandAt < gets.indexOf(bigGets[bigGets.length - 1] as typeof gets[number]), 'the on-demand read went ahead of the rest of the prefetch')
  assert.equal(store.info(bigDigest)?.verified, true)
  assert.equal(blobs.prefetch(opened.task), false, 'nothing to prefetch once complete')
})

test('a whole read takes pieces ahead in a random order within its window, a bounded number at once, each once', async (t) => {
  const pieces = 40
  const data = randomBytes(pieces * MIB)
  const { swarm, asked, most } = recordingSwarm(data)
  let seed = 7
  const random = (): number => (seed = (seed * 16807) % 2147483647) / 2147483647
  const { origin, blobs, store } = await setupWithSwarm(t, swarm, { readahead: 4, window: 12, random })
  const digest = origin.addBlob('team/app', data)
  const stream = await (await blobs.open(req(digest))).read(undefined)
  let sent = 0
  for await (const chunk of stream) {
    // Nothing was asked for beyond the window of the piece being sent (the stream and the
    // whole-digest check hold up to three pieces between the reader and this loop).
    const head = Math.floor(sent / MIB) + 3
    assert.ok(asked.every(i => i < head + 12), `piece ${Math.max(...asked)} asked for while sending piece ${head}`)
    sent += (chunk as Buffer).length
  }
  assert.equal(sent, data.length)
  assert.deepEqual([...asked].sort((a, b) => a - b), Array.from({ length: pieces }, (_, i) => i), 'every piece asked for once')
  assert.notDeepEqual(asked, Array.from({ length: pieces }, (_, i) => i), 'not in order')
  assert.ok(most() <= 4 + 1, `at most the read-ahead and the piece being sent under way at once (${most()})`)
  assert.equal(store.info(digest)?.verified, true)
})

test('pieces a source claims to bring with another arrive with it; those it claimed and did not bring, or handed back, are fetched on their own; each piece reaches the cache once', async (t) => {
  const pieces = 30
  const data = randomBytes(pieces * MIB)
  const piece = (i: number): Buffer => data.subarray(i * MIB, (i + 1) * MIB)
  const fetched = new Map<number, number>()
  const count = (i: number): void => { fetched.set(i, (fetched.get(i) ?? 0) + 1) }
  /** Claims up to three pieces after the one asked for; hands back the first when the index is a multiple of 5, and silently drops the last. */
  class RunSwarm extends FakeSwarm {
    override async fetch (ctx: PieceSourceContext, index: number): Promise<RemotePiece | OriginDirective> {
      await new Promise(resolve => setTimeout(resolve, 2))
      const claimed: number[] = []
      for (let i = index + 1; i <= Math.min(index + 3, ctx.lastWanted) && ctx.ahead?.claim(i) === true; i++) claimed.push(i)
      if (index % 5 === 0 && claimed.length > 0) ctx.ahead?.unclaim(claimed.shift() as number)
      const brought = claimed.slice(0, -1)
      const one = (i: number): RemotePiece => {
        count(i)
        const sha256 = createHash('sha256').update(piece(i)).digest('hex')
        this.table.set(i, sha256)
        return { kind: 'piece', data: Buffer.from(piece(i)), sha256, trusted: true }
      }
      const first = one(index)
      // Brought pieces follow the asked one in order: a handed-back first claim leaves a gap, so none come then.
      return brought.length > 0 && brought[0] === index + 1 ? { ...first, more: brought.map(one) } : first
    }
  }
  const swarm = new RunSwarm(() => 'origin')
  const { origin, blobs, store } = await setupWithSwarm(t, swarm, { readahead: 4, window: 12 })
  const digest = origin.addBlob('team/app', data)
  const read = await buffer(await (await blobs.open(req(digest))).read(undefined))
  assert.ok(read.equals(data))
  assert.equal(store.info(digest)?.verified, true)
  assert.deepEqual([...fetched.keys()].sort((a, b) => a - b), Array.from({ length: pieces }, (_, i) => i), 'every piece came from the swarm')
  assert.ok([...fetched.values()].every(n => n === 1), `each once: ${JSON.stringify([...fetched])}`)
  assert.equal(origin.requests.filter(r => r.method === 'GET').length, 0, 'nothing from the origin')
})

test('a whole read takes pieces in order when the swarm offers only whole holders', async (t) => {
  const pieces = 24
  const data = randomBytes(pieces * MIB)
  const { swarm, asked, most } = recordingSwarm(data)
  let settledAsked = 0
  swarm.isSettled = () => { settledAsked++; return true }
  const { origin, blobs, store } = await setupWithSwarm(t, swarm, { readahead: 4, window: 12, random: () => 0.99 })
  const digest = origin.addBlob('team/app', data)
  const read = await buffer(await (await blobs.open(req(digest))).read(undefined))
  assert.ok(read.equals(data))
  assert.ok(settledAsked > 0, 'the reader asked the swarm')
  assert.deepEqual(asked, Array.from({ length: pieces }, (_, i) => i), 'in order, each once')
  assert.ok(most() <= 4 + 1, `at most the read-ahead and the piece being sent under way at once (${most()})`)
  assert.equal(store.info(digest)?.verified, true)
})

test('pieces in pooled buffers reach every reader intact and are reused only after all of them gave them back', async (t) => {
  const pieces = 32
  const data = randomBytes(pieces * MIB)
  const other = randomBytes(pieces * MIB)
  let serving = data
  const swarm = new FakeSwarm(i => ({ data: serving.subarray(i * MIB, (i + 1) * MIB), trusted: true }), async (i) => {
    await new Promise(resolve => setTimeout(resolve, (i * 7) % 4))
  })
  const pool = new BufferPool(MIB, 64)
  swarm.pool = pool
  const { origin, blobs, store } = await setupWithSwarm(t, swarm, { readahead: 4, window: 12 })
  const digest = origin.addBlob('team/app', data)
  /** Reads the whole blob, or a range, giving each chunk back after `pause` ms (a socket slow to take it). */
  const read = async (pause: number, range?: { start: number, end: number }, which = digest): Promise<Buffer> => {
    const stream = await (await blobs.open(req(which))).read(range)
    const got: Buffer[] = []
    for await (const chunk of stream) {
      if (pause > 0) await new Promise(resolve => setTimeout(resolve, pause))
      got.push(Buffer.from(chunk as Buffer))
      giveBack(chunk)
    }
    return Buffer.concat(got)
  }
  const [fast, slow, range] = await Promise.all([read(0), read(3), read(1, { start: 3 * MIB + 17, end: 20 * MIB })])
  assert.ok(fast.equals(data), 'the fast reader got the blob')
  assert.ok(slow.equals(data), 'the slow reader got the blob')
  assert.ok(range.equals(data.subarray(3 * MIB + 17, 20 * MIB + 1)), 'the range reader got its range')
  assert.equal(store.info(digest)?.verified, true)
  // Every piece is on disk: a later read takes it there.
  assert.ok((await read(0)).equals(data))
  // A reader alone gives pieces back while later ones are still coming: those land in the same buffers.
  serving = other
  const second = origin.addBlob('team/app', other)
  assert.ok((await read(1, undefined, second)).equals(other))
  assert.ok(pool.reused > 0, `buffers were reused (${pool.reused} of ${pool.reused + pool.allocated})`)
  assert.ok(pool.allocated < 2 * pieces, `fewer buffers allocated than pieces fetched (${pool.allocated})`)
})

test('origin pieces land in pooled buffers too: concurrent readers get the blob intact and the buffers go round', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'df-blobs-'))
  const logger = silentLogger()
  const origin = new FakeOrigin()
  const store = createPieceStore({ logger }, { dataDir: dir, flushDelayMs: 5 })
  await store.start()
  const pool = new BufferPool(MIB, 64)
  const blobs = createBlobService({ logger, store, origin, access: createAccessChecker({ logger, origin }), buffers: pool }, { maxRunPieces: 4 })
  t.after(async () => {
    await blobs.stop()
    await store.stop()
    await rm(dir, { recursive: true, force: true })
  })
  const data = randomBytes(24 * MIB + 99)
  const digest = origin.addBlob('team/app', data)
  const read = async (pause: number, range?: { start: number, end: number }): Promise<Buffer> => {
    const got: Buffer[] = []
    for await (const chunk of await (await blobs.open(req(digest))).read(range)) {
      if (pause > 0) await new Promise(resolve => setTimeout(resolve, pause))
      got.push(Buffer.from(chunk as Buffer))
      giveBack(chunk)
    }
    return Buffer.concat(got)
  }
  const [a, b, c] = await Promise.all([read(0), read(2), read(1, { start: MIB - 5, end: 9 * MIB })])
  assert.ok(a.equals(data))
  assert.ok(b.equals(data))
  assert.ok(c.equals(data.subarray(MIB - 5, 9 * MIB + 1)))
  assert.ok(pool.reused > 0, `buffers were reused (${pool.reused} of ${pool.reused + pool.allocated})`)
})

test('a child waiting for a piece on its way here is lent its pooled buffer: not reused until given back, then reused', async (t) => {
  const pieces = 16
  const data = randomBytes(pieces * MIB)
  const second = randomBytes(pieces * MIB)
  let serving = data
  const started = Promise.withResolvers<void>()
  let arrived: (() => void) | undefined
  const swarm = new FakeSwarm(i => ({ data: serving.subarray(i * MIB, (i + 1) * MIB), trusted: true }), async (i) => {
    if (i === 5 && serving === data) {
      await new Promise<void>(resolve => {
        arrived = resolve
        started.resolve()
      })
    }
  })
  const pool = new BufferPool(MIB, 64)
  swarm.pool = pool
  const { origin, blobs } = await setupWithSwarm(t, swarm, { readahead: 4, window: 4 })
  const digest = origin.addBlob('team/app', data)
  const reading = (await blobs.open(req(digest))).read(undefined).then(async (stream) => {
    for await (const chunk of stream) giveBack(chunk)
  })
  await started.promise
  const waiting = blobs.whenLanded(digest, 5)
  assert.ok(waiting !== undefined, 'piece 5 is on its way')
  arrived?.()
  const got = await waiting
  await reading
  // The pool's buffers went round again meanwhile; a second blob through them makes sure.
  serving = second
  const other = origin.addBlob('team/app', second)
  for await (const chunk of await (await blobs.open(req(other))).read(undefined)) giveBack(chunk)
  assert.ok(got.data.equals(data.subarray(5 * MIB, 6 * MIB)), 'the waiting child\'s bytes are still piece 5')
  // Lent, not copied: given back, its buffer goes round again.
  const before = pool.free
  got.release()
  got.release()
  assert.equal(pool.free, before + 1, 'given back once, whatever the calls')
  const peeked = await blobs.held(digest, 6)
  assert.ok(peeked?.equals(data.subarray(6 * MIB, 7 * MIB)))
})

/** A swarm handing out `data`'s 1 MiB pieces that records the order they were asked in and the most under way at once. */
function recordingSwarm (data: Buffer): { swarm: FakeSwarm, asked: number[], most: () => number } {
  const asked: number[] = []
  let running = 0
  let most = 0
  const swarm = new FakeSwarm(i => ({ data: data.subarray(i * MIB, (i + 1) * MIB), trusted: true }), async (i) => {
    asked.push(i)
    most = Math.max(most, ++running)
    // Pieces land in their own time: a later one may land first.
    await new Promise(resolve => setTimeout(resolve, 1 + (i * 7) % 5))
    running--
  })
  return { swarm, asked, most: () => most }
}

/** A swarm that hands out the pieces the test gives it, verified against nothing but themselves. */
class FakeSwarm implements PieceSource {
  readonly mismatches: Array<{ digest: string, evidence: { piece: number, sha256: string } | { table: string } | undefined }> = []
  /** The table this swarm hands out: each piece's SHA-256 as it gave it. */
  readonly table = new Map<number, string>()
  readonly #pieces: (index: number) => { data: Buffer, trusted: boolean } | 'origin'
  readonly #delay: ((index: number) => Promise<void>) | undefined
  /** When set, pieces are handed out in buffers from this pool, as the HTTP piece client does. */
  pool: BufferPool | undefined
  /** What `settled` answers; absent, the swarm never says. */
  isSettled: (() => boolean) | undefined
  constructor (pieces: (index: number) => { data: Buffer, trusted: boolean } | 'origin', delay?: (index: number) => Promise<void>) {
    this.#pieces = pieces
    this.#delay = delay
  }

  async fetch (_ctx: PieceSourceContext, index: number): Promise<RemotePiece | OriginDirective> {
    await this.#delay?.(index)
    const got = this.#pieces(index)
    if (got === 'origin') return { kind: 'origin', upTo: index }
    const sha256 = createHash('sha256').update(got.data).digest('hex')
    this.table.set(index, sha256)
    if (this.pool !== undefined) {
      const lease = this.pool.take(got.data.length)
      got.data.copy(lease.data)
      return { kind: 'piece', data: lease.data, sha256, trusted: got.trusted, lease }
    }
    return { kind: 'piece', data: got.data, sha256, trusted: got.trusted }
  }

  expected (_digest: string, index: number): TableEntry | undefined {
    const sha256 = this.table.get(index)
    return sha256 === undefined ? undefined : { sha256, provisional: true }
  }

  originFailed (): void {}

  settled (): boolean {
    return this.isSettled?.() ?? false
  }

  mismatch (task: { digest: string }, evidence: { piece: number, sha256: string } | { table: string } | undefined): void {
    this.mismatches.push({ digest: task.digest, evidence })
  }
}

async function setupWithSwarm (t: TestContext, swarm: FakeSwarm, init: BlobServiceInit = {}): Promise<{ origin: FakeOrigin, store: PieceStore, blobs: BlobService }> {
  const dir = await mkdtemp(join(tmpdir(), 'df-blobs-'))
  const logger = silentLogger()
  const origin = new FakeOrigin()
  const store = createPieceStore({ logger }, { dataDir: dir, flushDelayMs: 5 })
  await store.start()
  const access = createAccessChecker({ logger, origin })
  const blobs = createBlobService({ logger, store, origin, access, source: swarm }, init)
  t.after(async () => {
    await blobs.stop()
    await store.stop()
    await rm(dir, { recursive: true, force: true })
  })
  return { origin, store, blobs }
}

test('a range never sends a piece only its author vouches for: the origin is asked, and a table it contradicts is reported', async (t) => {
  const data = randomBytes(4 * MIB)
  const lie = Buffer.from(data.subarray(MIB, 2 * MIB))
  lie[100] = (lie[100] as number) ^ 0xff
  const swarm = new FakeSwarm(i => i === 1 ? { data: lie, trusted: false } : { data: data.subarray(i * MIB, (i + 1) * MIB), trusted: false })
  const { origin, blobs } = await setupWithSwarm(t, swarm)
  const digest = origin.addBlob('team/app', data)
  const range = { start: MIB - 10, end: 2 * MIB + 10 }
  assert.ok((await readAll(blobs, digest, range)).equals(data.subarray(range.start, range.end + 1)), 'the range is the origin\'s bytes')
  assert.deepEqual(origin.requests.filter(r => r.method === 'GET').map(r => r.range), [
    { start: 0, end: MIB - 1 }, { start: MIB, end: 2 * MIB - 1 }, { start: 2 * MIB, end: 3 * MIB - 1 }
  ], 'each unconfirmed piece, from the origin')
  assert.deepEqual(swarm.mismatches, [{ digest, evidence: { piece: 1, sha256: createHash('sha256').update(data.subarray(MIB, 2 * MIB)).digest('hex') } }])
})

test('a whole read of pieces that match a wrong table is cut before its last bytes', async (t) => {
  const data = randomBytes(3 * MIB)
  const swarm = new FakeSwarm(i => {
    const piece = Buffer.from(data.subarray(i * MIB, (i + 1) * MIB))
    if (i === 1) piece[7] = (piece[7] as number) ^ 1
    return { data: piece, trusted: false }
  })
  const { origin, blobs, store } = await setupWithSwarm(t, swarm)
  const digest = origin.addBlob('team/app', data)
  const stream = await (await blobs.open(req(digest))).read(undefined)
  let received = 0
  await assert.rejects((async () => { for await (const chunk of stream) received += (chunk as Buffer).length })(), BlobDigestMismatchError)
  assert.ok(received < data.length, `the last bytes are withheld (${received} of ${data.length})`)
  assert.equal(store.info(digest), undefined, 'the copy is dropped')
})

// Regression: a blob dropped from the store while an origin run was under way was cut
// into 1-byte "pieces" (the run took its piece size from the store), and those went out.
test('a blob abandoned in the middle of a read never yields a piece of the wrong size', async (t) => {
  const data = randomBytes(6 * MIB)
  const swarm = new FakeSwarm(() => 'origin')
  const { origin, blobs } = await setupWithSwarm(t, swarm)
  const digest = origin.addBlob('team/app', data)
  for (const range of [undefined, { start: 10, end: 5 * MIB }]) {
    const stream = await (await blobs.open(req(digest))).read(range)
    await blobs.abandon(digest)
    const chunks: Buffer[] = []
    const outcome = await (async () => { for await (const chunk of stream) chunks.push(chunk as Buffer) })().then(() => 'done', () => 'cut')
    const got = Buffer.concat(chunks)
    const want = range === undefined ? data : data.subarray(range.start, range.end + 1)
    assert.ok(got.equals(want.subarray(0, got.length)), `every byte sent is right (${outcome} after ${got.length})`)
    if (outcome === 'done') assert.equal(got.length, want.length)
  }
})
