import { randomUUID } from 'node:crypto'
import { withDeadline, type AbortOptions } from '../../src/abort.ts'
import { DamselflyError, ProtocolError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, Gauge, Histogram, type Registry } from '../../src/metrics.ts'
import { messages, call, type P2PNode } from '../../src/p2p/index.ts'
import {
  CONTROL_PROTOCOL, ControlResponse, SCHEDULER_PROTOCOL, SchedulerRequest,
  type ControlCommand, type ErrorResponse, type Fact, type ParentsResponse, type Report
} from '../../src/protocol/messages.ts'
import { createScheduling, type SchedulingInit } from '../scheduling/index.ts'
import { isCertified, releaseAssignments, type HostRecord, type SwarmState, type TaskRecord } from '../state/index.ts'
import { createTrustKeeper } from './trust.ts'

export interface SchedulerServiceComponents {
  logger: Logger
  node: P2PNode
  state: SwarmState
  metrics?: Registry | undefined
}

export interface SchedulerServiceInit extends SchedulingInit {
  /** How long a parent that sent bad bytes is kept out of parent lists. Default 10 min. */
  barMs?: number
}

export interface SchedulerService {
  start: () => Promise<void>
  stop: () => Promise<void>
  readonly id: string
  /** Sends a command to a connected peer and waits for its answer. */
  control: (peerId: string, command: ControlCommand, options?: AbortOptions) => Promise<ControlResponse>
  /** Handles one request as if it came over the wire (the benchmarks drive the scheduler this way). */
  handle: (peerId: string, request: SchedulerRequest) => Promise<unknown>
}

interface DigestWaiter {
  pieces: number[]
  resolve: () => void
}

const CONTROL_DEADLINE_MS = 30_000
/** Requesters remembered per task, to be told when its table is dropped; past this, only holders are. */
const MAX_INTERESTED = 4096

/**
 * The scheduler's side of the peer protocol: one handler per message type,
 * each request on its own stream with its own deadline.
 */
