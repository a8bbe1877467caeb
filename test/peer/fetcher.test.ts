import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { test } from 'node:test'
import { PeerBusyError, PieceNotHeldError, SchedulerUnavailableError } from '../../src/errors.ts'
import { silentLogger } from '../../src/logger.ts'
import { createMetricsRegistry } from '../../src/metrics.ts'
import type { P2PNode } from '../../src/p2p/index.ts'
import type { ParentsResponse, SchedulerRequest } from '../../src/protocol/messages.ts'
import { MIB, PieceSet } from '../../src/pieces.ts'
import { createPieceFetcher, holderOrder, stillComing, type PieceFetcher, type Progress } from '../../peer/swarm/fetcher.ts'
import type { PieceHttpClient } from '../../peer/swarm/piece-http.ts'
import type { SchedulerClient } from '../../peer/swarm/scheduler-client.ts'
import type { SwarmTask } from '../../peer/swarm/source.ts'

const task: SwarmTask = {
  digest: `sha256:${'ab'.repeat(32)}`,
  size: 100 * MIB,
  origin: { registry: 'http://registry.test:5000', repo: 'team/app', kind: 'blob' }
}

/**
 * A scheduler client whose first `failures` parents requests time out; after
 * that the plan makes this node the first fetcher of pieces 3–6.
 */
function slowScheduler (failures: number, connected = true, movesInMs?: number): { client: SchedulerClient, asked: () => number } {
  let asked = 0
  const client: { connected: boolean } & Record<string, unknown> = {
    connected,
    peerId: 'scheduler',
    // `movesInMs`: the session dropped and another replica takes over after that long; without it there is none.
    async awaitSession ({ maxMs }: { maxMs: number }) {
      if (client.connected) return true
      if (movesInMs === undefined || movesInMs > maxMs) return false
      await new Promise(resolve => setTimeout(resolve, movesInMs))
      client.connected = true
      return true
    },
    async request (req: SchedulerRequest) {
      assert.equal(req.type, 'parents')
      asked++
      if (asked <= failures) throw new SchedulerUnavailableError('scheduler parents failed: deadline exceeded')
      const res: ParentsResponse = { ok: true, pieceSize: MIB, pieceCount: 100, parents: [], digests: [], assigned: [3, 4, 5, 6] }
      return res
    },
    report () {}
  }
  return { client: client as unknown as SchedulerClient, asked: () => asked }
}

function fetcherWith (client: SchedulerClient, planRetryDelayMs = 5): { fetcher: PieceFetcher, counter: (name: string) => Promise<number> } {
  const metrics = createMetricsRegistry()
  const fetcher = createPieceFetcher({
    logger: silentLogger(),
    node: { peerId: 'self' } as unknown as P2PNode,
    client,
    metrics
  }, { planRetries: 2, planRetryDelayMs })
  const counter = async (name: string): Promise<number> => {
    const m = (await metrics.getMetricsAsJSON()).find(x => x.name === name)
    return m?.values.reduce((sum, v) => sum + v.value, 0) ?? 0
  }
  return { fetcher, counter }
}

test('a connected scheduler that answers late is asked again instead of sending the node to the origin', async () => {
  const { client, asked } = slowScheduler(2)
  const { fetcher, counter } = fetcherWith(client)
  const got = await fetcher.fetch({ task, lastWanted: 99, whole: true }, 3, {})
  // The plan's answer, not a fallback: this node takes pieces 3–6, not the rest of the blob.
  assert.deepEqual(got, { kind: 'origin', upTo: 6 })
  assert.equal(asked(), 3)
  assert.equal(await counter('damselfly_scheduler_plan_retries_total'), 2)
  assert.equal(await counter('damselfly_swarm_origin_fallbacks_total'), 0)
})

test('past its retries the node goes to the origin, and counts it', async () => {
  const { client, asked } = slowScheduler(10)
  const { fetcher, counter } = fetcherWith(client)
  const got = await fetcher.fetch({ task, lastWanted: 40, whole: true }, 3, {})
  assert.deepEqual(got, { kind: 'origin', upTo: 40 })
  assert.equal(asked(), 3, 'the first ask and two more')
  assert.equal(await counter('damselfly_swarm_origin_fallbacks_total'), 1)
})

