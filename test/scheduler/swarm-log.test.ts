import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { after, afterEach, before, describe, test } from 'node:test'
import { createLogger } from '../../src/logger.ts'
import { StateUnavailableError } from '../../src/errors.ts'
import type { HostInfo, TaskUpdate } from '../../src/protocol/messages.ts'
import { createSwarm, type Swarm } from '../../scheduler/swarm/index.ts'
import { waitFor } from '../helpers/process.ts'
import { startRedis, type TestRedis } from '../helpers/redis.ts'

const logger = createLogger({ level: 'silent' })
const DIGEST = `sha256:${'ab'.repeat(32)}`
const MIB = 1024 * 1024
const SIZE = 8 * MIB
const origin = { registry: 'https://registry.example', repo: 'library/app', kind: 'blob' as const }

function hostInfo (peerId: string, seed = false): HostInfo {
  return { peerId, addrs: [], hostname: peerId, seed, idc: '', location: '', uploadCapacity: 8, version: 'test' }
}

const hex = (i: number): string => i.toString(16).padStart(2, '0').repeat(32)

/** An announcement of pieces with SHA-256s that are just their index, repeated. */
function holding (pieces: number[], extra: Partial<TaskUpdate> = {}): TaskUpdate {
  return { digest: DIGEST, size: SIZE, add: pieces.map(i => [i, hex(i)]), fromOrigin: pieces, ...extra } as TaskUpdate
}

/** Asks for a window as a peer would: interest, a proposal, the appointment through the log. */
async function plan (swarm: Swarm, peer: string, first = 0, last = 7): Promise<number[]> {
  let task = swarm.state.task(DIGEST)
  const host = swarm.state.hostByPeer(peer)
  assert.ok(host !== undefined, `${peer} is registered`)
  if (task === undefined || !task.interested.has(host.slot)) task = (await swarm.log.append({ type: 'interest', peer, digest: DIGEST, size: SIZE, origin })).task
  assert.ok(task !== undefined)
  const proposal = swarm.scheduling.propose(task, host, first, last, new Set())
  const { granted } = await swarm.log.append({ type: 'appoint', peer, digest: DIGEST, appointment: proposal.appointment })
  return [...(granted?.get(peer) ?? [])].sort((a, b) => a - b)
}

/** The swarm as peer ids, comparable across replicas (slots are each replica's own). */
function view (swarm: Swarm): unknown {
  const snap = swarm.state.snapshot()
  return {
    hosts: snap.hosts.map(h => [h.info.peerId, h.via, h.barredUntil]).sort(),
    tasks: snap.tasks.map(t => ({ digest: t.digest, known: t.known, complete: [...t.complete].sort(), partial: [...t.partial].sort(), assignee: t.assignee, confirmed: t.confirmed }))
  }
}

type Make = () => Promise<Swarm>

