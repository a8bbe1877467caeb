import { randomUUID } from 'node:crypto'
import { withDeadline, type AbortOptions } from '../../src/abort.ts'
import { ClosedError, DamselflyError, ProtocolError, StateUnavailableError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, Gauge, Histogram, type Registry } from '../../src/metrics.ts'
import { createChannel, type Channel } from '../../src/p2p/channel.ts'
import { messages, call, type P2PNode } from '../../src/p2p/index.ts'
import { choosePieceSize, pieceCount } from '../../src/pieces.ts'
import {
  CONTROL_PROTOCOL, ControlResponse, SCHEDULER_PROTOCOL, SCHEDULER_SESSION_PROTOCOL, SchedulerRequest, check,
  type ControlCommand, type ErrorResponse, type Fact, type ParentsResponse
} from '../../src/protocol/messages.ts'
import { withGranted, type Scheduling } from '../scheduling/index.ts'
import type { HostRecord, SwarmState } from '../state/index.ts'
import type { Effect, SwarmEvent } from '../swarm/events.ts'
import type { SwarmLog } from '../swarm/log.ts'
import type { SwarmMachine } from '../swarm/machine.ts'
import type { TrustKeeper } from '../swarm/trust.ts'

export interface SchedulerServiceInit {
  /**
   * A session stream that carries nothing (no request, no heartbeat) this
   * long is over, and its connection is closed: the peer went away without
   * a word. Peers send a heartbeat after 120 s without one. Default 200 s.
   */
  sessionIdleTimeoutMs?: number
  /** Requests of one session handled at once; past it the session is not read until one is done. Default 128. */
  maxInFlightPerSession?: number
}

export interface SchedulerServiceComponents {
  logger: Logger
  node: P2PNode
  state: SwarmState
  machine: SwarmMachine
  log: SwarmLog
  scheduling: Scheduling
  trust: TrustKeeper
  metrics?: Registry | undefined
}

export interface SchedulerService {
  start: () => Promise<void>
  stop: () => Promise<void>
  readonly id: string
  /** Sends a command to a peer and waits for its answer. */
  control: (peerId: string, command: ControlCommand, options?: AbortOptions) => Promise<ControlResponse>
  /** Handles one request as if it came over the wire (the benchmarks drive the scheduler this way). */
  handle: (peerId: string, request: SchedulerRequest) => Promise<unknown>
}

const CONTROL_DEADLINE_MS = 30_000
/** Pieces a plan sends a peer to the origin for while the replicas' shared state is away. */
const ORIGIN_RUN_WHILE_STATE_AWAY = 4

/**
 * The scheduler's side of the peer protocol: one handler per message type,
 * each request on its own stream with its own deadline. What changes the
 * swarm goes through the log (every replica applies it); what only reads it
 * — most plans, digests, facts — is answered from this replica's copy.
 */