test('a scheduler that is gone sends the node to the origin at once', async () => {
  const { client, asked } = slowScheduler(10, false)
  const { fetcher } = fetcherWith(client)
  assert.deepEqual(await fetcher.fetch({ task, lastWanted: 40, whole: true }, 3, {}), { kind: 'origin', upTo: 40 })
  assert.equal(asked(), 0)
})

test('a session moving to another replica is waited for: the plan comes from the new one, not the origin', async () => {
  const { client, asked } = slowScheduler(0, false, 50)
  const { fetcher, counter } = fetcherWith(client)
  assert.deepEqual(await fetcher.fetch({ task, lastWanted: 40, whole: true }, 3, {}), { kind: 'origin', upTo: 6 }, 'the plan\'s pieces 3–6, not the rest of the blob')
  assert.equal(asked(), 1)
  assert.equal(await counter('damselfly_swarm_origin_fallbacks_total'), 0)
})

test('a reader that gives up stops the waiting between asks', async () => {
  const { client } = slowScheduler(10)
  const { fetcher } = fetcherWith(client, 60_000)
  const controller = new AbortController()
  const fetching = fetcher.fetch({ task, lastWanted: 40, whole: true }, 3, { signal: controller.signal })
  setTimeout(() => { controller.abort() }, 20)
  await assert.rejects(fetching, (err: Error) => err.name === 'AbortError')
})

test('a piece is asked of peers holding it before seeds, consecutive pieces spread over them, parents still fetching it last', () => {
  const p = (id: string, seed = false): { id: string, seed: boolean } => ({ id, seed })
  const holders = [p('seed', true), p('a'), p('b'), p('c')]
  const fetchers = [p('f')]
  const order = (i: number): string[] => holderOrder(i, holders, fetchers, x => x.seed).map(x => x.id)
  assert.deepEqual(order(0), ['a', 'b', 'c', 'seed', 'f'])
  assert.deepEqual(order(1), ['b', 'c', 'a', 'seed', 'f'])
  assert.deepEqual(order(2), ['c', 'a', 'b', 'seed', 'f'])
  assert.deepEqual(holderOrder(4, [p('seed', true)], [], x => x.seed).map(x => x.id), ['seed'], 'a seed alone is still asked')
})

/** A connected scheduler client whose every request is a plan, answered by `answer`. */
function planning (answer: (req: Extract<SchedulerRequest, { type: 'parents' }>) => ParentsResponse): SchedulerClient {
  return {
    connected: true,
    peerId: 'scheduler',
    async awaitSession () { return true },
    async request (req: SchedulerRequest) {
      assert.ok(req.type === 'parents')
      return answer(req)
    },
    report () {}
  } as unknown as SchedulerClient
}

test('a reader asking for pieces in two parts of a blob by turns asks the scheduler once for each part, not at every turn', async () => {
  const big: SwarmTask = { ...task, size: 400 * MIB }
  const firsts: number[] = []
  const client = planning((req) => {
    firsts.push(req.first)
    // This node is sent to the origin for every piece it asks about: no parents needed.
    return { ok: true, pieceSize: MIB, pieceCount: 400, parents: [], digests: [], assigned: Array.from({ length: req.last - req.first + 1 }, (_, k) => req.first + k) }
  })
  const { fetcher } = fetcherWith(client)
  for (const index of [3, 100, 10, 130, 60, 101]) await fetcher.fetch({ task: big, lastWanted: 399, whole: true }, index, {})
  // One plan per block of the window (64 pieces): one cached plan per blob was replaced at every turn.
  assert.deepEqual(firsts, [3, 100])
})

function heldBy (...indices: number[]): string {
  const set = new PieceSet(100)
  for (const i of indices) set.add(i)
  return set.toBase64()
}

