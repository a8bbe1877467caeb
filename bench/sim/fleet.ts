import { createHash } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import { createLogger } from '../../src/logger.ts'
import { PieceSet, choosePieceSize, pieceBounds, pieceCount } from '../../src/pieces.ts'
import type { HostInfo, Load, OriginRef, TaskUpdate } from '../../src/protocol/messages.ts'
import { createScheduling, withGranted, type SchedulingInit } from '../../scheduler/scheduling/index.ts'
import { createMemoryState, type HostRecord } from '../../scheduler/state/index.ts'
import { createEventClock } from '../../scheduler/swarm/clock.ts'
import type { Effect, SwarmEvent } from '../../scheduler/swarm/events.ts'
import { createSwarmMachine, type Outcome } from '../../scheduler/swarm/machine.ts'
import { createTrustKeeper } from '../../scheduler/swarm/trust.ts'
import { holderOrder, patienceEnd, stillComing as fetcherStillComing, type Progress } from '../../peer/swarm/fetcher.ts'
import { UploadPace } from '../../peer/upload/pace.ts'
import { EventQueue, type Timer } from './heap.ts'
import { Network } from './network.ts'

/**
 * A discrete-event simulation of one blob pulled by a fleet at once, driving
 * the scheduler's own state, event machine and parent selection (composed as
 * scheduler/swarm/index.ts composes them, with a clock that reads simulated
 * time), with peers modelled after peer/: a reader sending pieces in order and
 * taking them ahead out of order as peer/blobs/reader.ts does, a fetcher
 * following plans as peer/swarm/fetcher.ts does (plans cached per block,
 * window, plan reuse, peers before seeds and spread over eight, hedging, waiting on
 * in-progress pieces, pausing and asking again on busy parents, exclusions,
 * the origin after three failed rounds), an upload server as peer/upload does
 * (slots, a bounded queue answered "busy" past it, busy answers naming the
 * children it recently sent the piece to, which the child asks next, a seed
 * sending each piece once, bounded waits for pieces still on their way),
 * origin runs as peer/blobs does, and announcements batched as
 * peer/swarm/scheduler-client.ts batches them.
 *
 * What is not modelled: CPU (hashing, the scheduler's own time to answer: a
 * plan costs a round trip and the fixed request cost, never queueing at the
 * scheduler), disks, TCP slow start, and the scheduler replicas' log (one
 * scheduler, events applied as they arrive).
 */

export interface PeerModel {
  /** With `lookahead` 0: pieces a reader has under way, in order (the reader before it took pieces out of order). */
  readahead: number
  /** Pieces asked about per plan (fetcher `window`). */
  window: number
  /**
   * Out-of-order fetching (0: off, the reader's in-order read-ahead): pieces
   * ahead of the reader's head that may be fetched, in a random order, with
   * `inflight` under way at once (the head always among them).
   */
  lookahead: number
  inflight: number
  planTtlMs: number
  inProgressWaitMs: number
  parentBackoffMs: number
  busyPatienceMs: number
  uploadConcurrency: number
  /** Uploads at once whatever the uplink's measured rate (peer/upload/pace.ts `min`); 0: no pacing, always `uploadConcurrency`. */
  uploadMin: number
  uploadQueue: number
  /** Children a busy answer names (peer/upload/recipients.ts), and how many a child follows per piece (fetcher `MAX_HINTED`); 0: none. */
  hints: number
  maxHinted: number
  /** A parent's recipients are named this long after a send to them began. */
  hintTtlMs: number
  /** After a seed's send of a piece began or arrived, how long it points others at that child instead of sending it again (upload `RESEND_MS`). */
  resendMs: number
  maxWaits: number
  maxWaitMs: number
  flushMs: number
  minAnnounceIntervalMs: number
  loadIntervalMs: number
  maxRunPieces: number
  /** Past patience, wait again for a first fetcher that is still landing pieces instead of leaving it for the origin (fetcher `stillComing`). */
  waitProgressing: boolean
  /** A seed sends a piece to one child at a time, refusing others (busy) for up to this long; 0: off (upload `onePerPiece`). */
  samePieceMs: number
  /** Patience with busy parents counts from the last piece a parent sent the node (peer/swarm/fetcher.ts `fetchPatiently`), not from the piece's first look. */
  patienceFromProgress: boolean
}

export const PEER_DEFAULTS: PeerModel = {
  readahead: 4,
  window: 64,
  lookahead: 256,
  inflight: 8,
  planTtlMs: 2_000,
  inProgressWaitMs: 15_000,
  parentBackoffMs: 30_000,
  busyPatienceMs: 20_000,
  samePieceMs: 12_000,
  resendMs: 3_000,
  uploadConcurrency: 8,
  uploadMin: 2,
  uploadQueue: 0,
  hints: 4,
  maxHinted: 16,
  hintTtlMs: 30_000,
  maxWaits: 256,
  maxWaitMs: 15_000,
  flushMs: 20,
  minAnnounceIntervalMs: 100,
  loadIntervalMs: 2_000,
  maxRunPieces: 64,
  waitProgressing: true,
  patienceFromProgress: true
}

