/**
 * A load generator for bench/scenarios/sessions.ts, forked as a process of
 * its own (several of them at once): many peers' scheduler sessions in one
 * process, each with its own libp2p node and identity (src/p2p) and the
 * peer's own session client (peer/swarm/scheduler-client.ts), which
 * registers, announces its inventory, keeps its session alive as a peer does
 * and asks for plans over the wire (one session stream per peer).
 *
 * Driven over the IPC channel: `{ id, cmd, args }` in, `{ id, result }` or
 * `{ id, error }` out. Commands: init, connect, warm, open, closed, announce,
 * status, stop.
 */
import { createHash } from 'node:crypto'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { monitorEventLoopDelay, performance } from 'node:perf_hooks'
import { setTimeout as sleep, setImmediate as tick } from 'node:timers/promises'
import { silentLogger } from '../src/logger.ts'
import { createP2PNode, type P2PNode } from '../src/p2p/index.ts'
import { choosePieceSize, pieceCount } from '../src/pieces.ts'
import { AckResponse, ParentsResponse, type OriginRef, type TaskUpdate } from '../src/protocol/messages.ts'
import { createSchedulerClient, type SchedulerClient } from '../peer/swarm/scheduler-client.ts'
import type { BlobInfo, PieceInventory } from '../peer/piece-store/index.ts'

/** The swarm every load generator agrees on: the same tasks, piece tables and holdings by session number. */
export interface SwarmSpec {
  /** Tasks (blobs) in the swarm. */
  tasks: number
  /** Size of each task; 64 MiB is 64 pieces. */
  taskBytes: number
  /** Tasks each session holds whole (verified): they make plans have parents. */
  wholePerSession: number
  /** Tasks each session asks plans for (and holds part of the first of them). */
  wantsPerSession: number
  /** Pieces per plan window (first..first+window-1), as a peer asks for a read-ahead window. */
  window: number
}

export interface InitArgs {
  /** Global number of this process's first session. */
  first: number
  sessions: number
  /** Scheduler replicas (host:port); session g starts at replica g mod the count. */
  addresses: string[]
  swarm: SwarmSpec
  /** Heartbeat of each session's stream when idle (the peer's default is 30 s). */
  heartbeatMs?: number
}

export interface LatencyResult {
  sent: number
  ok: number
  errors: number
  firstError: string | undefined
  seconds: number
  /** Milliseconds, from when each request was due (open loop) or sent (closed loop) to its answer or failure. */
  latencies: number[]
  /** Of those, how many had parents to offer (the mix is meant to give parents). */
  withParents: number
  /** Plans that sent the requester to the origin for some of its window. */
  withAssigned: number
  /** This generator's own event-loop delay through the loop, in ms: latency the measuring side adds. */
  loop?: { p99: number, max: number }
}

const ORIGIN: OriginRef = { registry: 'https://registry.bench.example', repo: 'bench/app', kind: 'blob' }

export function taskDigest (t: number): string {
  return `sha256:${createHash('sha256').update(`bench-sessions-task-${t}`).digest('hex')}`
}

export function pieceHex (t: number, i: number): string {
  return createHash('sha256').update(`bench-sessions-task-${t}-piece-${i}`).digest('hex')
}

/** What session `g` holds whole, and what it asks plans for. */
export function holdings (g: number, spec: SwarmSpec): { whole: number[], wants: number[], partial: number } {
  const whole: number[] = []
  for (let k = 0; whole.length < spec.wholePerSession && k < spec.tasks; k++) {
    const t = (g * 7 + k * 31) % spec.tasks
    if (!whole.includes(t)) whole.push(t)
  }
  const wants: number[] = []
  for (let k = 0; wants.length < spec.wantsPerSession && k < spec.tasks * 2; k++) {
    const t = (g * 11 + 3 + k * 17) % spec.tasks
    if (!whole.includes(t) && !wants.includes(t)) wants.push(t)
  }
  return { whole, wants, partial: wants[0] as number }
}

interface Session {
  g: number
  /** Times its connection to the scheduler closed. */
  drops: number
  node: P2PNode
  client: SchedulerClient
  wants: number[]
  partial: number
  /** Next piece of the partial task to announce. */
  nextPiece: number
}

const sessions: Session[] = []
let spec: SwarmSpec | undefined
let dir: string | undefined
let taskDigests: string[] = []
let pieces = 0
let pieceSize = 0
const logger = silentLogger()

