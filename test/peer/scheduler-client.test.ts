import assert from 'node:assert/strict'
import { join } from 'node:path'
import { test, type TestContext } from 'node:test'
import { silentLogger } from '../../src/logger.ts'
import { createChannel } from '../../src/p2p/channel.ts'
import { createP2PNode, type P2PNode, type Stream } from '../../src/p2p/index.ts'
import { AckResponse, ParentsResponse } from '../../src/protocol/messages.ts'
import { SCHEDULER_SESSION_PROTOCOL, SchedulerRequest, check, type HostInfo } from '../../src/protocol/messages.ts'
import type { BlobInfo, PieceInventory } from '../../peer/piece-store/index.ts'
import type { ResolveAll } from '../../peer/swarm/scheduler-targets.ts'
import { createSchedulerClient, type SchedulerClient, type SchedulerClientInit } from '../../peer/swarm/scheduler-client.ts'
import { freePort, freePorts } from '../helpers/ports.ts'
import { waitFor } from '../helpers/process.ts'
import { tmpDir } from '../helpers/tmp.ts'

// A peer given several scheduler replicas joins one and, when that one goes,
// registers with another within a second or so and announces everything it holds
// again: a replica's peers must not wait out a restart or fall back to the origin.

const logger = silentLogger()
const DIGEST = `sha256:${'5e'.repeat(32)}`
const PIECES: Array<[number, string]> = [[0, 'aa'.repeat(32)], [1, 'bb'.repeat(32)]]

/** A piece store holding one verified blob of two pieces. */
const inventory: PieceInventory = {
  info: (digest) => digest === DIGEST ? { digest, size: 2 * 1024 * 1024, verified: true } as unknown as BlobInfo : undefined,
  list: () => [{ digest: DIGEST, size: 2 * 1024 * 1024, verified: true } as unknown as BlobInfo],
  heldPieces: (digest) => digest === DIGEST ? PIECES.map(([i]) => i) : [],
  pieceDigest: (digest, index) => digest === DIGEST ? PIECES[index]?.[1] : undefined,
  on: () => {},
  off: () => {}
}

/** A scheduler replica that answers every request with ok and remembers what it was told. */
interface FakeScheduler {
  readonly peerId: string
  readonly address: string
  readonly requests: SchedulerRequest[]
  /** Whether this peer's whole inventory reached it after its latest register. */
  heldAnnounced: () => boolean
  /** Session streams opened with it so far. */
  readonly sessions: number
  /** Hangs: it reads nothing more on its sessions (no answers, no heartbeats), and closes nothing. */
  hang: () => void
  stop: () => Promise<void>
}

async function startFakeScheduler (t: TestContext, host: string, port: number): Promise<FakeScheduler> {
  const dir = await tmpDir('df-fake-scheduler-')
  const node = await createP2PNode({ logger }, { dataDir: dir.path, keyName: 'scheduler.key', listen: [`/ip4/${host}/tcp/${port}`] })
  let stopped = false
  const stop = async (): Promise<void> => {
    if (stopped) return
    stopped = true
    await node.stop()
  }
  t.after(async () => {
    await stop()
    await dir.cleanup()
  })
  const requests: SchedulerRequest[] = []
  const streams: Stream[] = []
  await node.handle(SCHEDULER_SESSION_PROTOCOL, async (stream) => {
    streams.push(stream)
    createChannel(stream, {
      onRequest: async (body) => {
        const request = check(SchedulerRequest, body, 'scheduler request')
        requests.push(request)
        return request.type === 'register' ? { ok: true, schedulerId: node.peerId } : { ok: true }
      }
    })
  })
  return {
    peerId: node.peerId,
    address: `${host}:${port}`,
    requests,
    heldAnnounced () {
      const registered = requests.findLastIndex(r => r.type === 'register')
      if (registered < 0) return false
      const announced = requests.slice(registered).flatMap(r => r.type === 'announce' ? r.tasks : []).find(u => u.digest === DIGEST)
      return announced?.verified === true && JSON.stringify(announced.add) === JSON.stringify(PIECES)
    },
    get sessions () { return streams.length },
    hang () {
      for (const stream of streams) stream.pause()
    },
    stop
  }
}

async function startClient (t: TestContext, addresses: string[], extra: { resolve?: ResolveAll, random?: () => number } = {}, init: Partial<SchedulerClientInit> = {}): Promise<{ client: SchedulerClient, node: P2PNode }> {
  const dir = await tmpDir('df-peer-node-')
  const node = await createP2PNode({ logger }, { dataDir: join(dir.path, 'p2p'), keyName: 'peer.key', listen: [] })
  const hostInfo = (): HostInfo => ({ peerId: node.peerId, addrs: [], hostname: 'test', seed: false, location: '', idc: '', uploadCapacity: 4, version: 'test' })
  const client = createSchedulerClient({ logger, node, store: inventory, hostInfo, facts: () => [], originOf: () => undefined, ...extra }, { ...init, addresses })
  t.after(async () => {
    await client.stop()
    await node.stop()
    await dir.cleanup()
  })
  return { client, node }
}