export function createSchedulerService (components: SchedulerServiceComponents, init: SchedulerServiceInit = {}): SchedulerService {
  const { node, state } = components
  const logger = components.logger.child({ component: 'scheduler:rpc' })
  const barMs = init.barMs ?? 600_000
  const scheduling = createScheduling(state, init)
  const trust = createTrustKeeper({ state, logger }, { barMs })
  const waiters = new Map<string, Set<DigestWaiter>>()
  const id = randomUUID()
  const shutdown = new AbortController()
  const registers = components.metrics === undefined ? undefined : [components.metrics]
  const m = registers === undefined
    ? undefined
    : {
        requests: new Counter({ name: 'damselfly_scheduler_requests_total', help: 'Peer requests, by type and outcome', labelNames: ['type', 'outcome'], registers }),
        selection: new Histogram({ name: 'damselfly_scheduler_parent_selection_seconds', help: 'Time to answer a parents request', buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05], registers }),
        barred: new Counter({ name: 'damselfly_scheduler_parents_barred_total', help: 'Parents barred after sending bad pieces', registers }),
        tablesDropped: new Counter({ name: 'damselfly_scheduler_tables_dropped_total', help: 'Provisional piece tables reset after a peer reported them wrong', registers }),
        disputesSettled: new Counter({ name: 'damselfly_scheduler_disputes_settled_total', help: 'Reports that a table was wrong, settled by independent fetches', labelNames: ['liar'], registers }),
        hosts: new Gauge({ name: 'damselfly_scheduler_hosts', help: 'Connected hosts', labelNames: ['seed'], registers, collect () { let seeds = 0; for (const h of state.hosts()) if (h.info.seed) seeds++; this.set({ seed: 'true' }, seeds); this.set({ seed: 'false' }, state.hostCount - seeds) } }),
        tasks: new Gauge({ name: 'damselfly_scheduler_tasks', help: 'Tasks (blobs) tracked', registers, collect () { this.set(state.taskCount) } })
      }

  function wake (digest: string): void {
    const set = waiters.get(digest)
    const task = state.task(digest)
    if (set === undefined) return
    for (const w of [...set]) {
      if (task === undefined || w.pieces.every(i => task.known.has(i))) {
        set.delete(w)
        w.resolve()
      }
    }
    if (set.size === 0) waiters.delete(digest)
  }

  function registered (peerId: string): HostRecord {
    const host = state.hostByPeer(peerId)
    if (host === undefined) throw new DamselflyError('DF_ERR_NOT_REGISTERED', 'register before announcing')
    host.lastSeen = Date.now()
    return host
  }

  async function startSeed (seed: HostRecord, task: TaskRecord): Promise<void> {
    if (task.origin === undefined) return
    try {
      const res = await control(seed.info.peerId, { type: 'fetch', digest: task.digest, size: task.size, ...(task.mediaType === undefined ? {} : { mediaType: task.mediaType }), origin: task.origin })
      if (!res.ok) throw new DamselflyError(res.code, res.message)
    } catch (err) {
      logger.warn({ seed: seed.info.peerId, digest: task.digest, err: (err as Error).message }, 'seed could not take the task; requesters will fetch it themselves')
      seedFailed(seed, task)
    }
  }

  function seedFailed (seed: HostRecord, task: TaskRecord): void {
    task.seedFailed = true
    if (task.assignee === undefined) return
    for (let i = 0; i < task.pieceCount; i++) if (task.assignee[i] === seed.slot + 1) task.assignee[i] = 0
  }

  async function report (host: HostRecord, r: Report): Promise<void> {
    // A barred host's word counts for nothing.
    if (trust.isBarred(host)) return
    switch (r.kind) {
      case 'bad-piece': {
        const parent = state.hostByPeer(r.parent)
        if (parent === undefined || parent === host) return
        if (trust.badPiece(host, parent)) {
          state.dropHolding(parent, r.digest, r.piece)
          m?.barred.inc()
          logger.warn({ parent: r.parent, reporter: host.info.peerId, digest: r.digest, piece: r.piece }, 'parent sent pieces that failed verification to more than one child; barred')
        }
        return
      }
      case 'blob-mismatch': {
        disputed(host, r)
        return
      }
      case 'origin-failed': {
        const task = state.task(r.digest)
        if (task === undefined) return
        if (host.info.seed) {
          seedFailed(host, task)
          return
        }
        releaseAssignments(task, host.slot)
      }
    }
  }

  /** `host` says (or its origin bytes show) that a task's table is wrong. */
  function disputed (host: HostRecord, report: { digest: string, piece?: number | undefined, sha256?: string | undefined, table?: string | undefined }): void {
    const { digest, piece } = report
    const outcome = trust.mismatch(host, report)
    if (outcome.action === 'ignored') {
      logger.warn({ digest, reporter: host.info.peerId, piece, why: outcome.why }, 'a report that a piece table is wrong was not acted on')
      return
    }
    m?.tablesDropped.inc()
    logger.error({ digest, reporter: host.info.peerId, piece, authors: outcome.authors, holders: outcome.holders.length }, 'a provisional piece table was reported wrong: reset everywhere, its authors barred until independent fetches settle who lied')
    for (const holder of outcome.holders) {
      if (holder === host) continue
      void control(holder.info.peerId, { type: 'evict', digest }).catch(() => {})
    }
    wake(digest)
  }

  /**
   * A table every piece of which is known but only its authors vouch for:
   * a seed that did not write it takes a copy from the swarm, and its whole-
   * digest check certifies the table for range reads everywhere.
   */
  function askVerifier (task: TaskRecord): void {
    if (task.verifierAsked || !task.known.complete || isCertified(task) || task.origin === undefined) return
    const t = Date.now()
    let best: HostRecord | undefined
    for (const host of state.hosts()) {
      if (!host.info.seed || host.barredUntil > t || task.complete.has(host.slot)) continue
      if (task.author.includes(host.slot + 1)) continue
      if (best === undefined || host.activeUploads < best.activeUploads) best = host
    }
    if (best === undefined) return
    task.verifierAsked = true
    const verifier = best
    void control(verifier.info.peerId, { type: 'fetch', digest: task.digest, size: task.size, ...(task.mediaType === undefined ? {} : { mediaType: task.mediaType }), origin: task.origin }).then(res => {
      if (!res.ok) throw new DamselflyError(res.code, res.message)
    }).catch((err: unknown) => {
      task.verifierAsked = false
      logger.debug({ seed: verifier.info.peerId, digest: task.digest, err: (err as Error).message }, 'a seed could not take a copy to certify a table')
    })
  }

  async function handle (peerId: string, request: SchedulerRequest): Promise<unknown> {
    switch (request.type) {
      case 'register': {
        if (request.host.peerId !== peerId) throw new ProtocolError('a peer registers as itself')
        const existing = state.hostByPeer(peerId)
        if (existing !== undefined) for (const digest of [...existing.tasks]) state.dropHolding(existing, digest)
        state.upsertHost(request.host)
        logger.info({ peer: peerId, hostname: request.host.hostname, seed: request.host.seed }, existing === undefined ? 'host joined' : 'host re-registered')
        return { ok: true, schedulerId: id }
      }
      case 'announce': {
        const host = registered(peerId)
        for (const update of request.tasks) {
          // A barred host's holdings still count, but it writes and vouches for nothing.
          const result = state.applyUpdate(host, update, !trust.isBarred(host))
          if (result.learned.length > 0 || update.remove !== undefined) wake(update.digest)
          // Origin bytes that disagree with the table say as much as a report would.
          const conflict = result.conflicts[0]
          if (conflict !== undefined) {
            disputed(host, { digest: update.digest, piece: conflict, sha256: update.add?.find(([i]) => i === conflict)?.[1] })
            continue
          }
          const task = state.task(update.digest)
          if (task === undefined) continue
          for (const verdict of trust.observed(task, host, result.observed)) m?.disputesSettled.inc({ liar: verdict.lied })
          if (result.learned.length > 0) askVerifier(task)
        }
        for (const fact of request.facts ?? []) state.recordFact(fact, host.info.peerId)
        if (request.load !== undefined) {
          host.activeUploads = request.load.activeUploads
          if (request.load.bytes !== undefined) host.bytes = request.load.bytes
          for (const [parentId, rate] of request.load.parents ?? []) {
            const parent = state.hostByPeer(parentId)
            if (parent !== undefined) parent.throughput = parent.throughput === 0 ? rate : parent.throughput * 0.7 + rate * 0.3
          }
        }
        return { ok: true }
      }
      case 'parents': {
        const started = performance.now()
        const host = registered(peerId)
        const task = state.ensureTask(request.digest, request.size, { origin: request.origin })
        if (task === undefined) throw new ProtocolError(`size ${request.size} contradicts what the swarm knows of ${request.digest}`)
        if (request.first > request.last || request.first >= Math.max(1, task.pieceCount)) throw new ProtocolError('empty piece window')
        const plan = scheduling.plan(task, host, request.first, request.last, new Set(request.exclude ?? []), { whole: request.whole ?? true, mayAuthor: (h) => !trust.isBarred(h) })
        if (task.interested.size < MAX_INTERESTED && !task.interested.has(host.slot)) {
          task.interested.add(host.slot)
          host.tasks.add(task.digest)
        }
        if (plan.startSeed !== undefined) void startSeed(plan.startSeed, task)
        m?.selection.observe((performance.now() - started) / 1000)
        const response: ParentsResponse = { ok: true, pieceSize: task.pieceSize, pieceCount: task.pieceCount, parents: plan.parents, digests: plan.digests, assigned: plan.assigned, ...(plan.provisional.length > 0 ? { provisional: plan.provisional } : {}) }
        return response
      }
      case 'digests': {
        registered(peerId)
        const known = (): Array<[number, string]> => {
          const task = state.task(request.digest)
          if (task === undefined) return []
          return request.pieces.filter(i => task.known.has(i)).map(i => [i, task.digests.toString('hex', i * 32, i * 32 + 32)])
        }
        const provisional = (): number[] => {
          const task = state.task(request.digest)
          return task === undefined ? [] : request.pieces.filter(i => task.known.has(i) && !task.confirmed.has(i))
        }
        const task = state.task(request.digest)
        if (task !== undefined && !request.pieces.every(i => task.known.has(i)) && request.waitMs > 0) {
          await new Promise<void>((resolve) => {
            const waiter: DigestWaiter = { pieces: request.pieces, resolve }
            let set = waiters.get(request.digest)
            if (set === undefined) { set = new Set(); waiters.set(request.digest, set) }
            set.add(waiter)
            const done = (): void => {
              clearTimeout(timer)
              shutdown.signal.removeEventListener('abort', done)
              waiters.get(request.digest)?.delete(waiter)
              resolve()
            }
            const timer = setTimeout(done, request.waitMs)
            waiter.resolve = done
            shutdown.signal.addEventListener('abort', done, { once: true })
          })
        }
        const unconfirmed = provisional()
        return { ok: true, digests: known(), ...(unconfirmed.length > 0 ? { provisional: unconfirmed } : {}) }
      }
      case 'report': {
        await report(registered(peerId), request.report)
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
        state.removeHost(peerId)
        return { ok: true }
      }
    }
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
      await node.handle(SCHEDULER_PROTOCOL, async (stream, remotePeer) => {
        const signal = AbortSignal.any([shutdown.signal, AbortSignal.timeout(125_000)])
        const io = messages(stream)
        const request = await io.read(SchedulerRequest, 'scheduler request', { signal })
        let response: unknown
        try {
          response = await handle(remotePeer, request)
          m?.requests.inc({ type: request.type, outcome: 'ok' })
        } catch (err) {
          m?.requests.inc({ type: request.type, outcome: 'error' })
          const e = err as DamselflyError
          response = { ok: false, code: typeof e.code === 'string' ? e.code : 'DF_ERR_INTERNAL', message: String(e.message).slice(0, 1000) } satisfies ErrorResponse
          if (!(err instanceof DamselflyError)) logger.error({ err, type: request.type }, 'scheduler request failed')
        }
        await io.write(response, { signal })
        await stream.close({ signal }).catch(() => {})
      }, { maxInboundStreams: 4096, maxOutboundStreams: 1024 })
      node.onDisconnect((peerId) => {
        const host = state.removeHost(peerId)
        if (host !== undefined) logger.info({ peer: peerId, hostname: host.info.hostname }, 'host left')
      })
    },
    async stop () {
      shutdown.abort()
    }
  }
}