/** A piece store that holds, by session number, what `holdings` says: whole tasks, and the first half of one more. */
function inventory (g: number, s: SwarmSpec): PieceInventory {
  const { whole, partial } = holdings(g, s)
  const held = new Map<string, { t: number, count: number }>()
  for (const t of whole) held.set(taskDigests[t] as string, { t, count: pieces })
  held.set(taskDigests[partial] as string, { t: partial, count: Math.floor(pieces / 2) })
  const info = (digest: string): BlobInfo | undefined => {
    const h = held.get(digest)
    if (h === undefined) return undefined
    return { digest, size: s.taskBytes, pieceSize, pieceCount: pieces, mediaType: undefined, heldCount: h.count, complete: h.count === pieces, verified: h.count === pieces }
  }
  return {
    info,
    list: () => [...held.keys()].map(d => info(d) as BlobInfo),
    heldPieces: (digest) => Array.from({ length: held.get(digest)?.count ?? 0 }, (_, i) => i),
    pieceDigest: (digest, i) => { const h = held.get(digest); return h === undefined || i >= h.count ? undefined : pieceHex(h.t, i) },
    on: () => {},
    off: () => {}
  }
}

async function init (args: InitArgs): Promise<{ sessions: number, ms: number, rssMiB: number }> {
  const started = performance.now()
  spec = args.swarm
  taskDigests = Array.from({ length: spec.tasks }, (_, t) => taskDigest(t))
  pieceSize = choosePieceSize(spec.taskBytes)
  pieces = pieceCount(spec.taskBytes, pieceSize)
  dir = await mkdtemp(path.join(tmpdir(), 'df-bench-sessions-'))
  for (let k = 0; k < args.sessions; k++) {
    const g = args.first + k
    // Its own identity: a key file per session in this process's temp dir.
    const node = await createP2PNode({ logger }, { dataDir: dir, keyName: `session-${g}.key`, listen: [], maxConnections: 16 })
    const { wants, partial } = holdings(g, spec)
    const replica = g % args.addresses.length
    const client = createSchedulerClient({
      logger,
      node,
      store: inventory(g, spec),
      hostInfo: () => ({
        peerId: node.peerId,
        // Where a child would fetch from: addresses nobody dials here (the scheduler only hands them out).
        addrs: [`/ip4/10.${(g >> 16) & 255}.${(g >> 8) & 255}.${g & 255}/tcp/4000`],
        upload: [`http://10.${(g >> 16) & 255}.${(g >> 8) & 255}.${g & 255}:4002`],
        hostname: `bench-node-${g}`,
        seed: false,
        location: `zone-${g % 8}`,
        idc: '',
        uploadCapacity: 32,
        version: 'bench'
      }),
      facts: () => [],
      originOf: () => ORIGIN,
      // Every replica is named, as a peer is configured; this session starts at replica g mod count.
      random: () => (replica + 0.5) / args.addresses.length
    }, { addresses: args.addresses, ...(args.heartbeatMs === undefined ? {} : { heartbeatMs: args.heartbeatMs }) })
    const session: Session = { g, drops: 0, node, client, wants, partial, nextPiece: Math.floor(pieces / 2) }
    node.onDisconnect(() => { session.drops++ })
    sessions.push(session)
  }
  return { sessions: sessions.length, ms: Math.round(performance.now() - started), rssMiB: Math.round(process.memoryUsage().rss / 2 ** 20) }
}

/**
 * Starts sessions [from, to) of this process, `concurrency` at a time (each
 * a TLS handshake, a register and the inventory), and waits until each has
 * come up or its first attempt failed.
 */
async function connect ({ from, to, concurrency, timeoutMs }: { from: number, to: number, concurrency: number, timeoutMs: number }): Promise<{ connected: number, ms: number }> {
  const started = performance.now()
  const batch = sessions.slice(from, to)
  let next = 0
  await Promise.all(Array.from({ length: concurrency }, async () => {
    for (let s = batch[next++]; s !== undefined; s = batch[next++]) {
      s.client.start()
      await Promise.race([s.client.settled(), sleep(timeoutMs, undefined, { ref: false })])
    }
  }))
  return { connected: batch.filter(s => s.client.connected).length, ms: Math.round(performance.now() - started) }
}