export interface FleetConfig {
  /** Peers pulling at the start (besides the seed). */
  nodes: number
  blobBytes: number
  /** Bytes per second. */
  nodeUp: number
  nodeDown: number
  seedUp: number
  seedDown: number
  originUp: number
  /** One way, per message. */
  latencyMs: number
  /** Fixed cost of every request (connection, headers, handler), paid once per request. */
  requestCostMs: number
  /** Fraction of the starting peers that leave part-way through their pull. */
  leaving: number
  /** Peers joining late, as a fraction of `nodes` (in addition to them). */
  late: number
  /** Leaves and late joins happen at uniform times within this window, in multiples of T*. */
  churnWindow: [number, number]
  /** PRNG seed: the same seed, the same run. */
  seed: number
  peer: PeerModel
  /** Stop past this many T* and report who did not finish. */
  horizon: number
  /** Parent selection settings (scheduler/scheduling), for what-ifs; the scheduler's defaults otherwise. */
  scheduling?: Omit<SchedulingInit, 'now' | 'random'> | undefined
  /** Link sharing: each transfer at the smaller of its two even shares (default), or max-min fair (`Network`). */
  network?: 'even' | 'max-min' | undefined
  /** Progress, once per simulated second. */
  log?: ((line: string) => void) | undefined
}

/**
 * A data centre: every peer 100 MiB/s up and down (about a 1 Gb/s NIC), the
 * seed twice that up, the origin registry 200 MiB/s, 0.5 ms one way and 1 ms
 * per request. T* is then the download bound, S ÷ 100 MiB/s = 10.24 s.
 */
export const FLEET_DEFAULTS: Omit<FleetConfig, 'nodes'> = {
  blobBytes: 1024 * 1024 * 1024,
  nodeUp: 100 * 1024 * 1024,
  nodeDown: 100 * 1024 * 1024,
  seedUp: 200 * 1024 * 1024,
  seedDown: 400 * 1024 * 1024,
  originUp: 200 * 1024 * 1024,
  latencyMs: 0.5,
  requestCostMs: 1,
  leaving: 0,
  late: 0,
  churnWindow: [0.1, 0.9],
  seed: 1,
  peer: PEER_DEFAULTS,
  horizon: 20
}

export interface FleetResult {
  nodes: number
  tStarMs: number
  /** Each bound of T*, ms. */
  bounds: { origin: number, seed: number, download: number, swarm: number }
  /** Pull time of each peer that stayed (join to last piece), ms; Infinity for those that did not finish. */
  times: number[]
  /** Time since the start at which each finished peer finished, sorted (for the plot). */
  finishedAt: number[]
  slowest: number
  p50: number
  p99: number
  /** Bytes the origin sent ÷ blob size. */
  originRatio: number
  /** Plans asked of the scheduler over the pull (start to the last peer done). */
  plans: number
  plansPerSecond: number
  plansPerNodeSecond: number
  makespanMs: number
  /** Peers that stayed (the percentiles are over them), and that left part-way. */
  stayed: number
  left: number
  unfinished: number
  counts: Record<string, number>
  /** Share of all piece bytes the seed uploaded; upload capacity of the peers used over the pull. */
  seedShare: number
  peerUploadUse: number
  /** Of the piece requests peers made, the share sent to the seed. */
  toSeed: number
  /** Of the blob, what the peers that stayed held at the end (1 when all finished). */
  delivered: number
  /** Wall time spent in the scheduler's code (plans and applying events), not simulated time. */
  schedulerMs: number
  wallMs: number
}

interface Plan {
  first: number
  last: number
  at: number
  parents: SimParent[]
  digests: Set<number>
  assigned: Set<number>
}

interface SimParent {
  node: Node
  /** Named by a busy parent (hedged like a holder; its failures are not held against it). */
  hinted?: boolean
  complete: boolean
  held: PieceSet | undefined
  fetching: PieceSet | undefined
}

type Failure = 'busy' | 'not-found' | 'error' | 'timeout'

/** One piece request from a child to a parent, on both sides. */
interface Attempt {
  child: Node
  parent: Node
  piece: number
  waitMs: number
  state: 'sent' | 'waiting' | 'queued' | 'moving' | 'replied' | 'done'
  flow: number
  /** The child's: its deadline and its hedge. */
  timers: Timer[]
  /** The parent's: how long it waits for a piece still on its way. */
  waitTimer: Timer | undefined
  /** When its bytes were given a slot at the parent (queued or moving). */
  slottedAt?: number
  ok: () => void
  fail: (why: Failure, hints?: Node[]) => void
}

interface Node {
  /** Index in the network (0 is the origin). */
  i: number
  peerId: string
  seed: boolean
  info: HostInfo
  host: HostRecord | undefined
  joinAt: number
  leaveAt: number
  gone: boolean
  doneAt: number
  /** Per piece: 0 missing, 1 under way, 2 held. */
  have: Uint8Array
  held: number
  reading: boolean
  firstLanded: boolean
  /** When a parent last sent this node a piece. */
  lastLandedAt: number
  head: number
  started: number
  /** Pieces under way (out-of-order mode). */
  underway: number
  /** Uploads waiting for a piece still on its way here. */
  waiters: Map<number, Set<Attempt>>
  /**
   * Per piece, `m.hints + 1` slots: the children a send of it began to (node
   * index, -1 for none), most recent first, and when (peer/upload/recipients.ts).
   * Flat typed arrays, made at the node's first upload: at N = 10,000 a list
   * per piece per node was gigabytes of small objects.
   */
  recipients: Int32Array | undefined
  recipientsAt: Float32Array | undefined
  /** Per piece: when a seed's latest send of it began or arrived (upload `RESEND_MS`). */
  began: Map<number, number>
  /** Plans by block of `window` pieces (of their first piece), as the fetcher caches them. */
  plans: Map<number, Plan>
  /** Its latest plan offered only whole holders (the fetcher's `settled`): the reader then goes in order. */
  settled: boolean
  pieceMs: number
  /** Parent node → measured bytes/s. */
  rates: Map<number, number>
  /** Parent node → until when it is skipped. */
  failing: Map<number, number>
  /** Pieces this node was sent to the origin for. */
  assigned: Set<number>
  active: number
  /** How many uploads may run at once, from the rate its sends reached (peer/upload/pace.ts). */
  pace: UploadPace
  queue: Attempt[]
  waits: number
  /** Requests from children being served here. */
  incoming: Set<Attempt>
  /** Requests this node has out to parents. */
  outgoing: Set<Attempt>
  originFlows: Set<number>
  adds: Array<[number, string]>
  fromOrigin: number[]
  verified: boolean
  load: Load | undefined
  lastLoad: string
  flushTimer: Timer | undefined
  lastFlushAt: number
}