test('a headless Service name: the peer joins one replica and, when it goes, registers with the other at once with its whole inventory', async (t) => {
  const port = await freePort()
  // Two replicas on one port, as pods behind a name: 127.0.0.1 and 127.0.0.2 are both loopback.
  const replicas = [await startFakeScheduler(t, '127.0.0.1', port), await startFakeScheduler(t, '127.0.0.2', port)]
  let lookups = 0
  const resolve: ResolveAll = async (host) => {
    assert.equal(host, 'damselfly-scheduler.test')
    lookups++
    return [{ address: '127.0.0.2', family: 4 }, { address: '127.0.0.1', family: 4 }]
  }
  const { client } = await startClient(t, [`damselfly-scheduler.test:${port}`], { resolve })
  client.start()
  await client.settled()
  assert.equal(client.connected, true)
  const first = replicas.find(r => r.peerId === client.peerId)
  const other = replicas.find(r => r !== first)
  assert.ok(first !== undefined && other !== undefined, `in session with one of the replicas (${client.peerId ?? 'none'})`)
  assert.ok(first.heldAnnounced(), 'the first replica heard what the peer holds')
  assert.equal(other.requests.length, 0, 'the other replica heard nothing')

  const lostAt = Date.now()
  await first.stop()
  await waitFor(async () => client.connected && client.peerId === other.peerId && other.heldAnnounced(), { timeoutMs: 5_000, intervalMs: 20, what: 'the peer to register with the other replica and re-announce' })
  const tookMs = Date.now() - lostAt
  assert.ok(tookMs < 2_000, `moved to the other replica in ${tookMs} ms`)
  assert.ok(lookups >= 2, `the name was resolved again for the reconnect (${lookups} lookups)`)

  await client.stop()
  assert.equal(other.requests.at(-1)?.type, 'leave', 'a stopping peer says goodbye to the replica it is with')
})

test('a dead address first in line is passed at once, and start waits for the live one', async (t) => {
  const [dead, port] = await freePorts(2) as [number, number]
  const live = await startFakeScheduler(t, '127.0.0.1', port)
  const { client } = await startClient(t, [`127.0.0.1:${dead}`, live.address], { random: () => 0 })
  const startedAt = Date.now()
  client.start()
  await client.settled()
  const tookMs = Date.now() - startedAt
  assert.equal(client.connected, true, 'settled only once a scheduler took the session, not at the first failure')
  assert.equal(client.peerId, live.peerId)
  assert.ok(live.heldAnnounced())
  assert.ok(tookMs < 2_000, `reached the live scheduler in ${tookMs} ms`)
})

test('with every replica down, start gives up after one round; the peer joins the first that comes up', async (t) => {
  const ports = await freePorts(2) as [number, number]
  const { client } = await startClient(t, ports.map(p => `127.0.0.1:${p}`), { random: () => 0 })
  const startedAt = Date.now()
  client.start()
  await client.settled()
  assert.equal(client.connected, false)
  assert.ok(Date.now() - startedAt < 2_000, 'both were tried without a backoff in between')
  const late = await startFakeScheduler(t, '127.0.0.1', ports[1])
  await waitFor(async () => client.connected && late.heldAnnounced(), { timeoutMs: 10_000, intervalMs: 20, what: 'the peer to join the scheduler that came up' })
  assert.equal(client.peerId, late.peerId)
})

test('one address: a restarted scheduler is joined again and told everything again', async (t) => {
  const port = await freePort()
  const before = await startFakeScheduler(t, '127.0.0.1', port)
  const { client } = await startClient(t, [before.address])
  client.start()
  await client.settled()
  assert.equal(client.peerId, before.peerId)
  await before.stop()
  await waitFor(async () => !client.connected, { timeoutMs: 5_000, intervalMs: 20, what: 'the session to drop' })
  const after = await startFakeScheduler(t, '127.0.0.1', port)
  await waitFor(async () => client.connected && after.heldAnnounced(), { timeoutMs: 10_000, intervalMs: 20, what: 'the peer to register with the restarted scheduler' })
  assert.equal(client.peerId, after.peerId)
})

test('a session is one stream: register, inventory and every request after it travel on it', async (t) => {
  const live = await startFakeScheduler(t, '127.0.0.1', await freePort())
  const { client } = await startClient(t, [live.address])
  client.start()
  await client.settled()
  await Promise.all(Array.from({ length: 20 }, async () => client.request({ type: 'report', report: { kind: 'origin-failed', digest: DIGEST, code: 'DF_ERR_TEST' } }, AckResponse)))
  assert.equal(live.sessions, 1)
  assert.ok(live.requests.length >= 22, `${live.requests.length} requests on it`)
  // An answer that does not fit what was asked is the scheduler's fault: the peer treats it as unavailable.
  await assert.rejects(client.request({ type: 'parents', digest: DIGEST, size: 1, origin: { registry: 'https://r.example', repo: 'a', kind: 'blob' }, first: 0, last: 0 }, ParentsResponse), { code: 'DF_ERR_SCHEDULER_UNAVAILABLE' })
})

test('a scheduler that hangs (its connection open, nothing answered): the peer gives it up after heartbeat + timeout and moves to the other', async (t) => {
  const ports = await freePorts(2) as [number, number]
  const replicas = [await startFakeScheduler(t, '127.0.0.1', ports[0]), await startFakeScheduler(t, '127.0.0.1', ports[1])]
  const { client } = await startClient(t, replicas.map(r => r.address), { random: () => 0 }, { heartbeatMs: 200, heartbeatTimeoutMs: 300 })
  client.start()
  await client.settled()
  const [first, other] = replicas as [FakeScheduler, FakeScheduler]
  assert.equal(client.peerId, first.peerId)
  // Idle past several heartbeats: answered, so the session stays.
  await new Promise(resolve => setTimeout(resolve, 700))
  assert.equal(client.peerId, first.peerId)
  assert.equal(first.sessions, 1)

  const hungAt = Date.now()
  first.hang()
  await waitFor(async () => client.connected && client.peerId === other.peerId && other.heldAnnounced(), { timeoutMs: 5_000, intervalMs: 20, what: 'the peer to give up the hung scheduler and register with the other' })
  const tookMs = Date.now() - hungAt
  assert.ok(tookMs >= 300 && tookMs < 2_500, `moved after ${tookMs} ms (heartbeat 200 ms, timeout 300 ms)`)
})