/** Sessions up, how many with each scheduler (by its peer id), and how many times a connection to a scheduler closed. */
function status (): { sessions: number, connected: number, bySchedulers: Record<string, number>, drops: number, rssMiB: number } {
  const bySchedulers: Record<string, number> = {}
  for (const s of sessions) {
    const peer = s.client.peerId
    if (peer !== undefined) bySchedulers[peer] = (bySchedulers[peer] ?? 0) + 1
  }
  return { sessions: sessions.length, connected: sessions.filter(s => s.client.connected).length, bySchedulers, drops: sessions.reduce((sum, s) => sum + s.drops, 0), rssMiB: Math.round(process.memoryUsage().rss / 2 ** 20) }
}

/** The first `count` sessions of this process that are up: the peers pulling now (the rest stay idle). */
const active = (count: number): Session[] => sessions.slice(0, count).filter(s => s.client.connected)

function planRequest (s: Session, t: number): Parameters<SchedulerClient['request']>[0] {
  const s0 = spec as SwarmSpec
  const first = Math.floor(Math.random() * (pieces - s0.window + 1))
  return { type: 'parents', digest: taskDigests[t] as string, size: s0.taskBytes, origin: ORIGIN, first, last: first + s0.window - 1 }
}

/** One plan; resolves with whether it had parents and assignments. Throws on error. */
async function plan (s: Session, t: number): Promise<{ parents: number, assigned: number }> {
  const r = await s.client.request(planRequest(s, t), ParentsResponse)
  return { parents: r.parents.length, assigned: r.assigned.length }
}

/** Each session asks once about each task it wants: the swarm learns its interest (an event through the log). */
async function warm ({ active: count, concurrency }: { active: number, concurrency: number }): Promise<LatencyResult> {
  const work: Array<[Session, number]> = []
  for (const s of active(count)) for (const t of s.wants) work.push([s, t])
  return closedLoop(count, concurrency, Infinity, work)
}

async function closedLoop (count: number, concurrency: number, seconds: number, fixed?: Array<[Session, number]>): Promise<LatencyResult> {
  const live = active(count)
  const result = emptyResult()
  if (live.length === 0) return result
  const started = performance.now()
  const deadline = started + seconds * 1000
  let next = 0
  await Promise.all(Array.from({ length: concurrency }, async () => {
    for (;;) {
      let s: Session, t: number
      if (fixed !== undefined) {
        if (next >= fixed.length) return
        [s, t] = fixed[next++] as [Session, number]
      } else {
        if (performance.now() >= deadline) return
        s = live[Math.floor(Math.random() * live.length)] as Session
        t = s.wants[Math.floor(Math.random() * s.wants.length)] as number
      }
      const t0 = performance.now()
      result.sent++
      try {
        record(result, await plan(s, t))
      } catch (err) {
        fail(result, err)
      }
      result.latencies.push(performance.now() - t0)
    }
  }))
  result.seconds = (performance.now() - started) / 1000
  return result
}

/**
 * Open loop: `rate` plans per second, each due at its own time whatever the
 * scheduler's answers, from a random session for one of the tasks it wants.
 * Latency counts from when a request was due, so a generator or scheduler
 * falling behind shows in it. Requests still unanswered `graceMs` after the
 * last was due count as failed, with the time waited so far (a lower bound).
 */
async function openLoop ({ active: count, rate, seconds, graceMs }: { active: number, rate: number, seconds: number, graceMs?: number }): Promise<LatencyResult> {
  const live = active(count)
  const result = emptyResult()
  if (live.length === 0) return result
  const inFlight = new Map<Promise<void>, number>()
  const delay = monitorEventLoopDelay({ resolution: 1 })
  delay.enable()
  const started = performance.now()
  const total = Math.round(rate * seconds)
  while (result.sent < total) {
    const due = Math.min(total, Math.floor((performance.now() - started) / 1000 * rate))
    while (result.sent < due) {
      const at = started + result.sent / rate * 1000
      const s = live[Math.floor(Math.random() * live.length)] as Session
      const t = s.wants[Math.floor(Math.random() * s.wants.length)] as number
      result.sent++
      // A failed plan counts with the time it took to fail: the peer waited that long too.
      const p: Promise<void> = plan(s, t).then((r) => { if (inFlight.has(p)) record(result, r) }, (err: unknown) => { if (inFlight.has(p)) fail(result, err) }).finally(() => {
        if (inFlight.delete(p)) result.latencies.push(performance.now() - at)
      })
      inFlight.set(p, at)
    }
    await sleep(1)
  }
  const grace = graceMs === undefined ? undefined : sleep(graceMs, undefined, { ref: false })
  await Promise.race([Promise.all(inFlight.keys()), ...(grace === undefined ? [] : [grace])])
  const now = performance.now()
  for (const at of inFlight.values()) {
    fail(result, new Error(`no answer within ${graceMs ?? 0} ms of the last request`))
    result.latencies.push(now - at)
  }
  inFlight.clear()
  delay.disable()
  result.loop = { p99: delay.percentile(99) / 1e6, max: delay.max / 1e6 }
  result.seconds = (now - started) / 1000
  return result
}