const DIGEST = `sha256:${createHash('sha256').update('damselfly fleet simulation blob').digest('hex')}`
const ORIGIN: OriginRef = { registry: 'https://registry.example', repo: 'library/fleet', kind: 'blob' }

/** mulberry32: small, fast, and the same sequence for the same seed. */
export function seededRandom (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** The lower bound on any schedule's finish time (the yardstick), in ms. */
export function lowerBound (config: Pick<FleetConfig, 'blobBytes' | 'nodeUp' | 'nodeDown' | 'seedUp' | 'originUp'>, nodes: number): { tStarMs: number, bounds: FleetResult['bounds'] } {
  const S = config.blobBytes
  const bounds = {
    origin: S / config.originUp * 1000,
    seed: S / config.seedUp * 1000,
    download: S / config.nodeDown * 1000,
    swarm: nodes * S / (config.seedUp + nodes * config.nodeUp) * 1000
  }
  return { tStarMs: Math.max(bounds.origin, bounds.seed, bounds.download, bounds.swarm), bounds }
}

export function simulateFleet (config: FleetConfig): FleetResult {
  const wallStart = performance.now()
  const m = config.peer
  const random = seededRandom(config.seed)
  const S = config.blobBytes
  const pieceSize = choosePieceSize(S)
  const P = pieceCount(S, pieceSize)
  const lat = config.latencyMs
  const cost = config.requestCostMs
  const hex = Array.from({ length: P }, (_, i) => createHash('sha256').update(`piece ${i}`).digest('hex'))
  const lengthOf = (i: number): number => pieceBounds(i, S, pieceSize).length
  const { tStarMs, bounds } = lowerBound(config, config.nodes)

  // The scheduler, composed as scheduler/swarm/index.ts does, on a clock that reads simulated time.
  let now = 0
  const clock = createEventClock(() => now)
  const logger = createLogger({ level: 'silent' })
  const state = createMemoryState({ now: clock.now })
  const trust = createTrustKeeper({ state, logger }, { now: clock.now })
  const scheduling = createScheduling(state, { ...config.scheduling, now: clock.now, random })
  const machine = createSwarmMachine({ logger, state, trust, at: clock.at })
  let logN = 0

  /** What happened, for the report: requests of the scheduler, answers between peers, pauses, origin runs. */
  const counts = { hinted: 0, plans: 0, interest: 0, appoint: 0, announce: 0, digests: 0, attempts: 0, toSeed: 0, hedges: 0, busy: 0, notFound: 0, errors: 0, timeouts: 0, later: 0, rounds: 0, fallbacks: 0, originRuns: 0, inProgressWaits: 0, events: 0 }

  // Nodes: 0 the origin (not a host), 1 the seed, then the peers.
  const late = Math.round(config.nodes * config.late)
  const total = 2 + config.nodes + late
  const up = new Float64Array(total)
  const down = new Float64Array(total)
  up[0] = config.originUp / 1000
  down[0] = 1
  up[1] = config.seedUp / 1000
  down[1] = config.seedDown / 1000
  for (let i = 2; i < total; i++) {
    up[i] = config.nodeUp / 1000
    down[i] = config.nodeDown / 1000
  }
  const net = new Network(total, up, down, config.network === 'max-min')
  const queue = new EventQueue()
  const at = (t: number, fn: () => void): Timer => queue.at(t, fn)
  const after = (ms: number, fn: () => void): Timer => queue.at(now + ms, fn)
  const noop = (): void => {}
  /** A timer that will not run; its closure (and what it holds) is let go at once. */
  const kill = (timer: Timer | undefined): void => {
    if (timer === undefined) return
    timer.dead = true
    timer.fn = noop
  }

  const nodes: Node[] = []
  const byPeer = new Map<string, Node>()
  for (let i = 0; i < total; i++) {
    const peerId = i === 0 ? 'origin' : i === 1 ? 'sim-seed' : `sim-${String(i - 2).padStart(6, '0')}`
    const seed = i === 1
    const node: Node = {
      i,
      peerId,
      seed,
      info: { peerId, addrs: [], hostname: peerId, seed, idc: '', location: '', uploadCapacity: m.uploadConcurrency, version: 'sim' },
      host: undefined,
      joinAt: 0,
      leaveAt: Infinity,
      gone: false,
      doneAt: NaN,
      have: new Uint8Array(i === 0 ? 0 : P),
      held: 0,
      reading: false,
      firstLanded: false,
      lastLandedAt: -Infinity,
      head: 0,
      started: 0,
      underway: 0,
      waiters: new Map(),
      recipients: undefined,
      recipientsAt: undefined,
      began: new Map(),
      plans: new Map(),
      settled: false,
      pieceMs: 200,
      rates: new Map(),
      failing: new Map(),
      assigned: new Set(),
      active: 0,
      pace: new UploadPace({ max: m.uploadConcurrency, min: m.uploadMin > 0 ? m.uploadMin : m.uploadConcurrency }),
      queue: [],
      waits: 0,
      incoming: new Set(),
      outgoing: new Set(),
      originFlows: new Set(),
      adds: [],
      fromOrigin: [],
      verified: false,
      load: undefined,
      lastLoad: '',
      flushTimer: undefined,
      lastFlushAt: -Infinity
    }
    nodes.push(node)
    byPeer.set(peerId, node)
  }
  const peers = nodes.slice(2)
  // Who leaves, who comes late, and when: drawn before anything runs, from the seed.
  const [from, to] = config.churnWindow
  const when = (): number => (from + (to - from) * random()) * tStarMs
  for (let k = 0; k < late; k++) (peers[config.nodes + k] as Node).joinAt = when()
  const starters = peers.slice(0, config.nodes)
  const leavers = Math.round(config.nodes * config.leaving)
  for (let k = 0; k < leavers; k++) {
    // A partial Fisher–Yates: the first `leavers` of a shuffle.
    const j = k + Math.floor(random() * (starters.length - k))
    const a = starters[k] as Node
    starters[k] = starters[j] as Node
    starters[j] = a
  }
  for (let k = 0; k < leavers; k++) (starters[k] as Node).leaveAt = when()

  // ——— The scheduler's side: what scheduler/rpc/index.ts does per request. ———

  let schedulerMs = 0
  function apply (e: SwarmEvent): Outcome {
    counts.events++
    const started = performance.now()
    const outcome = machine.apply({ e, at: now, by: 'sim', n: ++logN }, true)
    schedulerMs += performance.now() - started
    for (const effect of outcome.effects) perform(effect)
    return outcome
  }

  function perform (effect: Effect): void {
    const node = byPeer.get(effect.peer)
    if (node === undefined || effect.command.type !== 'fetch') return
    // The control request reaches the peer; a seed takes the whole blob.
    after(lat + cost, () => { startReading(node) })
  }

  function parents (n: Node, first: number, last: number, exclude: Set<number>): Plan {
    counts.plans++
    const host = n.host as HostRecord
    let task = state.task(DIGEST)
    if (task === undefined || !task.interested.has(host.slot) || task.origin === undefined) {
      counts.interest++
      task = apply({ type: 'interest', peer: n.peerId, digest: DIGEST, size: S, origin: ORIGIN }).task
    }
    if (task === undefined) throw new Error('the simulated task was refused')
    const excluded = new Set<string>()
    for (const x of exclude) if (excluded.size < 256) excluded.add((nodes[x] as Node).peerId)
    const started = performance.now()
    let plan = scheduling.propose(task, host, first, last, excluded, { whole: true, mayAuthor: (h) => !trust.isBarred(h) })
    schedulerMs += performance.now() - started
    const { appointment } = plan
    if (appointment.first.length > 0 || appointment.confirm.length > 0 || appointment.renew !== undefined) {
      counts.appoint++
      const { granted } = apply({ type: 'appoint', peer: n.peerId, digest: DIGEST, appointment })
      plan = withGranted(plan, granted ?? new Map(), host)
    }
    // What the fetcher makes of the answer.
    const sim: SimParent[] = []
    for (const info of plan.parents) {
      const node = byPeer.get(info.peerId)
      if (node === undefined || node === n) continue
      sim.push({
        node,
        complete: info.complete,
        held: info.held === undefined ? undefined : PieceSet.fromBase64(P, info.held),
        fetching: info.fetching === undefined ? undefined : PieceSet.fromBase64(P, info.fetching)
      })
    }
    return { first, last, at: 0, parents: sim, digests: new Set(plan.digests.map(([i]) => i)), assigned: new Set(plan.assigned) }
  }

  // ——— Announcements (peer/swarm/scheduler-client.ts): batched, at least 100 ms apart. ———

  function scheduleFlush (n: Node): void {
    if (n.flushTimer !== undefined || n.gone) return
    n.flushTimer = after(Math.max(m.flushMs, n.lastFlushAt + m.minAnnounceIntervalMs - now), () => { flush(n) })
  }

  function flush (n: Node): void {
    n.flushTimer = undefined
    if (n.gone) return
    const tasks: TaskUpdate[] = []
    if (n.verified) {
      n.verified = false
      n.adds = []
      n.fromOrigin = []
      tasks.push({ digest: DIGEST, size: S, origin: ORIGIN, add: hex.map((h, i): [number, string] => [i, h]), verified: true })
    } else if (n.adds.length > 0) {
      tasks.push({ digest: DIGEST, size: S, origin: ORIGIN, add: n.adds, ...(n.fromOrigin.length > 0 ? { fromOrigin: n.fromOrigin } : {}) })
      n.adds = []
      n.fromOrigin = []
    }
    const load = n.load
    n.load = undefined
    if (tasks.length === 0 && load === undefined) return
    n.lastFlushAt = now
    after(lat + cost, () => {
      if (n.gone || n.host === undefined) return
      counts.announce++
      apply({ type: 'announce', peer: n.peerId, tasks, ...(load === undefined ? {} : { load }) })
    })
  }

  function reportLoad (n: Node): void {
    if (n.gone) return
    const load: Load = { activeUploads: n.active, parents: [...n.rates].map(([p, r]): [string, number] => [(nodes[p] as Node).peerId, Math.round(r)]) }
    const key = JSON.stringify(load)
    if (key !== n.lastLoad) {
      n.lastLoad = key
      n.load = load
      scheduleFlush(n)
    }
    after(m.loadIntervalMs, () => { reportLoad(n) })
  }

  // ——— Pieces landing, and the reader (peer/blobs). ———

  const finishedAt: number[] = []
  /** Peers neither done nor gone (late ones count from the start). */
  let pending = config.nodes + late

  function land (n: Node, i: number, source: 'peer' | 'origin'): void {
    if (n.gone || n.have[i] === 2) return
    n.have[i] = 2
    if (source === 'peer') n.lastLandedAt = now
    n.underway--
    n.held++
    n.adds.push([i, hex[i] as string])
    if (source === 'origin') n.fromOrigin.push(i)
    scheduleFlush(n)
    const waiting = n.waiters.get(i)
    if (waiting !== undefined) {
      n.waiters.delete(i)
      for (const att of waiting) {
        kill(att.waitTimer)
        n.waits--
        if (sendingElsewhere(att)) reply(att, 'busy')
        else slot(att)
      }
    }
    if (n.reading) advance(n)
    if (n.held === P && Number.isNaN(n.doneAt)) {
      n.doneAt = now
      finishedAt.push(now)
      if (!n.seed) pending--
      // The whole blob hashed to its digest: re-announced as verified.
      n.verified = true
      scheduleFlush(n)
    }
  }

  function startReading (n: Node): void {
    if (n.reading || n.gone) return
    n.reading = true
    n.started = 1
    acquire(n, 0, P - 1)
    advance(n)
  }

  function advance (n: Node): void {
    if (!n.firstLanded) {
      if (n.have[0] !== 2) return
      n.firstLanded = true
    }
    while (n.head < P && n.have[n.head] === 2) n.head++
    if (m.lookahead > 0) {
      if (n.head < P && n.have[n.head] === 0) acquire(n, n.head, P - 1)
      const end = Math.min(P, n.head + (n.settled ? m.inflight : m.lookahead))
      while (n.underway < m.inflight) {
        const missing: number[] = []
        for (let j = n.head + 1; j < end; j++) if (n.have[j] === 0) missing.push(j)
        if (missing.length === 0) break
        acquire(n, missing[n.settled ? 0 : Math.floor(random() ** 3 * missing.length)] as number, P - 1)
      }
      return
    }
    const end = Math.min(P, n.head + m.readahead)
    while (n.started < end) {
      acquire(n, n.started, P - 1)
      n.started++
    }
  }

  /** peer/blobs/acquisition.ts: a piece this node does not hold and nobody here is getting. */
  function acquire (n: Node, i: number, lastWanted: number): void {
    if (n.have[i] !== 0 || n.gone) return
    n.have[i] = 1
    n.underway++
    step({ n, i, lastWanted, startedAt: now, round: 0, pauses: 0, exclude: new Set() })
  }

  /** An origin request for pieces first..last (those nobody here is getting), landing one by one. */
  function originRun (n: Node, first: number, limit: number): void {
    let last = first
    while (last < limit && n.have[last + 1] === 0) last++
    for (let j = first + 1; j <= last; j++) {
      n.have[j] = 1
      n.underway++
    }
    counts.originRuns++
    after(lat + cost, () => {
      if (n.gone) return
      const next = (j: number): void => {
        const f = net.start(0, n.i, lengthOf(j), () => {
          n.originFlows.delete(f)
          after(lat, () => { land(n, j, 'origin') })
          if (j < last) next(j + 1)
        })
        n.originFlows.add(f)
      }
      next(first)
    })
  }

  // ——— The fetcher (peer/swarm/fetcher.ts). ———

  interface Op { n: Node, i: number, lastWanted: number, startedAt: number, round: number, pauses: number, exclude: Set<number>, progress?: Map<string, Progress> }

  function dropPlan (n: Node, p: Plan): void {
    const block = Math.floor(p.first / m.window)
    if (n.plans.get(block) === p) n.plans.delete(block)
  }

  function cachedPlan (n: Node, i: number): Plan | undefined {
    for (const from of [i, i - m.window]) {
      if (from < 0) continue
      const p = n.plans.get(Math.floor(from / m.window))
      if (p !== undefined && i >= p.first && i <= p.last && now - p.at <= m.planTtlMs) return p
    }
    return undefined
  }

  function step (op: Op): void {
    const { n, i } = op
    if (n.gone) return
    const p = op.round === 0 ? cachedPlan(n, i) : undefined
    if (p !== undefined) {
      decide(op, p)
      return
    }
    const last = Math.max(i, Math.min(op.lastWanted, i + m.window - 1))
    const exclude = new Set(op.exclude)
    after(lat + cost, () => {
      if (n.gone) return
      const plan = parents(n, i, last, exclude)
      after(lat, () => {
        if (n.gone) return
        plan.at = now
        for (const a of plan.assigned) n.assigned.add(a)
        n.plans.set(Math.floor(plan.first / m.window), plan)
        n.settled = plan.parents.length > 0 && plan.assigned.size === 0 && plan.parents.every(x => x.complete)
        decide(op, plan)
      })
    })
  }

  function usable (op: Op, x: SimParent): boolean {
    const until = op.n.failing.get(x.node.i)
    return (until === undefined || until <= now) && !op.exclude.has(x.node.i)
  }

  function decide (op: Op, p: Plan): void {
    const { n, i } = op
    if (p.assigned.has(i)) {
      let upTo = i
      while (p.assigned.has(upTo + 1)) upTo++
      originRun(n, i, Math.min(Math.max(i, Math.min(op.lastWanted, upTo)), i + m.maxRunPieces - 1))
      return
    }
    const holders = p.parents.filter(x => usable(op, x) && (x.complete || x.held?.has(i) === true))
    const fetchers = p.parents.filter(x => usable(op, x) && !holders.includes(x) && x.fetching?.has(i) === true)
    if (holders.length + fetchers.length === 0) {
      nextRound(op, p, holders, fetchers)
      return
    }
    race(op, p, holders, fetchers, (won) => {
      if (n.gone) return
      if (won === 'piece') return
      if (won === 'later') {
        counts.later++
        const delay = Math.min(2_000, 100 * 2 ** op.pauses++)
        const pause = delay / 2 + random() * delay
        // The fetcher's own rule (peer/swarm/fetcher.ts `patienceEnd`); without a last piece, from the first look alone.
        const patience = patienceEnd(op.startedAt, m.patienceFromProgress ? n.lastLandedAt : undefined, m.busyPatienceMs) - now
        // Past patience, a first fetcher still taking the blob from the origin is waited for again while it makes
        // progress (peer/swarm/fetcher.ts `stillComing`): going to the origin too would only split its uplink.
        const coming = pause >= patience && m.waitProgressing && fetchers.length > 0 && stillComing(op, fetchers)
        if (pause < patience || (coming && holders.length === 0)) {
          after(pause, () => {
            if (n.gone) return
            dropPlan(n, p)
            step(op)
          })
          return
        }
        // Busy holders are passed over for the next round; a first fetcher still landing pieces is not.
        after(Math.max(0, patience), () => { if (!n.gone) nextRound(op, p, holders, coming ? [] : fetchers) })
        return
      }
      nextRound(op, p, holders, fetchers)
    })
  }

  /** The fetcher's own rule (peer/swarm/fetcher.ts `stillComing`), over this piece's looks so far. */
  function stillComing (op: Op, fetchers: SimParent[]): boolean {
    op.progress ??= new Map()
    return fetcherStillComing(op.progress, fetchers.map(x => ({ info: { peerId: x.node.peerId }, held: x.held })), now, m.inProgressWaitMs)
  }

  function nextRound (op: Op, p: Plan, holders: SimParent[], fetchers: SimParent[]): void {
    const { n, i } = op
    for (const x of p.parents) if (!usable(op, x)) op.exclude.add(x.node.i)
    for (const x of holders) op.exclude.add(x.node.i)
    for (const x of fetchers) op.exclude.add(x.node.i)
    dropPlan(n, p)
    op.round++
    counts.rounds++
    if (op.round >= 3) {
      counts.fallbacks++
      originRun(n, i, i)
      return
    }
    step(op)
  }

  function race (op: Op, p: Plan, holders: SimParent[], fetchers: SimParent[], done: (won: 'piece' | 'later' | undefined) => void): void {
    const { n, i } = op
    const order = holderOrder(i, holders, fetchers, x => x.node.seed)
    let hinted = 0
    const follow = (hints: Node[]): void => {
      for (const c of hints) {
        const parent: SimParent = { node: c, complete: false, held: undefined, fetching: undefined, hinted: true }
        if (hinted >= m.maxHinted || c === n || !usable(op, parent) || order.some(x => x.node === c)) continue
        order.push(parent)
        hinted++
        counts.hinted++
      }
    }
    const live: Attempt[] = []
    let next = 0
    let failed = 0
    let later = 0
    let over = false
    const finish = (won: 'piece' | 'later' | undefined): void => {
      over = true
      for (const att of live) cancel(att)
      done(won)
    }
    const launch = (): void => {
      if (next >= order.length) return
      const parent = order[next++] as SimParent
      const inProgress = !(parent.complete || parent.held?.has(i) === true)
      const launched = now
      if (inProgress) counts.inProgressWaits++
      const att = request(n, parent.node, i, inProgress ? m.inProgressWaitMs : 0, () => {
        if (over) return
        const verified = (): void => {
          if (n.gone || over) return
          remove(live, att)
          if (!inProgress) {
            const ms = now - launched
            n.pieceMs = n.pieceMs * 0.8 + ms * 0.2
            const rate = lengthOf(i) / Math.max(1, ms) * 1000
            n.rates.set(parent.node.i, (n.rates.get(parent.node.i) ?? rate) * 0.7 + rate * 0.3)
          }
          finish('piece')
          land(n, i, 'peer')
        }
        // The piece was on its way when the plan was made: its digest comes from the scheduler.
        if (p.digests.has(i)) verified()
        else {
          counts.digests++
          after(2 * lat + cost, verified)
        }
      }, (why, hints) => {
        if (over) return
        remove(live, att)
        if (hints !== undefined) follow(hints)
        if (why === 'busy' || (inProgress && why === 'not-found')) later++
        else if (parent.hinted !== true) n.failing.set(parent.node.i, now + m.parentBackoffMs)
        failed++
        if (failed === order.length) finish(later > 0 ? 'later' : undefined)
        else if (failed === next) launch()
      })
      live.push(att)
      if (!inProgress || parent.hinted === true) {
        att.timers.push(after(Math.min(5_000, Math.max(750, n.pieceMs * 4)), () => {
          if (!over && next < order.length && failed < next) {
            counts.hedges++
            launch()
          }
        }))
      }
    }
    launch()
  }

  // ——— Requests between peers: the child's side and the parent's (peer/upload). ———

  function request (child: Node, parent: Node, piece: number, waitMs: number, ok: () => void, fail: (why: Failure, hints?: Node[]) => void): Attempt {
    counts.attempts++
    const att: Attempt = { child, parent, piece, waitMs, state: 'sent', flow: -1, timers: [], waitTimer: undefined, ok, fail }
    if (parent.seed) counts.toSeed++
    child.outgoing.add(att)
    att.timers.push(after(waitMs + Math.max(20_000, lengthOf(piece) / 1024), () => {
      if (att.state === 'done') return
      counts.timeouts++
      cancel(att)
      fail('timeout')
    }))
    after(lat + cost, () => { arrive(att) })
    return att
  }

  /** The child gives up on a request (it won elsewhere, timed out, or left): the parent stops serving it. */
  function cancel (att: Attempt): void {
    if (att.state === 'done') return
    for (const t of att.timers) kill(t)
    att.timers = []
    stopServing(att)
    att.state = 'done'
    att.child.outgoing.delete(att)
    release(att)
  }

  /** A finished request lets go of its callbacks (and the race and plan they hold). */
  function release (att: Attempt): void {
    att.ok = noop
    att.fail = noop
  }

  /** The parent's side of a request ends (the child gave up, or the parent is leaving). */
  function stopServing (att: Attempt): void {
    const p = att.parent
    kill(att.waitTimer)
    if (att.state === 'waiting') {
      p.waiters.get(att.piece)?.delete(att)
      p.waits--
    } else if (att.state === 'queued') {
      remove(p.queue, att)
    } else if (att.state === 'moving') {
      net.now = now
      net.cancel(att.flow)
      p.active--
      p.pace.end()
      pump(p)
    }
    p.incoming.delete(att)
  }

  function arrive (att: Attempt): void {
    if (att.state !== 'sent') return
    const p = att.parent
    const i = att.piece
    if (p.gone) {
      reply(att, 'error')
      return
    }
    p.incoming.add(att)
    if (p.have[i] === 2) {
      if (sendingElsewhere(att)) reply(att, 'busy')
      else slot(att)
      return
    }
    const landing = p.have[i] === 1
    // A seed's job claimed the whole blob; a peer sent to the origin for a piece fetches it when asked.
    const mine = (p.seed && p.reading) || p.assigned.has(i)
    if (att.waitMs === 0 || (!landing && !mine)) {
      reply(att, 'not-found')
      return
    }
    if (p.waits >= m.maxWaits) {
      reply(att, 'busy')
      return
    }
    p.waits++
    att.state = 'waiting'
    let set = p.waiters.get(i)
    if (set === undefined) { set = new Set(); p.waiters.set(i, set) }
    set.add(att)
    att.waitTimer = after(Math.min(att.waitMs, m.maxWaitMs), () => {
      if (att.state !== 'waiting') return
      p.waiters.get(i)?.delete(att)
      p.waits--
      reply(att, 'not-found')
    })
    if (!landing) acquire(p, i, Math.min(P - 1, i + m.maxRunPieces - 1))
  }

  /** peer/upload `onePerPiece`: a seed already sending this piece to another child (for less than `samePieceMs`). */
  function sendingElsewhere (att: Attempt): boolean {
    const p = att.parent
    if (!p.seed || m.samePieceMs <= 0) return false
    const began = p.began.get(att.piece)
    if (began !== undefined && now - began < m.resendMs) return true
    for (const other of p.incoming) {
      if (other !== att && other.piece === att.piece && other.slottedAt !== undefined && now - other.slottedAt < m.samePieceMs && (other.state === 'queued' || other.state === 'moving')) return true
    }
    return false
  }

  function slot (att: Attempt): void {
    const p = att.parent
    att.slottedAt = now
    if (p.active < slots(p, att.piece) && p.queue.length === 0) {
      move(att)
    } else if (p.queue.length >= m.uploadQueue) {
      reply(att, 'busy')
    } else {
      att.state = 'queued'
      p.queue.push(att)
    }
  }

  function move (att: Attempt): void {
    const p = att.parent
    if (m.hints > 0) remember(p, att.piece, att.child)
    if (p.seed && m.samePieceMs > 0) {
      const began = p.began.get(att.piece)
      if (began === undefined || now - began >= m.resendMs) p.began.set(att.piece, now)
    }
    p.active++
    p.pace.begin(now)
    att.state = 'moving'
    net.now = now
    att.flow = net.start(p.i, att.child.i, lengthOf(att.piece), () => {
      // The seed's window runs on from the end of the send, as upload `release` sets it.
      if (p.seed && m.samePieceMs > 0) p.began.set(att.piece, now)
      p.active--
      // The pace hears of a send's bytes as they arrive: the flows here are not cut into chunks.
      p.pace.sent(lengthOf(att.piece), now)
      p.pace.end()
      pump(p)
      att.state = 'replied'
      p.incoming.delete(att)
      after(lat, () => {
        if (att.state === 'done') return
        const ok = att.ok
        settle(att)
        ok()
      })
    })
  }

  function pump (p: Node): void {
    while (p.queue.length > 0 && p.active < slots(p, (p.queue[0] as Attempt).piece)) move(p.queue.shift() as Attempt)
  }

  /** Uploads the parent may run at once for this piece: peer/upload's rule, paced by the rate its sends reached. */
  function slots (p: Node, piece: number): number {
    return m.uploadMin > 0 ? p.pace.limit(lengthOf(piece), now) : m.uploadConcurrency
  }

  function reply (att: Attempt, why: Failure): void {
    att.state = 'replied'
    att.parent.incoming.delete(att)
    if (why === 'busy') counts.busy++
    else if (why === 'not-found') counts.notFound++
    else counts.errors++
    const hints = why === 'busy' && m.hints > 0 ? hintsFor(att) : undefined
    after(lat, () => {
      if (att.state !== 'replied') return
      const fail = att.fail
      settle(att)
      fail(why, hints)
    })
  }

  /** Puts `child` first in the parent's list for the piece (moved up if it was there), the oldest falling off. */
  function remember (p: Node, piece: number, child: Node): void {
    const k = m.hints + 1
    if (p.recipients === undefined) {
      p.recipients = new Int32Array(P * k).fill(-1)
      p.recipientsAt = new Float32Array(P * k)
    }
    const ids = p.recipients
    const at = p.recipientsAt as Float32Array
    const base = piece * k
    let j = base
    while (j < base + k - 1 && ids[j] !== child.i) j++
    for (; j > base; j--) {
      ids[j] = ids[j - 1] as number
      at[j] = at[j - 1] as number
    }
    ids[base] = child.i
    at[base] = now
  }

  /** Children the parent began sending the piece to lately, the asker left out (peer/upload/recipients.ts). */
  function hintsFor (att: Attempt): Node[] {
    const ids = att.parent.recipients
    if (ids === undefined) return []
    const at = att.parent.recipientsAt as Float32Array
    const k = m.hints + 1
    const out: Node[] = []
    for (let j = att.piece * k; j < (att.piece + 1) * k && out.length < m.hints; j++) {
      const c = ids[j] as number
      if (c < 0) break
      if (c !== att.child.i && now - (at[j] as number) < m.hintTtlMs) out.push(nodes[c] as Node)
    }
    return out
  }

  /** The child has the answer: its timers go, and the attempt is let go. */
  function settle (att: Attempt): void {
    for (const t of att.timers) kill(t)
    att.timers = []
    att.state = 'done'
    att.child.outgoing.delete(att)
    release(att)
  }

  // ——— Joining and leaving. ———

  function join (n: Node): void {
    after(lat + cost, () => {
      apply({ type: 'register', host: n.info })
      n.host = state.hostByPeer(n.peerId)
      after(lat, () => {
        after(random() * m.loadIntervalMs, () => { reportLoad(n) })
        if (!n.seed) startReading(n)
      })
    })
  }

  function leave (n: Node): void {
    if (n.gone || !Number.isNaN(n.doneAt)) return
    n.gone = true
    n.reading = false
    pending--
    net.now = now
    for (const att of [...n.outgoing]) cancel(att)
    // The connections drop: every child being served here hears at once.
    for (const att of [...n.incoming]) {
      stopServing(att)
      reply(att, 'error')
    }
    n.waiters.clear()
    for (const f of n.originFlows) net.cancel(f)
    n.originFlows.clear()
    kill(n.flushTimer)
    after(lat, () => { apply({ type: 'leave', peer: n.peerId }) })
  }

  // ——— Run. ———

  join(nodes[1] as Node)
  for (const n of peers) {
    at(n.joinAt, () => { join(n) })
    if (n.leaveAt !== Infinity) at(n.leaveAt, () => { leave(n) })
  }
  const horizon = config.horizon * tStarMs
  let nextLog = 1_000
  let steps = 0
  for (;;) {
    if (pending <= 0) break
    const tq = queue.peek()
    const tf = net.nextAt()
    const t = Math.min(tq, tf)
    if (t === Infinity || t > horizon) break
    now = t
    net.now = t
    if (tf <= tq) net.finishNext()
    else (queue.pop() as Timer).fn()
    steps++
    if (now >= nextLog) {
      nextLog += 1_000
      const live = peers.filter(n => !n.gone && n.host !== undefined)
      const sumHeld = live.reduce((k, n) => k + n.held, 0)
      config.log?.(`t=${(now / 1000).toFixed(0)}s done ${finishedAt.length - 1}/${peers.length} pending ${pending} held ${(sumHeld / Math.max(1, live.length) / P * 100).toFixed(1)}% plans ${counts.plans} busy ${counts.busy} later ${counts.later} fallbacks ${counts.fallbacks} origin ${(net.sent[0] as number / S).toFixed(2)}×S steps ${steps} wall ${((performance.now() - wallStart) / 1000).toFixed(1)}s`)
    }
  }

  const staying = peers.filter(n => !n.gone)
  const times = staying.map(n => Number.isNaN(n.doneAt) ? Infinity : n.doneAt - n.joinAt)
  const sorted = [...times].sort((a, b) => a - b)
  const q = (p: number): number => sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)] as number
  const makespan = Math.max(...staying.map(n => Number.isNaN(n.doneAt) ? now : n.doneAt))
  let peerSent = 0
  for (let i = 2; i < total; i++) peerSent += net.sent[i] as number
  const allSent = peerSent + (net.sent[1] as number)
  const peerCapacity = peers.length * config.nodeUp * makespan / 1000
  return {
    nodes: config.nodes,
    tStarMs,
    bounds,
    times,
    finishedAt: staying.filter(n => !Number.isNaN(n.doneAt)).map(n => n.doneAt).sort((a, b) => a - b),
    slowest: sorted[sorted.length - 1] as number,
    p50: q(0.5),
    p99: q(0.99),
    originRatio: (net.sent[0] as number) / S,
    plans: counts.plans as number,
    plansPerSecond: (counts.plans as number) / (makespan / 1000),
    plansPerNodeSecond: (counts.plans as number) / (makespan / 1000) / peers.length,
    makespanMs: makespan,
    stayed: staying.length,
    left: peers.length - staying.length,
    unfinished: times.filter(t => t === Infinity).length,
    counts: { ...counts, flows: net.started, rerates: net.rerates, steps },
    seedShare: allSent === 0 ? 0 : (net.sent[1] as number) / allSent,
    peerUploadUse: peerSent / peerCapacity,
    toSeed: counts.attempts === 0 ? 0 : counts.toSeed / counts.attempts,
    delivered: staying.reduce((k, n) => k + n.held, 0) / Math.max(1, staying.length * P),
    schedulerMs,
    wallMs: performance.now() - wallStart
  }
}

function remove<T> (list: T[], x: T): void {
  const i = list.indexOf(x)
  if (i !== -1) list.splice(i, 1)
}
