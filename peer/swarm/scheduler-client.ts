import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { backoff, raceSignal, sleep, withDeadline, type AbortOptions } from '../../src/abort.ts'
import { DamselflyError, SchedulerUnavailableError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { createChannel, type Channel } from '../../src/p2p/channel.ts'
import type { P2PNode } from '../../src/p2p/index.ts'
import { AckResponse, RegisterResponse, SCHEDULER_SESSION_PROTOCOL, check, type Fact, type HostInfo, type Load, type OriginRef, type Report, type SchedulerRequest, type TaskUpdate } from '../../src/protocol/messages.ts'
import type { PieceInventory } from '../piece-store/index.ts'
import { createSchedulerTargets, type ResolveAll } from './scheduler-targets.ts'

export interface SchedulerClientComponents {
  logger: Logger
  node: P2PNode
  store: PieceInventory
  hostInfo: () => HostInfo
  /** Everything this peer knows that the swarm may share (tags, public content). */
  facts: () => Fact[]
  /** Where each task can be fetched, as far as this peer knows. */
  originOf: (digest: string) => OriginRef | undefined
  /** Name resolution for scheduler addresses. Default: node:dns `lookup(name, { all: true })`. */
  resolve?: ResolveAll
  /** A number in [0, 1), to pick the first scheduler. Default `Math.random`. */
  random?: () => number
}

export interface SchedulerClientInit {
  /**
   * Scheduler replicas: `host:port` or a multiaddr each, a DNS name standing
   * for every address it resolves to. The peer joins one, starting at a
   * random one, and moves to the next when its session drops or it cannot
   * be reached.
   */
  addresses: string[]
  /**
   * Deadline of one connection attempt while there are other schedulers to
   * move to: a replica that went without a word (its node died) is given up
   * quickly. Default 3 s. With a single address the node's own 10 s applies.
   */
  connectTimeoutMs?: number
  /** Piece announcements are batched this long. Default 20 ms. */
  flushMs?: number
  /**
   * At least this long between two announcements: a peer taking a blob in at
   * 70 MiB/s would otherwise announce every piece on its own, and each costs
   * the scheduler a change through its log. Default 100 ms.
   */
  minAnnounceIntervalMs?: number
  /** Deadline of one request. Default 10 s (long polls add their own wait). */
  requestTimeoutMs?: number
  /**
   * The session is one stream (src/p2p/channel.ts). After this long without
   * a word from the scheduler the peer sends a heartbeat, and a scheduler
   * that says nothing within `heartbeatTimeoutMs` is given up: the connection
   * is closed and the peer moves on. This is how a peer notices a scheduler
   * whose process hangs; one whose host vanished is noticed sooner, by TCP
   * keepalive (src/p2p). Only an idle session is ever silent that long: a
   * peer asking things notices a hung scheduler by its requests' deadlines
   * (the channel ends 30 s past one left unanswered). Each heartbeat costs
   * the scheduler two frames each way through Noise and yamux (yamux answers
   * every data frame with a window update), each its own socket write: about
   * 0.5 ms of its CPU. Idle CPU at 5,000 sessions was 6.5% of a core with a
   * heartbeat every 30 s, 5.7% with one every 60 s; nearly all of it was
   * heartbeats. Default 120 s.
   */
  heartbeatMs?: number
  /** Default 10 s. */
  heartbeatTimeoutMs?: number
  /** Requests in flight on the session at once; more wait for a slot. Default 64. */
  maxInFlight?: number
}

export interface SchedulerClient {
  start: () => void
  /** Resolves once the first attempt to reach the scheduler has succeeded or failed. */
  settled: () => Promise<void>
  stop: () => Promise<void>
  readonly connected: boolean
  /**
   * Resolves true once a session is up: at once when one is, after the move
   * when the session just dropped and another replica is being tried, false
   * when there is nowhere left to try (or `maxMs` passes).
   */
  awaitSession: (options: AbortOptions & { maxMs: number }) => Promise<boolean>
  /** The peer id of the scheduler this peer is in session with, while it is. */
  readonly peerId: string | undefined
  /** One request; throws SchedulerUnavailableError when the scheduler cannot be asked. */
  request: <T extends TSchema>(request: SchedulerRequest, schema: T, options?: AbortOptions & { waitMs?: number }) => Promise<Static<T>>
  queue: (update: TaskUpdate) => void
  /** Announces again what this peer holds of one blob (its table was reset swarm-wide). */
  reannounce: (digest: string) => void
  queueFact: (fact: Fact) => void
  setLoad: (load: Load) => void
  report: (report: Report) => void
}

/** Answers are checked here, against ErrorResponse or the request's own schema. */
const ANY = Type.Unknown()

/** Pieces per announce message when re-sending the whole inventory. */
const INVENTORY_CHUNK_PIECES = 50_000

export function createSchedulerClient (components: SchedulerClientComponents, init: SchedulerClientInit): SchedulerClient {
  const { node, store } = components
  const logger = components.logger.child({ component: 'peer:scheduler-client' })
  const flushMs = init.flushMs ?? 20
  const minAnnounceIntervalMs = init.minAnnounceIntervalMs ?? 100
  let lastFlushAt = 0
  const requestTimeoutMs = init.requestTimeoutMs ?? 10_000
  const connectTimeoutMs = init.connectTimeoutMs ?? 3_000
  const heartbeatMs = init.heartbeatMs ?? 120_000
  const heartbeatTimeoutMs = init.heartbeatTimeoutMs ?? 10_000
  const maxInFlight = init.maxInFlight ?? 64
  const targets = createSchedulerTargets({
    logger,
    ...(components.resolve === undefined ? {} : { resolve: components.resolve }),
    ...(components.random === undefined ? {} : { random: components.random })
  }, { addresses: init.addresses })
  const stopping = new AbortController()
  let schedulerPeer: string | undefined
  /** The session's stream, while there is one. */
  let channel: Channel | undefined
  let connected = false
  /** Between losing a session and having tried every other address: a session is likely back soon. */
  let moving = false
  const sessionWaiters = new Set<() => void>()
  const settleWaiters = (): void => {
    for (const wake of sessionWaiters) wake()
    sessionWaiters.clear()
  }
  let disconnected: (() => void) | undefined
  let loop: Promise<void> | undefined
  /** Pending per-task changes, merged until the next flush. */
  const pending = new Map<string, TaskUpdate>()
  let pendingFacts: Fact[] = []
  let pendingLoad: Load | undefined
  /** The last load set, sent again to a scheduler that (re)registers us: the peer sends only changes. */
  let latestLoad: Load | undefined
  let timer: NodeJS.Timeout | undefined
  const firstAttempt = Promise.withResolvers<void>()

  node.onDisconnect((peerId) => {
    if (peerId === schedulerPeer) disconnected?.()
  })

  async function request<T extends TSchema> (req: SchedulerRequest, schema: T, options: AbortOptions & { waitMs?: number } = {}): Promise<Static<T>> {
    if (!connected || channel === undefined) throw new SchedulerUnavailableError('not connected to the scheduler')
    return rawRequest(channel, req, schema, options)
  }

  async function rawRequest<T extends TSchema> (on: Channel, req: SchedulerRequest, schema: T, options: AbortOptions & { waitMs?: number } = {}): Promise<Static<T>> {
    let response: unknown
    try {
      response = await on.request(req, ANY, `scheduler ${req.type}`, { signal: options.signal === undefined ? stopping.signal : AbortSignal.any([stopping.signal, options.signal]), timeoutMs: requestTimeoutMs + (options.waitMs ?? 0) })
    } catch (err) {
      if (options.signal?.aborted === true) throw err
      throw new SchedulerUnavailableError(`scheduler ${req.type} failed: ${(err as Error).message}`, { cause: err })
    }
    if ((response as { ok?: unknown } | null)?.ok === false) {
      const r = response as { code?: unknown, message?: unknown }
      const code = typeof r.code === 'string' && r.code.length > 0 && r.code.length <= 64 ? r.code : 'DF_ERR_SCHEDULER'
      // The scheduler lost us (it restarted): start a new session.
      if (code === 'DF_ERR_NOT_REGISTERED' && on === channel) disconnected?.()
      throw new DamselflyError(code, typeof r.message === 'string' ? r.message.slice(0, 1024) : 'scheduler error')
    }
    try {
      return check(schema, response, `scheduler ${req.type} response`)
    } catch (err) {
      throw new SchedulerUnavailableError(`scheduler ${req.type} failed: ${(err as Error).message}`, { cause: err })
    }
  }

  /**
   * The session's stream: every request and answer, and the heartbeat. When
   * it ends the session is over; when it ended because the scheduler went
   * quiet, the connection goes too (TCP has not noticed, or the next
   * attempt would find it open and use it again).
   */
  async function openChannel (peerId: string, signal: AbortSignal): Promise<Channel> {
    const stream = await node.openStream({ peerId, addrs: [] }, SCHEDULER_SESSION_PROTOCOL, { signal })
    const opened = createChannel(stream, { name: 'the scheduler session', heartbeatMs, heartbeatTimeoutMs, maxOutgoing: maxInFlight })
    void opened.ended.then((err) => {
      if (opened !== channel) return
      if (err !== undefined && !stopping.signal.aborted) {
        logger.warn({ scheduler: peerId, err: err.message }, 'the scheduler session ended')
        if ((err as DamselflyError).code === 'DF_ERR_TIMEOUT') void node.hangUp(peerId)
      }
      disconnected?.()
    })
    return opened
  }

  /** Register, then send everything held, in chunks. */
  async function session (on: Channel, peerId: string, address: string): Promise<void> {
    await rawRequest(on, { type: 'register', host: components.hostInfo() }, RegisterResponse)
    // Snapshot and clear the queue in one go: what lands from now on is queued again.
    pending.clear()
    const facts = components.facts()
    pendingFacts = []
    let chunk: TaskUpdate[] = []
    let pieces = 0
    const send = async (): Promise<void> => {
      if (chunk.length === 0) return
      const tasks = chunk
      chunk = []
      pieces = 0
      await rawRequest(on, { type: 'announce', tasks }, AckResponse)
    }
    const inventory: TaskUpdate[] = []
    for (const blob of store.list()) {
      const update = holdings(blob.digest)
      if (update !== undefined) inventory.push(update)
    }
    for (const update of inventory) {
      chunk.push(update)
      pieces += update.add?.length ?? 0
      if (pieces >= INVENTORY_CHUNK_PIECES) await send()
    }
    await send()
    for (let i = 0; i < facts.length; i += 1000) await rawRequest(on, { type: 'announce', tasks: [], facts: facts.slice(i, i + 1000) }, AckResponse)
    pendingLoad ??= latestLoad
    logger.info({ blobs: inventory.length, facts: facts.length, scheduler: peerId, address }, 'registered with the scheduler')
  }

  /** What this peer holds of one blob, as an announcement. */
  function holdings (digest: string): TaskUpdate | undefined {
    const blob = store.info(digest)
    if (blob === undefined) return undefined
    const add: Array<[number, string]> = []
    for (const i of store.heldPieces(digest)) {
      const hex = store.pieceDigest(digest, i)
      if (hex !== undefined) add.push([i, hex])
    }
    if (add.length === 0) return undefined
    const origin = components.originOf(digest)
    return { digest, size: blob.size, ...(blob.mediaType === undefined ? {} : { mediaType: blob.mediaType }), ...(origin === undefined ? {} : { origin }), add, ...(blob.verified ? { verified: true } : {}) }
  }

  /**
   * One session at a time, with whichever scheduler `targets` names next.
   * After a session ends or an attempt fails the peer moves on at once (a
   * quarter to half a second, so that a replica's peers do not all land on
   * the next one in the same instant); only when every address has failed
   * in a row does it back off, up to 5 s. With one address that is exactly
   * the old single-scheduler behaviour.
   */
  async function run (): Promise<void> {
    let failures = 0
    let rounds = 0
    let lastError: unknown
    while (!stopping.signal.aborted) {
      let count = 1
      let address: string | undefined
      try {
        ({ address, count } = await targets.next({ signal: stopping.signal }))
        const signal = count > 1 ? withDeadline(stopping.signal, connectTimeoutMs, `connect to the scheduler at ${address}`) : stopping.signal
        const peerId = await node.connect({ addr: address }, { signal })
        const gone = new Promise<void>(resolve => { disconnected = resolve })
        schedulerPeer = peerId
        channel = await openChannel(peerId, signal)
        await session(channel, peerId, address)
        connected = true
        moving = false
        settleWaiters()
        failures = 0
        rounds = 0
        firstAttempt.resolve()
        schedule()
        await raceSignal(gone, stopping.signal).catch(() => {})
        moving = count > 1
        if (!stopping.signal.aborted) logger.warn({ address, scheduler: peerId }, count > 1 ? 'lost the scheduler; moving to the next one' : 'lost the scheduler; serving what we hold and falling back to the origin until it is back')
      } catch (err) {
        if (stopping.signal.aborted) break
        failures++
        lastError = err
        logger.debug({ err: (err as Error).message, address }, 'scheduler attempt failed')
      } finally {
        connected = false
        disconnected = undefined
        const ended = channel
        channel = undefined
        ended?.abort(new SchedulerUnavailableError('the session ended'))
      }
      let delayMs = 250 + backoff(0, 250, 5_000)
      if (failures >= count) {
        // Every address failed since the last session: until one is back, peers fall back to the origin.
        if (rounds === 0 || rounds % 20 === 0) logger.warn({ err: (lastError as Error | undefined)?.message, addresses: init.addresses }, count > 1 ? 'no scheduler reachable; retrying' : 'scheduler unreachable; retrying')
        delayMs = 250 + backoff(Math.min(rounds, 6), 250, 5_000)
        moving = false
        settleWaiters()
        failures = 0
        rounds++
        firstAttempt.resolve()
      }
      await sleep(delayMs, { signal: stopping.signal }).catch(() => {})
    }
    firstAttempt.resolve()
  }

  function schedule (): void {
    if (timer !== undefined || !connected) return
    if (pending.size === 0 && pendingFacts.length === 0 && pendingLoad === undefined) return
    timer = setTimeout(() => {
      timer = undefined
      void flush()
    }, Math.max(flushMs, lastFlushAt + minAnnounceIntervalMs - Date.now()))
    timer.unref()
  }

  async function flush (): Promise<void> {
    if (!connected) return
    const tasks = [...pending.values()]
    const facts = pendingFacts
    const load = pendingLoad
    pending.clear()
    pendingFacts = []
    pendingLoad = undefined
    if (tasks.length === 0 && facts.length === 0 && load === undefined) return
    lastFlushAt = Date.now()
    try {
      await request({ type: 'announce', tasks, ...(facts.length > 0 ? { facts } : {}), ...(load === undefined ? {} : { load }) }, AckResponse)
    } catch (err) {
      // A reconnect re-sends the whole inventory, so nothing is lost by dropping this batch.
      logger.debug({ err: (err as Error).message }, 'announce failed')
    }
    schedule()
  }

  return {
    get connected () { return connected },
    async awaitSession ({ maxMs, signal }) {
      if (connected) return true
      if (!moving || maxMs <= 0 || signal?.aborted === true) return false
      await new Promise<void>((resolve) => {
        const done = (): void => {
          clearTimeout(timer)
          signal?.removeEventListener('abort', done)
          sessionWaiters.delete(done)
          resolve()
        }
        const timer = setTimeout(done, maxMs)
        signal?.addEventListener('abort', done, { once: true })
        sessionWaiters.add(done)
      })
      return connected
    },
    get peerId () { return connected ? schedulerPeer : undefined },
    request,
    start () {
      loop ??= run()
    },
    settled: async () => { await firstAttempt.promise },
    async stop () {
      if (timer !== undefined) clearTimeout(timer)
      if (connected) {
        await flush().catch(() => {})
        await request({ type: 'leave' }, AckResponse, { signal: AbortSignal.timeout(1_000) }).catch(() => {})
        await channel?.close({ signal: AbortSignal.timeout(1_000) }).catch(() => {})
      }
      stopping.abort()
      moving = false
      settleWaiters()
      firstAttempt.resolve()
      disconnected?.()
      await loop
    },
    queue (update) {
      const existing = pending.get(update.digest)
      if (existing === undefined) {
        pending.set(update.digest, { ...update, ...(update.add === undefined ? {} : { add: [...update.add] }), ...(update.fromOrigin === undefined ? {} : { fromOrigin: [...update.fromOrigin] }), ...(Array.isArray(update.remove) ? { remove: [...update.remove] } : {}) })
      } else {
        if (update.remove === true) {
          existing.remove = true
          existing.add = []
          delete existing.fromOrigin
          delete existing.verified
        } else if (update.remove !== undefined) {
          const removed = new Set(update.remove)
          if (existing.add !== undefined) existing.add = existing.add.filter(([i]) => !removed.has(i))
          if (existing.remove !== true) existing.remove = [...(existing.remove ?? []), ...update.remove]
        }
        if (update.add !== undefined) {
          // One entry per piece (the latest): a whole re-announcement is checked against the piece count.
          const byIndex = new Map(existing.add ?? [])
          for (const [i, hex] of update.add) byIndex.set(i, hex)
          existing.add = [...byIndex]
          if (Array.isArray(existing.remove)) {
            const added = new Set(update.add.map(([i]) => i))
            existing.remove = existing.remove.filter(i => !added.has(i))
          }
        }
        if (update.fromOrigin !== undefined) existing.fromOrigin = [...(existing.fromOrigin ?? []), ...update.fromOrigin]
        if (update.verified === true) existing.verified = true
        if (update.origin !== undefined) existing.origin = update.origin
        if (update.mediaType !== undefined) existing.mediaType = update.mediaType
      }
      schedule()
    },
    reannounce (digest) {
      const update = holdings(digest)
      if (update !== undefined) this.queue(update)
    },
    queueFact (fact) {
      if (pendingFacts.length < 10_000) pendingFacts.push(fact)
      schedule()
    },
    setLoad (load) {
      pendingLoad = load
      latestLoad = load
      schedule()
    },
    report (r) {
      void request({ type: 'report', report: r }, AckResponse).catch((err: unknown) => {
        logger.debug({ err: (err as Error).message }, 'report failed')
      })
    }
  }
}