/**
 * Closed-loop announcements, each one piece of the task a session holds
 * part of (as a peer taking a blob in announces its pieces), sent as the
 * session client sends them: one announce request, one stream.
 */
async function announce ({ active: count, concurrency, seconds }: { active: number, concurrency: number, seconds: number }): Promise<LatencyResult> {
  const live = active(count)
  const result = emptyResult()
  if (live.length === 0) return result
  const started = performance.now()
  const deadline = started + seconds * 1000
  let n = 0
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (performance.now() < deadline) {
      const s = live[n++ % live.length] as Session
      const i = s.nextPiece
      s.nextPiece = s.nextPiece + 1 >= pieces ? Math.floor(pieces / 2) : s.nextPiece + 1
      const update: TaskUpdate = { digest: taskDigests[s.partial] as string, size: (spec as SwarmSpec).taskBytes, origin: ORIGIN, add: [[i, pieceHex(s.partial, i)]] }
      const t0 = performance.now()
      result.sent++
      try {
        await s.client.request({ type: 'announce', tasks: [update] }, AckResponse)
        result.ok++
      } catch (err) {
        fail(result, err)
      }
      result.latencies.push(performance.now() - t0)
    }
  }))
  result.seconds = (performance.now() - started) / 1000
  return result
}

function emptyResult (): LatencyResult {
  return { sent: 0, ok: 0, errors: 0, firstError: undefined, seconds: 0, latencies: [], withParents: 0, withAssigned: 0 }
}

function record (result: LatencyResult, r: { parents: number, assigned: number }): void {
  result.ok++
  if (r.parents > 0) result.withParents++
  if (r.assigned > 0) result.withAssigned++
}

function fail (result: LatencyResult, err: unknown): void {
  result.errors++
  result.firstError ??= (err as Error).message
}

async function stop (): Promise<void> {
  // Sessions end as a peer's do (a leave each), a few hundred at a time.
  for (let i = 0; i < sessions.length; i += 200) {
    await Promise.all(sessions.slice(i, i + 200).map(async s => { await s.client.stop().catch(() => {}) }))
  }
  for (let i = 0; i < sessions.length; i += 200) {
    await Promise.all(sessions.slice(i, i + 200).map(async s => { await s.node.stop().catch(() => {}) }))
  }
  sessions.length = 0
  if (dir !== undefined) await rm(dir, { recursive: true, force: true })
}

const commands: Record<string, (args: never) => Promise<unknown> | unknown> = { init, connect, warm, open: openLoop, closed: async ({ active: count, concurrency, seconds }: { active: number, concurrency: number, seconds: number }) => closedLoop(count, concurrency, seconds), announce, status, stop }

process.on('message', (msg: { id: number, cmd: string, args: unknown }) => {
  void (async () => {
    try {
      const fn = commands[msg.cmd]
      if (fn === undefined) throw new Error(`unknown command ${msg.cmd}`)
      const result = await fn(msg.args as never)
      process.send?.({ id: msg.id, result })
      if (msg.cmd === 'stop') {
        await tick()
        process.disconnect()
      }
    } catch (err) {
      process.send?.({ id: msg.id, error: (err as Error).stack ?? String(err) })
    }
  })()
})
// The orchestrator went away, or this process is told to end: leave, and take the key files along.
const leave = (): void => {
  void (async () => {
    if (dir !== undefined) await rm(dir, { recursive: true, force: true }).catch(() => {})
    process.exit(0)
  })()
}
process.on('disconnect', leave)
process.on('SIGTERM', leave)
process.on('SIGINT', leave)