test('a blob is settled while its plans offer only parents holding all of it, and not once one is still fetching it', async () => {
  const piece = Buffer.alloc(MIB, 7)
  const hex = createHash('sha256').update(piece).digest('hex')
  let complete = true
  const parent = (id: string, whole: boolean): ParentsResponse['parents'][number] => ({ peerId: id, addrs: [], upload: ['http://127.0.0.1:1'], seed: false, complete: whole, ...(whole ? {} : { held: heldBy(0, 64) }) })
  const client = planning(req => ({ ok: true, pieceSize: MIB, pieceCount: 100, parents: complete ? [parent('a', true), parent('b', true)] : [parent('a', true), parent('c', false)], digests: [[req.first, hex]], assigned: [] }))
  const http: PieceHttpClient = { async fetch () { return [{ data: Buffer.from(piece) }] }, async close () {} }
  const fetcher = createPieceFetcher({ logger: silentLogger(), node: { peerId: 'self' } as unknown as P2PNode, client, http })
  assert.equal(fetcher.settled?.(task.digest), false, 'nothing is known before a plan')
  assert.equal((await fetcher.fetch({ task, lastWanted: 99, whole: true }, 0, {})).kind, 'piece')
  assert.equal(fetcher.settled?.(task.digest), true)
  complete = false
  assert.equal((await fetcher.fetch({ task, lastWanted: 99, whole: true }, 64, {})).kind, 'piece')
  assert.equal(fetcher.settled?.(task.digest), false, 'a parent holding only part of the blob is fetching it')
})

test('a busy parent names peers it sent the piece to: they are asked next, as parents that may still be receiving it; their bytes are checked, their failures not held against them', async () => {
  const piece = Buffer.alloc(MIB, 9)
  const hex = createHash('sha256').update(piece).digest('hex')
  const seed: ParentsResponse['parents'][number] = { peerId: 'seed', addrs: [], upload: ['http://127.0.0.1:1'], seed: true, complete: true }
  const client = planning(req => ({ ok: true, pieceSize: MIB, pieceCount: 100, parents: [seed], digests: Array.from({ length: req.last - req.first + 1 }, (_, k): [number, string] => [req.first + k, hex]), assigned: [] }))
  const asked: Array<[string, number, string]> = []
  let bad = false
  const http: PieceHttpClient = {
    async fetch (parent, request) {
      asked.push([parent.peerId, request.waitMs, parent.upload[0] as string])
      if (parent.peerId === 'seed') {
        throw new PeerBusyError('seed answered busy', [
          { peerId: 'self', upload: ['http://127.0.0.1:4100'] },
          { peerId: 'childA', upload: ['http://127.0.0.1:4101'] },
          { peerId: 'childB', upload: ['http://127.0.0.1:4102'] }
        ])
      }
      if (parent.peerId === 'childA') {
        if (bad) return [{ data: Buffer.alloc(MIB, 1) }]
        throw new PeerBusyError('childA answered busy', [{ peerId: 'seed', upload: ['http://127.0.0.1:1'] }, { peerId: 'childC', upload: ['http://127.0.0.1:4103'] }])
      }
      return [{ data: Buffer.from(piece) }]
    },
    async close () {}
  }
  const reports: unknown[] = []
  const fetcher = createPieceFetcher({ logger: silentLogger(), node: { peerId: 'self' } as unknown as P2PNode, client: { ...client, report (r: unknown) { reports.push(r) } } as unknown as SchedulerClient, http }, { busyPatienceMs: 300 })
  const got = await fetcher.fetch({ task, lastWanted: 99, whole: true }, 0, {})
  assert.equal(got.kind, 'piece')
  // Itself and a parent already in the race are skipped; each hint is waited for, as a piece on its way.
  assert.deepEqual(asked, [['seed', 0, 'http://127.0.0.1:1'], ['childA', 15_000, 'http://127.0.0.1:4101'], ['childB', 15_000, 'http://127.0.0.1:4102']])
  // A hinted peer that sends bad bytes: they go nowhere, and the next is asked. Its address is the busy parent's
  // word, so nothing is held against the id it goes by: not barred, not reported, asked again next time.
  asked.length = 0
  bad = true
  const next = await fetcher.fetch({ task, lastWanted: 99, whole: true }, 1, {})
  assert.equal(next.kind, 'piece')
  assert.ok(next.kind === 'piece' && next.data.equals(piece), 'the piece came from childB, checked')
  assert.deepEqual(asked.map(([id]) => id), ['seed', 'childA', 'childB'])
  assert.deepEqual(reports, [])
  asked.length = 0
  await fetcher.fetch({ task, lastWanted: 99, whole: true }, 2, {})
  assert.deepEqual(asked.map(([id]) => id), ['seed', 'childA', 'childB'])
})