/** What every log must do, whichever store is behind it. */
function stateSuite (name: string, make: Make, closeAll: () => Promise<void>): void {
  describe(`swarm state over ${name}`, () => {
    after(closeAll)

    test('registered hosts, announced pieces and the table are what plans see', async () => {
      const swarm = await make()
      await swarm.log.append({ type: 'register', host: hostInfo('A') })
      await swarm.log.append({ type: 'register', host: hostInfo('B') })
      assert.deepEqual(await plan(swarm, 'A', 0, 7), [0, 1, 2, 3, 4, 5, 6, 7], 'nobody holds anything: the first asker fetches from the origin')
      await swarm.log.append({ type: 'announce', peer: 'A', tasks: [holding([0, 1, 2, 3])] })
      const task = swarm.state.task(DIGEST)
      assert.equal(task?.known.size, 4)
      const b = swarm.state.hostByPeer('B')
      assert.ok(task !== undefined && b !== undefined)
      const proposal = swarm.scheduling.propose(task, b, 0, 3, new Set())
      assert.deepEqual(proposal.parents.map(p => p.peerId), ['A'])
      assert.deepEqual(proposal.assigned, [], 'pieces A holds are not fetched from the origin again')
      await swarm.log.append({ type: 'leave', peer: 'A' })
      assert.equal(swarm.state.hostByPeer('A'), undefined)
    })

    test('an appointment is a compare-and-set: a piece already taken is not given again', async () => {
      const swarm = await make()
      await swarm.log.append({ type: 'register', host: hostInfo('C') })
      await swarm.log.append({ type: 'register', host: hostInfo('D') })
      await swarm.log.append({ type: 'interest', peer: 'C', digest: DIGEST, size: SIZE, origin })
      const task = swarm.state.task(DIGEST)
      const [c, d] = [swarm.state.hostByPeer('C'), swarm.state.hostByPeer('D')]
      assert.ok(task !== undefined && c !== undefined && d !== undefined)
      // Both proposals made before either is applied, as two replicas would.
      const pc = swarm.scheduling.propose(task, c, 0, 7, new Set())
      const pd = swarm.scheduling.propose(task, d, 0, 7, new Set())
      const [gc, gd] = await Promise.all([
        swarm.log.append({ type: 'appoint', peer: 'C', digest: DIGEST, appointment: pc.appointment }),
        swarm.log.append({ type: 'appoint', peer: 'D', digest: DIGEST, appointment: pd.appointment })
      ])
      const mineC = [...(gc.granted?.get('C') ?? [])]
      const mineD = [...(gd.granted?.get('D') ?? [])]
      assert.equal(mineC.length + mineD.length, 8, 'every piece has a first fetcher')
      assert.deepEqual(mineC.filter(i => mineD.includes(i)), [], 'no piece has two')
    })

    test('a snapshot loaded into an empty state gives the same swarm', async () => {
      const swarm = await make()
      await swarm.log.append({ type: 'register', host: hostInfo('E') })
      await swarm.log.append({ type: 'interest', peer: 'E', digest: DIGEST, size: SIZE, origin })
      await plan(swarm, 'E')
      await swarm.log.append({ type: 'announce', peer: 'E', tasks: [holding([0, 1, 2])] })
      const before = view(swarm)
      const copy = swarm.machine.snapshot()
      swarm.machine.clear()
      assert.equal(swarm.state.hostCount, 0)
      swarm.machine.load(JSON.parse(JSON.stringify(copy)))
      assert.deepEqual(view(swarm), before)
    })
  })
}

// One scheduler: the log is a function call.
stateSuite('memory', async () => createSwarm({ logger }, { state: 'memory' }), async () => {})

// Replicas: the same suite over Redis, each test on a fresh Redis database state.
let redis: TestRedis | undefined
const opened: Swarm[] = []
async function redisSwarm (init: { password?: string | undefined, snapshotEveryMs?: number, replicaTtlMs?: number, appendTimeoutMs?: number, url?: string } = {}): Promise<Swarm> {
  const r = redis as TestRedis
  const swarm = createSwarm({ logger }, { state: init.url ?? r.url, redis: { password: init.password, snapshotEveryMs: init.snapshotEveryMs ?? 30_000, replicaTtlMs: init.replicaTtlMs ?? 10_000, appendTimeoutMs: 5_000 } })
  opened.push(swarm)
  await swarm.log.start()
  return swarm
}
async function closeRedis (): Promise<void> {
  for (const s of opened.splice(0)) await s.log.stop()
  await redis?.close()
}
describe('redis', () => {
  before(async () => { redis = await startRedis() })
  stateSuite('redis', async () => {
    await redis?.command('FLUSHALL')
    return redisSwarm()
  }, closeRedis)
})