export function createSchedulerService (components: SchedulerServiceComponents, init: SchedulerServiceInit = {}): SchedulerService {
  const { node, state, machine, log, scheduling, trust } = components
  const logger = components.logger.child({ component: 'scheduler:rpc' })
  const id = log.replica === '' ? randomUUID() : log.replica
  const shutdown = new AbortController()
  /** Open session streams, ended at stop. */
  const sessions = new Set<Channel>()
  const registers = components.metrics === undefined ? undefined : [components.metrics]
  const m = registers === undefined
    ? undefined
    : {
        requests: new Counter({ name: 'damselfly_scheduler_requests_total', help: 'Peer requests, by type and outcome', labelNames: ['type', 'outcome'], registers }),
        selection: new Histogram({ name: 'damselfly_scheduler_parent_selection_seconds', help: 'Time to answer a parents request', buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05], registers }),
        toOrigin: new Counter({ name: 'damselfly_scheduler_state_unavailable_plans_total', help: 'Plans answered "go to the origin" because the shared state could not be changed', registers }),
        hosts: new Gauge({ name: 'damselfly_scheduler_hosts', help: 'Connected hosts', labelNames: ['seed'], registers, collect () { let seeds = 0; for (const h of state.hosts()) if (h.info.seed) seeds++; this.set({ seed: 'true' }, seeds); this.set({ seed: 'false' }, state.hostCount - seeds) } }),
        stateHealthy: new Gauge({ name: 'damselfly_scheduler_state_healthy', help: 'Whether the store scheduler replicas share takes changes now (always 1 with the state in memory)', registers, collect () { this.set(log.healthy ? 1 : 0) } }),
        tasks: new Gauge({ name: 'damselfly_scheduler_tasks', help: 'Tasks (blobs) tracked', registers, collect () { this.set(state.taskCount) } })
      }

  function registered (peerId: string): HostRecord {
    const host = state.hostByPeer(peerId)
    if (host === undefined) throw new DamselflyError('DF_ERR_NOT_REGISTERED', 'register before announcing')
    host.lastSeen = Date.now()
    return host
  }

  async function change (event: SwarmEvent): Promise<ReturnType<SwarmMachine['apply']>> {
    return log.append(event, { signal: shutdown.signal })
  }

  /**
   * What an event asks of a peer is done by the replica that peer is in
   * session with (a peer takes commands from its own scheduler only),
   * whichever replica appended the event: every replica applies it, and the
   * host's `via` names exactly one.
   */
  log.onApplied((_envelope, outcome) => {
    for (const effect of outcome.effects) {
      if (state.hostByPeer(effect.peer)?.via === log.replica) void perform(effect)
    }
  })

  async function perform (effect: Effect): Promise<void> {
    try {
      const res = await control(effect.peer, effect.command)
      if (!res.ok) throw new DamselflyError(res.code, res.message)
    } catch (err) {
      if (shutdown.signal.aborted) return
      logger.warn({ peer: effect.peer, what: effect.what, err: (err as Error).message }, 'a peer did not do what the scheduler asked')
      if (effect.onFail !== undefined) await change(effect.onFail).catch(() => {})
    }
  }

  /** One request from a peer, answered: errors become error responses, as the peer expects them. */
  async function answer (peerId: string, body: unknown, signal: AbortSignal): Promise<unknown> {
    let type = 'invalid'
    try {
      const request = check(SchedulerRequest, body, 'scheduler request')
      type = request.type
      const response = await handle(peerId, request, signal)
      m?.requests.inc({ type, outcome: 'ok' })
      return response
    } catch (err) {
      m?.requests.inc({ type, outcome: 'error' })
      const e = err as DamselflyError
      if (!(err instanceof DamselflyError)) logger.error({ err, type }, 'scheduler request failed')
      return { ok: false, code: typeof e.code === 'string' ? e.code : 'DF_ERR_INTERNAL', message: String(e.message).slice(0, 1000) } satisfies ErrorResponse
    }
  }

  async function handle (peerId: string, request: SchedulerRequest, signal: AbortSignal = shutdown.signal): Promise<unknown> {
    switch (request.type) {
      case 'register': {
        if (request.host.peerId !== peerId) throw new ProtocolError('a peer registers as itself')
        const { existed } = await change({ type: 'register', host: request.host })
        logger.info({ peer: peerId, hostname: request.host.hostname, seed: request.host.seed }, existed === true ? 'host re-registered' : 'host joined')
        return { ok: true, schedulerId: id }
      }
      case 'announce': {
        registered(peerId)
        await change({ type: 'announce', peer: peerId, tasks: request.tasks, facts: request.facts, load: request.load })
        return { ok: true }
      }
      case 'parents': {
        const started = performance.now()
        const host = registered(peerId)
        let task = state.task(request.digest)
        try {
          // The first time a host asks about a task: every replica learns the task and that the host wants it.
          if (task === undefined || !task.interested.has(host.slot) || (request.origin !== undefined && task.origin === undefined)) {
            task = (await change({ type: 'interest', peer: peerId, digest: request.digest, size: request.size, origin: request.origin })).task
          }
        } catch (err) {
          if (!(err instanceof StateUnavailableError)) throw err
          return toOrigin(request.size, request.first, request.last, err)
        }
        if (task === undefined || task.size !== request.size) throw new ProtocolError(`size ${request.size} contradicts what the swarm knows of ${request.digest}`)
        if (request.first > request.last || request.first >= Math.max(1, task.pieceCount)) throw new ProtocolError('empty piece window')
        let plan = scheduling.propose(task, host, request.first, request.last, new Set(request.exclude ?? []), { whole: request.whole ?? true, mayAuthor: (h) => !trust.isBarred(h) })
        const { appointment } = plan
        if (appointment.first.length > 0 || appointment.confirm.length > 0 || appointment.renew !== undefined) {
          try {
            const { granted } = await change({ type: 'appoint', peer: peerId, digest: task.digest, appointment })
            plan = withGranted(plan, granted ?? new Map(), host)
          } catch (err) {
            if (!(err instanceof StateUnavailableError)) throw err
            return toOrigin(request.size, request.first, request.last, err)
          }
        }
        m?.selection.observe((performance.now() - started) / 1000)
        const response: ParentsResponse = { ok: true, pieceSize: task.pieceSize, pieceCount: task.pieceCount, parents: plan.parents, digests: plan.digests, assigned: plan.assigned, ...(plan.provisional.length > 0 ? { provisional: plan.provisional } : {}) }
        return response
      }
      case 'digests': {
        registered(peerId)
        await machine.waitForDigests(request.digest, request.pieces, request.waitMs, signal === shutdown.signal ? signal : AbortSignal.any([shutdown.signal, signal]))
        const task = state.task(request.digest)
        if (task === undefined) return { ok: true, digests: [] }
        const known = request.pieces.filter(i => task.known.has(i))
        const unconfirmed = known.filter(i => !task.confirmed.has(i))
        return { ok: true, digests: known.map(i => [i, task.digests.toString('hex', i * 32, i * 32 + 32)]), ...(unconfirmed.length > 0 ? { provisional: unconfirmed } : {}) }
      }
      case 'report': {
        registered(peerId)
        await change({ type: 'report', peer: peerId, report: request.report })
        return { ok: true }
      }
      case 'lookup-tag': {
        const fact = state.tagFact(request.registry, request.repo, request.tag)
        return fact === undefined ? { ok: true } : { ok: true, fact }
      }
      case 'lookup-public': {
        const fact: Fact | undefined = state.publicFact(request.registry, request.repo, request.digest)
        return fact === undefined ? { ok: true } : { ok: true, fact }
      }
      case 'leave': {
        await change({ type: 'leave', peer: peerId })
        return { ok: true }
      }
    }
  }

  /**
   * The swarm's state cannot change (the shared store is away): the window
   * is the requester's to fetch from the origin, at once, rather than a plan
   * that waits on a store that may not come back soon.
   */
  function toOrigin (size: number, first: number, last: number, err: Error): ParentsResponse {
    m?.toOrigin.inc()
    logger.debug({ err: err.message }, 'plan answered "go to the origin"')
    const pieceSize = choosePieceSize(size)
    const count = pieceCount(size, pieceSize)
    // A few pieces at a time: the store may be back for the next ask, and a whole window taken
    // from the origin would keep coming from there long after it is.
    const assigned: number[] = []
    for (let i = first; i <= Math.min(last, count - 1, first + ORIGIN_RUN_WHILE_STATE_AWAY - 1); i++) assigned.push(i)
    return { ok: true, pieceSize, pieceCount: count, parents: [], digests: [], assigned }
  }

  async function control (peerId: string, command: ControlCommand, options: AbortOptions = {}): Promise<ControlResponse> {
    const host = state.hostByPeer(peerId)
    const signal = withDeadline(AbortSignal.any([shutdown.signal, ...(options.signal === undefined ? [] : [options.signal])]), command.type === 'preheat' ? 6 * 3_600_000 : CONTROL_DEADLINE_MS, `control ${command.type}`)
    const stream = await node.openStream({ peerId, addrs: host?.info.addrs ?? [] }, CONTROL_PROTOCOL, { signal })
    return call(stream, command, ControlResponse, 'control response', { signal })
  }

  return {
    id,
    control,
    handle,
    async start () {
      // A session: one stream for as long as the peer is with this replica.
      await node.handle(SCHEDULER_SESSION_PROTOCOL, async (stream, remotePeer) => {
        if (shutdown.signal.aborted) throw new ClosedError('the scheduler')
        const channel = createChannel(stream, {
          name: `the session of ${remotePeer}`,
          idleTimeoutMs: init.sessionIdleTimeoutMs ?? 200_000,
          maxIncoming: init.maxInFlightPerSession ?? 128,
          onRequest: async (body, { signal }) => answer(remotePeer, body, signal)
        })
        sessions.add(channel)
        void channel.ended.then((err) => {
          sessions.delete(channel)
          if (err === undefined || shutdown.signal.aborted) return
          logger.info({ peer: remotePeer, err: err.message }, 'a session ended')
          // Silent past the deadline: the peer is gone (or stuck); its connection goes, and with it the host.
          if ((err as DamselflyError).code === 'DF_ERR_TIMEOUT') void node.hangUp(remotePeer)
        })
      }, { maxInboundStreams: 4, maxOutboundStreams: 4 })
      // One request per stream: peers from before the session stream, and tools.
      await node.handle(SCHEDULER_PROTOCOL, async (stream, remotePeer) => {
        const signal = AbortSignal.any([shutdown.signal, AbortSignal.timeout(125_000)])
        const io = messages(stream)
        const request = await io.read(SchedulerRequest, 'scheduler request', { signal })
        const response = await answer(remotePeer, request, shutdown.signal)
        await io.write(response, { signal })
        await stream.close({ signal }).catch(() => {})
      }, { maxInboundStreams: 4096, maxOutboundStreams: 1024 })
      node.onDisconnect((peerId) => {
        const host = state.hostByPeer(peerId)
        // A session with this replica ended; a host that moved to another replica is not gone.
        if (host === undefined || host.via !== log.replica) return
        void change({ type: 'leave', peer: peerId, via: log.replica }).then(({ left }) => {
          if (left !== undefined) logger.info({ peer: peerId, hostname: left.info.hostname }, 'host left')
        }, () => {})
      })
      log.onResync(() => {
        // Peers connected here start new sessions, and announce everything they hold again.
        for (const host of [...state.hosts()]) if (host.via === log.replica) void node.hangUp(host.info.peerId).catch(() => {})
      })
    },
    async stop () {
      shutdown.abort()
      for (const channel of [...sessions]) channel.abort(new ClosedError('the scheduler'))
    }
  }
}