test('a range needing a confirmer does not follow hints: their bytes would vouch for nothing', async () => {
  const piece = Buffer.alloc(MIB, 5)
  const hex = createHash('sha256').update(piece).digest('hex')
  const confirmer: ParentsResponse['parents'][number] = { peerId: 'confirmer', addrs: [], upload: ['http://127.0.0.1:1'], seed: false, complete: false, fetching: heldBy(0), confirming: heldBy(0) }
  const client = planning(() => ({ ok: true, pieceSize: MIB, pieceCount: 100, parents: [confirmer], digests: [[0, hex]], provisional: [0], assigned: [] }))
  const asked: string[] = []
  const http: PieceHttpClient = {
    async fetch (parent) {
      asked.push(parent.peerId)
      throw new PeerBusyError('busy', [{ peerId: 'childA', upload: ['http://127.0.0.1:4101'] }])
    },
    async close () {}
  }
  const fetcher = createPieceFetcher({ logger: silentLogger(), node: { peerId: 'self' } as unknown as P2PNode, client, http }, { busyPatienceMs: 250 })
  await fetcher.fetch({ task, lastWanted: 0, whole: false }, 0, {})
  assert.ok(asked.length > 0)
  assert.ok(!asked.includes('childA'))
})

test('a hinted peer that stalls holds the piece up only until the next is asked beside it', { timeout: 30_000 }, async () => {
  const piece = Buffer.alloc(MIB, 3)
  const hex = createHash('sha256').update(piece).digest('hex')
  const seed: ParentsResponse['parents'][number] = { peerId: 'seed', addrs: [], upload: ['http://127.0.0.1:1'], seed: true, complete: true }
  const client = planning(req => ({ ok: true, pieceSize: MIB, pieceCount: 100, parents: [seed], digests: [[req.first, hex]], assigned: [] }))
  const http: PieceHttpClient = {
    async fetch (parent, _request, _length, options) {
      if (parent.peerId === 'seed') throw new PeerBusyError('busy', [{ peerId: 'staller', upload: ['http://127.0.0.1:4101'] }, { peerId: 'childB', upload: ['http://127.0.0.1:4102'] }])
      if (parent.peerId === 'staller') {
        // A member that accepts and never answers, until the child gives up on it.
        return new Promise((_resolve, reject) => { options.signal.addEventListener('abort', () => { reject(options.signal.reason) }) })
      }
      return [{ data: Buffer.from(piece) }]
    },
    async close () {}
  }
  const fetcher = createPieceFetcher({ logger: silentLogger(), node: { peerId: 'self' } as unknown as P2PNode, client, http })
  const started = Date.now()
  const got = await fetcher.fetch({ task, lastWanted: 99, whole: true }, 0, {})
  assert.equal(got.kind, 'piece')
  assert.ok(Date.now() - started < 3_000, `took ${Date.now() - started} ms`)
})