test('over TLS: a replica trusting the server\'s CA works; one that does not is refused', async (t) => {
  const r = await startRedis({ tls: true, password: 'a-long-test-password' })
  t.after(async () => { await r.close() })
  const ca = await readFile(r.caFile as string, 'utf8')
  const good = createSwarm({ logger }, { state: r.url, redis: { password: 'a-long-test-password', ca, appendTimeoutMs: 5_000 } })
  const bad = createSwarm({ logger }, { state: r.url, redis: { password: 'a-long-test-password', appendTimeoutMs: 5_000 } })
  t.after(async () => { await good.log.stop(); await bad.log.stop() })
  await good.log.start()
  await bad.log.start()
  await good.log.append({ type: 'register', host: hostInfo('T1') })
  assert.equal(good.state.hostCount, 1)
  assert.equal(await r.command('GET', 'damselfly:seq'), '1', 'the event went through the TLS connection into the stream')
  await assert.rejects(bad.log.append({ type: 'register', host: hostInfo('T2') }), StateUnavailableError)
})

describe('replicas over one redis', () => {
  let r: TestRedis
  const mine: Swarm[] = []
  const replica = async (init: Parameters<typeof redisSwarm>[0] = {}): Promise<Swarm> => {
    const swarm = createSwarm({ logger }, { state: init.url ?? r.url, redis: { password: init.password, snapshotEveryMs: init.snapshotEveryMs ?? 30_000, replicaTtlMs: init.replicaTtlMs ?? 10_000, appendTimeoutMs: init.appendTimeoutMs ?? 5_000 } })
    mine.push(swarm)
    await swarm.log.start()
    return swarm
  }
  before(async () => { r = await startRedis({ password: 'a-long-test-password' }) })
  // Each test's replicas stop with it: one still running would see the next test's FLUSHALL as a lost history.
  afterEach(async () => {
    for (const s of mine.splice(0)) await s.log.stop()
  })
  after(async () => {
    for (const s of mine.splice(0)) await s.log.stop()
    await r.close()
  })
  const password = 'a-long-test-password'

  test('what one replica is told, the others know: hosts, tables and appointments agree', async () => {
    await r.command('FLUSHALL')
    const [a, b, c] = [await replica({ password }), await replica({ password }), await replica({ password })]
    await a.log.append({ type: 'register', host: hostInfo('P1') })
    await b.log.append({ type: 'register', host: hostInfo('P2') })
    await c.log.append({ type: 'register', host: hostInfo('P3') })
    // Two replicas appoint first fetchers for the same cold task at once.
    await waitFor(async () => a.state.hostCount === 3 && b.state.hostCount === 3, { timeoutMs: 5_000, what: 'registrations on every replica' })
    const [ga, gb] = await Promise.all([plan(a, 'P1'), plan(b, 'P2')])
    assert.deepEqual(ga.filter(i => gb.includes(i)), [], 'two replicas never send two hosts to the origin for one piece')
    assert.equal(ga.length + gb.length, 8, 'and every piece has one')
    await a.log.append({ type: 'announce', peer: 'P1', tasks: [holding(ga)] })
    await waitFor(async () => JSON.stringify(view(a)) === JSON.stringify(view(b)) && JSON.stringify(view(b)) === JSON.stringify(view(c)), { timeoutMs: 5_000, what: 'the same swarm on three replicas' })
    assert.equal(c.state.task(DIGEST)?.known.size, ga.length)
    assert.equal(c.state.hostByPeer('P1')?.via, a.log.replica)
  })

  test('a host asking a replica for digests is woken by an announcement made through another', async () => {
    await r.command('FLUSHALL')
    const [a, b] = [await replica({ password }), await replica({ password })]
    await a.log.append({ type: 'register', host: hostInfo('W1') })
    await plan(a, 'W1')
    await waitFor(async () => b.state.task(DIGEST) !== undefined, { timeoutMs: 5_000, what: 'the task on replica b' })
    const started = Date.now()
    const waiting = b.machine.waitForDigests(DIGEST, [0], 10_000, AbortSignal.timeout(15_000))
    await a.log.append({ type: 'announce', peer: 'W1', tasks: [holding([0])] })
    await waiting
    assert.ok(Date.now() - started < 5_000, `woken in ${Date.now() - started} ms, not at the wait's end`)
    assert.equal(b.state.task(DIGEST)?.known.has(0), true)
  })

  test('a replica that joins late loads the snapshot and reads on: the same swarm', async () => {
    await r.command('FLUSHALL')
    const a = await replica({ password, snapshotEveryMs: 300 })
    for (let i = 0; i < 20; i++) await a.log.append({ type: 'register', host: hostInfo(`L${i}`) })
    await plan(a, 'L0')
    await a.log.append({ type: 'announce', peer: 'L0', tasks: [holding([0, 1])] })
    await waitFor(async () => (await r.command('EXISTS', 'damselfly:snapshot')) === '1', { timeoutMs: 5_000, what: 'a snapshot' })
    // Written twice, so the log is trimmed behind the first.
    for (let i = 20; i < 25; i++) await a.log.append({ type: 'register', host: hostInfo(`L${i}`) })
    await new Promise(resolve => setTimeout(resolve, 2_500))
    const late = await replica({ password })
    await waitFor(async () => JSON.stringify(view(late)) === JSON.stringify(view(a)), { timeoutMs: 5_000, what: 'the late replica caught up' })
    assert.equal(late.state.hostCount, 25)
  })

  test('a replica that stops: the hosts connected through it are gone from the others', async () => {
    await r.command('FLUSHALL')
    const [a, b] = [await replica({ password }), await replica({ password })]
    await a.log.append({ type: 'register', host: hostInfo('G1') })
    await b.log.append({ type: 'register', host: hostInfo('G2') })
    await waitFor(async () => b.state.hostCount === 2, { timeoutMs: 5_000, what: 'both hosts on b' })
    await a.log.stop()
    await waitFor(async () => b.state.hostByPeer('G1') === undefined, { timeoutMs: 8_000, what: 'G1 gone from b' })
    assert.ok(b.state.hostByPeer('G2') !== undefined, 'hosts of the live replica stay')
  })

  test('a preheat job recorded by one replica is answered by any; it fails when its replica goes', async () => {
    await r.command('FLUSHALL')
    const [a, b] = [await replica({ password }), await replica({ password })]
    const job = { id: 'job-1', number: 0, request: { registry: 'https://harbor.example', repo: 'library/app', reference: 'v1' }, status: 'PENDING' as const, seed: undefined, replica: a.log.replica, createdAt: Date.now(), finishedAt: undefined, error: undefined, results: [] }
    const kept = (await a.log.append({ type: 'job', job })).job
    assert.equal(kept?.number, 1, 'numbered in log order')
    await a.log.append({ type: 'job', job: { ...job, status: 'RUNNING', seed: 'S' } })
    await waitFor(async () => b.state.jobByNumber(1)?.status === 'RUNNING', { timeoutMs: 5_000, what: 'the job on replica b' })
    await a.log.stop()
    await waitFor(async () => b.state.job('job-1')?.status === 'FAILURE', { timeoutMs: 8_000, what: 'the job failed on b' })
    assert.match(b.state.job('job-1')?.error ?? '', /replica running the job went away/)
  })

  test('a replica started while redis is down works once redis is up', async () => {
    const port = r.port
    await r.stop()
    const a = await replica({ password })
    await assert.rejects(a.log.append({ type: 'register', host: hostInfo('U1') }), StateUnavailableError)
    await r.start()
    await waitFor(async () => a.log.healthy, { timeoutMs: 10_000, what: `the replica connected to redis on ${port}` })
    await a.log.append({ type: 'register', host: hostInfo('U1') })
    assert.ok(a.state.hostByPeer('U1') !== undefined)
  })

  test('without the password the store refuses, and the replica says so at once', async () => {
    const bad = await replica({ password: 'wrong-password-for-this-redis' })
    const started = Date.now()
    await assert.rejects(bad.log.append({ type: 'register', host: hostInfo('X') }), StateUnavailableError)
    assert.ok(Date.now() - started < 2_000, `refused in ${Date.now() - started} ms`)
    assert.equal(bad.log.healthy, false)
  })

  test('redis down: appends fail fast; back without its data: a new history, and peers are asked to announce again', async () => {
    await r.command('FLUSHALL')
    const a = await replica({ password })
    let resyncs = 0
    a.log.onResync(() => { resyncs++ })
    await a.log.append({ type: 'register', host: hostInfo('R1') })
    await r.stop(true)
    const started = Date.now()
    await assert.rejects(a.log.append({ type: 'announce', peer: 'R1', tasks: [holding([0])] }), StateUnavailableError)
    assert.ok(Date.now() - started < 2_500, `refused in ${Date.now() - started} ms, not left waiting`)
    await r.start()
    const back = Date.now()
    await waitFor(async () => resyncs > 0, { timeoutMs: 10_000, intervalMs: 10, what: 'a resync after redis came back empty' })
    // Until then its plans send peers to the origin: the replica reconnects and reads the epoch at once, not at its next round.
    assert.ok(Date.now() - back < 500, `the new history read ${Date.now() - back} ms after redis was back`)
    await waitFor(async () => a.log.healthy && a.state.hostCount === 0, { timeoutMs: 5_000, what: 'the lost state forgotten' })
    await a.log.append({ type: 'register', host: hostInfo('R1') })
    assert.equal(a.state.hostCount, 1)
  })

  test('redis stalled: an append fails at its deadline, and nothing is left rejected unobserved', async (t) => {
    await r.command('FLUSHALL')
    const a = await replica({ password, appendTimeoutMs: 300 })
    await a.log.append({ type: 'register', host: hostInfo('S1') })
    const unhandled: unknown[] = []
    const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
    process.on('unhandledRejection', onUnhandled)
    t.after(() => { process.off('unhandledRejection', onUnhandled) })
    // Writes held back on the server: the append's deadline and its command's timeout come due together.
    assert.equal(await r.command('CLIENT', 'PAUSE', '1200', 'WRITE'), 'OK')
    const started = Date.now()
    await assert.rejects(a.log.append({ type: 'register', host: hostInfo('S2') }), StateUnavailableError)
    assert.ok(Date.now() - started < 1_000, `refused in ${Date.now() - started} ms`)
    await new Promise(resolve => setTimeout(resolve, 1_500))
    // Before, the append's own wait was rejected while the command was still out, and nobody held it: a crash.
    assert.deepEqual(unhandled.map(String), [])
  })

  test('back without its data: a replica writes no snapshot of the history it held, and one that joins then reads on', async () => {
    await r.command('FLUSHALL')
    // A snapshot due at every tick: the tick that reads the new epoch would write one, before the reader has reloaded.
    const a = await replica({ password, snapshotEveryMs: 200 })
    for (let i = 0; i < 30; i++) await a.log.append({ type: 'register', host: hostInfo(`E${i}`) })
    await waitFor(async () => (await r.command('EXISTS', 'damselfly:snapshot')) === '1', { timeoutMs: 5_000, what: 'a snapshot of the first history' })
    let resyncs = 0
    a.log.onResync(() => { resyncs++ })
    // Redis back empty, as after a restart without persistence; nothing appended, so only the epoch tells.
    await r.command('FLUSHALL')
    await waitFor(async () => resyncs > 0, { timeoutMs: 5_000, what: 'the new epoch read' })
    await new Promise(resolve => setTimeout(resolve, 1_500))
    const raw = await r.command('GET', 'damselfly:snapshot')
    if (raw !== '') {
      const snap = JSON.parse(raw) as { seq: number }
      const seq = Number(await r.command('GET', 'damselfly:seq') || '0')
      assert.ok(snap.seq <= seq, `a snapshot of event ${snap.seq} in a history of ${seq} events`)
    }
    await a.log.append({ type: 'register', host: hostInfo('E-new') })
    const late = await replica({ password })
    await waitFor(async () => late.state.hostByPeer('E-new') !== undefined, { timeoutMs: 5_000, what: 'the late replica to read the new history' })
    await late.log.append({ type: 'register', host: hostInfo('E-late') })
    await waitFor(async () => a.state.hostByPeer('E-late') !== undefined, { timeoutMs: 5_000, what: 'the first replica to read what the late one appended' })
    assert.equal(late.state.hostByPeer('E0'), undefined, 'nothing of the lost history')
  })
})