test('past its patience a node waits again for a first fetcher still landing pieces of the blob, and leaves one that stopped for the origin', async () => {
  const piece = Buffer.alloc(MIB, 5)
  const hex = createHash('sha256').update(piece).digest('hex')
  /** The seed's progress: pieces 0..landed-1 held, the rest on their way from the origin. */
  let landed = 1
  let progressing = true
  const client = planning(() => {
    if (progressing) landed += 8
    const held = Array.from({ length: landed }, (_, k) => k)
    const fetching = Array.from({ length: 100 - landed }, (_, k) => landed + k)
    return { ok: true, pieceSize: MIB, pieceCount: 100, parents: [{ peerId: 'seed', addrs: [], upload: ['http://127.0.0.1:1'], seed: true, complete: false, held: heldBy(...held), fetching: heldBy(...fetching) }], digests: [[40, hex]], assigned: [] }
  })
  const http: PieceHttpClient = {
    async fetch (_parent, request) {
      if (landed > request.index) return [{ data: Buffer.from(piece) }]
      // Not there yet: a parent that waited its time and still has not got it.
      await new Promise(resolve => setTimeout(resolve, 20))
      throw new PieceNotHeldError(`piece ${request.index} not here yet`)
    },
    async close () {}
  }
  const metrics = createMetricsRegistry()
  const fetcher = createPieceFetcher({ logger: silentLogger(), node: { peerId: 'self' } as unknown as P2PNode, client, http, metrics }, { busyPatienceMs: 200, inProgressWaitMs: 300 })
  const waits = async (): Promise<number> => (await metrics.getMetricsAsJSON()).find(x => x.name === 'damselfly_first_fetcher_waits_total')?.values[0]?.value ?? 0
  // Piece 40 lands five plans in, past 200 ms of patience: still from the swarm.
  const got = await fetcher.fetch({ task, lastWanted: 99, whole: true }, 40, { signal: AbortSignal.timeout(60_000) })
  assert.equal(got.kind, 'piece')
  assert.ok(await waits() > 0, 'it waited past its patience, and counted it')
  // A first fetcher that has landed nothing more for the in-progress wait (300 ms here) is not waited for again: the node goes to the origin.
  progressing = false
  const stuck = await fetcher.fetch({ task, lastWanted: 99, whole: true }, 90, { signal: AbortSignal.timeout(60_000) })
  assert.equal(stuck.kind, 'origin')
})

test('patience with busy parents counts from the last piece a parent sent: a node the swarm keeps serving keeps asking, one it has stopped serving goes to the origin', { timeout: 30_000 }, async () => {
  const piece = Buffer.alloc(MIB, 6)
  const hex = createHash('sha256').update(piece).digest('hex')
  const seed: ParentsResponse['parents'][number] = { peerId: 'seed', addrs: [], upload: ['http://127.0.0.1:1'], seed: true, complete: true }
  const client = planning(req => ({ ok: true, pieceSize: MIB, pieceCount: 100, parents: [seed], digests: Array.from({ length: req.last - req.first + 1 }, (_, k): [number, string] => [req.first + k, hex]), assigned: [] }))
  /** Pieces the seed is busy with (sending them to others) until let go. */
  const busy = new Set([50, 60])
  const http: PieceHttpClient = {
    async fetch (_parent, request) {
      if (busy.has(request.index)) throw new PeerBusyError(`busy with piece ${request.index}`, [])
      return [{ data: Buffer.from(piece) }]
    },
    async close () {}
  }
  const fetcher = createPieceFetcher({ logger: silentLogger(), node: { peerId: 'self' } as unknown as P2PNode, client, http }, { busyPatienceMs: 400 })
  const started = Date.now()
  const state = { settled: false }
  const waiting = fetcher.fetch({ task, lastWanted: 99, whole: true }, 50, { signal: AbortSignal.timeout(20_000) }).finally(() => { state.settled = true })
  // Other pieces keep coming from the swarm; three times the patience in, the seed is free for piece 50.
  for (let i = 0; !state.settled && Date.now() - started < 10_000; i++) {
    if (Date.now() - started >= 1_200) busy.delete(50)
    const other = await fetcher.fetch({ task, lastWanted: 99, whole: true }, i % 40, {})
    assert.equal(other.kind, 'piece')
    await new Promise(resolve => setTimeout(resolve, 100))
  }
  const got = await waiting
  assert.ok(Date.now() - started >= 1_200)
  assert.equal(got.kind, 'piece', 'still asking the swarm past its patience, while pieces kept coming')
  // Nothing comes from the swarm any more: past the patience, the origin.
  const alone = Date.now()
  const stuck = await fetcher.fetch({ task, lastWanted: 99, whole: true }, 60, { signal: AbortSignal.timeout(20_000) })
  assert.equal(stuck.kind, 'origin')
  assert.ok(Date.now() - alone < 8_000, `went to the origin after ${Date.now() - alone} ms`)
})

test('a first fetcher counts as still coming while it landed a piece within the in-progress wait, as the looks show', () => {
  const progress = new Map<string, Progress>()
  const seed = (held: number): { info: { peerId: string }, held: { size: number } } => ({ info: { peerId: 'seed' }, held: { size: held } })
  assert.equal(stillComing(progress, [seed(3)], 0, 1_000), true, 'a first look counts')
  assert.equal(stillComing(progress, [seed(3)], 900, 1_000), true, 'nothing new, but within the wait')
  assert.equal(stillComing(progress, [seed(3)], 1_000, 1_000), false, 'nothing new for the whole wait')
  assert.equal(stillComing(progress, [seed(4)], 1_500, 1_000), true, 'a piece landed: the wait starts again')
  assert.equal(stillComing(progress, [seed(4), { info: { peerId: 'other' }, held: undefined }], 2_600, 1_000), true, 'another fetcher, seen for the first time')
  assert.equal(stillComing(progress, [seed(4)], 2_600, 1_000), false)
})

test('from a parent holding what follows, once pieces come fast, the pieces after the one asked for come in the same answer, claimed from the reader and each checked; one bad piece bars the parent and hands every claim back', async () => {
  const bytes = (i: number): Buffer => Buffer.alloc(MIB, i)
  const hex = (i: number): string => createHash('sha256').update(bytes(i)).digest('hex')
  const parent: ParentsResponse['parents'][number] = { peerId: 'a', addrs: [], upload: ['http://127.0.0.1:1'], seed: false, complete: true }
  const client = planning(req => ({ ok: true, pieceSize: MIB, pieceCount: 100, parents: [parent], digests: Array.from({ length: req.last - req.first + 1 }, (_, k): [number, string] => [req.first + k, hex(req.first + k)]), assigned: [] }))
  const asked: Array<[number, number]> = []
  const fault = { piece: -1 }
  const http: PieceHttpClient = {
    async fetch (_parent, request) {
      const count = request.count ?? 1
      asked.push([request.index, count])
      return Array.from({ length: count }, (_, k) => ({ data: request.index + k === fault.piece ? bytes(0) : bytes(request.index + k) }))
    },
    async close () {}
  }
  const reports: unknown[] = []
  const fetcher = createPieceFetcher({ logger: silentLogger(), node: { peerId: 'self' } as unknown as P2PNode, client: { ...client, report (r: unknown) { reports.push(r) } } as unknown as SchedulerClient, http }, { busyPatienceMs: 300 })
  const claims = new Set<number>()
  const handedBack: number[] = []
  const ahead = {
    claim: (i: number) => { if (i === 15 || claims.has(i)) return false; claims.add(i); return true },
    unclaim: (i: number) => { claims.delete(i); handedBack.push(i) }
  }
  // Until pieces are seen to come fast, one at a time.
  for (let i = 0; i < 6; i++) assert.equal((await fetcher.fetch({ task, lastWanted: 99, whole: true, ahead }, i, {})).kind, 'piece')
  assert.deepEqual(asked.slice(0, 1), [[0, 1]])
  assert.ok(asked.some(([, count]) => count > 1), 'runs began once pieces came fast')
  asked.length = 0
  claims.clear()
  const got = await fetcher.fetch({ task, lastWanted: 99, whole: true, ahead }, 10, {})
  assert.ok(got.kind === 'piece')
  assert.deepEqual(asked, [[10, 4]])
  assert.deepEqual(got.more?.map(x => x.sha256), [hex(11), hex(12), hex(13)])
  assert.deepEqual([...claims], [11, 12, 13])
  // A piece someone here is getting ends the run; so does the reader's last wanted piece.
  claims.clear()
  asked.length = 0
  assert.deepEqual((await fetcher.fetch({ task, lastWanted: 99, whole: true, ahead }, 13, {}) as { more?: unknown[] }).more?.length, 1)
  assert.deepEqual((await fetcher.fetch({ task, lastWanted: 21, whole: true, ahead }, 20, {}) as { more?: unknown[] }).more?.length, 1)
  assert.deepEqual(asked, [[13, 2], [20, 2]])
  // One bad piece in a run: nothing of it is given, the parent is barred and reported, the claims go back.
  claims.clear()
  fault.piece = 32
  const after = await fetcher.fetch({ task, lastWanted: 99, whole: true, ahead }, 30, {})
  assert.equal(after.kind, 'origin', 'the only parent is barred')
  assert.deepEqual(handedBack, [31, 32, 33])
  assert.equal(claims.size, 0)
  assert.deepEqual(reports, [{ kind: 'bad-piece', parent: 'a', digest: task.digest, piece: 32 }])
})
