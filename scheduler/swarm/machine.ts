import type { Logger } from '../../src/logger.ts'
import { Counter, type Registry } from '../../src/metrics.ts'
import type { Report } from '../../src/protocol/messages.ts'
import { appoint } from '../scheduling/index.ts'
import { isCertified, releaseAssignments, type HostRecord, type JobRecord, type StateSnapshot, type SwarmState, type TaskRecord } from '../state/index.ts'
import type { TrustKeeper, TrustSnapshot } from './trust.ts'
import type { Effect, Envelope, SwarmEvent } from './events.ts'

/** Requesters remembered per task, to be told when its table is dropped; past this, only holders are. */
const MAX_INTERESTED = 4096

export interface Outcome {
  /** For the appending replica to carry out (other replicas ignore them). */
  effects: Effect[]
  /** `interest`: the task, or undefined when the size contradicts what the swarm knows. */
  task?: TaskRecord | undefined
  /** `appoint`: per host, the pieces it was sent to the origin for. */
  granted?: Map<string, Set<number>> | undefined
  /** `register`: the host was known already. */
  existed?: boolean | undefined
  /** `leave`: the host that left. */
  left?: HostRecord | undefined
  /** `job`: the job as kept (numbered). */
  job?: JobRecord | undefined
}

export interface MachineCounters {
  barred: () => void
  tableDropped: () => void
  disputeSettled: (liar: 'author' | 'reporter') => void
}

export interface SwarmMachineComponents {
  logger: Logger
  state: SwarmState
  trust: TrustKeeper
  /** Runs `fn` with the state's clock at `at`, so every replica applies an event at the same time. */
  at: <T>(at: number, fn: () => T) => T
  counters?: MachineCounters | undefined
}

export interface SwarmMachine {
  /** Applies one event. `local`: this replica appended it (its counters count, its effects are returned to be done). */
  apply: (envelope: Envelope, local: boolean) => Outcome
  /** Resolves once every piece's digest is known (or the task is gone), `waitMs` passes, or `signal` aborts. */
  waitForDigests: (digest: string, pieces: number[], waitMs: number, signal: AbortSignal) => Promise<void>
  /** Forgets everything (the shared store lost its data); waiters are woken. */
  clear: () => void
  /** The swarm as plain data, for a replica that joins later. */
  snapshot: () => unknown
  load: (snapshot: unknown) => void
}

/** The counters of what the machine decides, counted by the replica that appended the event. */
export function createMachineCounters (registers: Registry[]): MachineCounters {
  const barred = new Counter({ name: 'damselfly_scheduler_parents_barred_total', help: 'Parents barred after sending bad pieces', registers })
  const tablesDropped = new Counter({ name: 'damselfly_scheduler_tables_dropped_total', help: 'Provisional piece tables reset after a peer reported them wrong', registers })
  const disputesSettled = new Counter({ name: 'damselfly_scheduler_disputes_settled_total', help: 'Reports that a table was wrong, settled by independent fetches', labelNames: ['liar'], registers })
  return {
    barred: () => { barred.inc() },
    tableDropped: () => { tablesDropped.inc() },
    disputeSettled: (liar) => { disputesSettled.inc({ liar }) }
  }
}

interface DigestWaiter {
  pieces: number[]
  resolve: () => void
}

/**
 * The swarm as a state machine: one function per event type, deterministic
 * in the state and the event, so that every replica applying the same log
 * holds the same swarm. Talking to peers is not done here: it comes back as
 * effects for the replica that appended the event.
 */
export function createSwarmMachine (components: SwarmMachineComponents): SwarmMachine {
  const { state, trust, counters } = components
  const logger = components.logger.child({ component: 'scheduler:swarm' })
  const waiters = new Map<string, Set<DigestWaiter>>()

  function wake (digest: string): void {
    const set = waiters.get(digest)
    if (set === undefined) return
    const task = state.task(digest)
    for (const w of [...set]) {
      if (task === undefined || w.pieces.every(i => task.known.has(i))) {
        set.delete(w)
        w.resolve()
      }
    }
    if (set.size === 0) waiters.delete(digest)
  }

  const fetchCommand = (task: TaskRecord): Effect['command'] | undefined => task.origin === undefined
    ? undefined
    : { type: 'fetch', digest: task.digest, size: task.size, ...(task.mediaType === undefined ? {} : { mediaType: task.mediaType }), origin: task.origin }

  function seedFailed (seed: HostRecord, task: TaskRecord): void {
    task.seedFailed = true
    if (task.assignee === undefined) return
    for (let i = 0; i < task.pieceCount; i++) if (task.assignee[i] === seed.slot + 1) task.assignee[i] = 0
  }

  /** `host` says (or its origin bytes show) that a task's table is wrong. */
  function disputed (host: HostRecord, report: { digest: string, piece?: number | undefined, sha256?: string | undefined, table?: string | undefined }, local: boolean, effects: Effect[]): void {
    const { digest, piece } = report
    const outcome = trust.mismatch(host, report)
    if (outcome.action === 'ignored') {
      if (local) logger.warn({ digest, reporter: host.info.peerId, piece, why: outcome.why }, 'a report that a piece table is wrong was not acted on')
      return
    }
    if (local) {
      counters?.tableDropped()
      logger.error({ digest, reporter: host.info.peerId, piece, authors: outcome.authors, holders: outcome.holders.length }, 'a provisional piece table was reported wrong: reset everywhere, its authors barred until independent fetches settle who lied')
    }
    for (const holder of outcome.holders) {
      if (holder !== host) effects.push({ peer: holder.info.peerId, command: { type: 'evict', digest }, what: 'evict a reset table' })
    }
    wake(digest)
  }

  /**
   * A table every piece of which is known but only its authors vouch for:
   * a seed that did not write it takes a copy from the swarm, and its whole-
   * digest check certifies the table for range reads everywhere.
   */
  function askVerifier (task: TaskRecord, t: number, effects: Effect[]): void {
    if (task.verifierAsked || !task.known.complete || isCertified(task)) return
    const command = fetchCommand(task)
    if (command === undefined) return
    let best: HostRecord | undefined
    for (const host of state.hosts()) {
      if (!host.info.seed || host.barredUntil > t || task.complete.has(host.slot)) continue
      if (task.author.includes(host.slot + 1)) continue
      if (best === undefined || host.activeUploads < best.activeUploads) best = host
    }
    if (best === undefined) return
    task.verifierAsked = true
    effects.push({ peer: best.info.peerId, command, onFail: { type: 'verifier-failed', digest: task.digest }, what: 'take a copy to certify a table' })
  }

  function report (host: HostRecord, r: Report, local: boolean, effects: Effect[]): void {
    // A barred host's word counts for nothing.
    if (trust.isBarred(host)) return
    switch (r.kind) {
      case 'bad-piece': {
        const parent = state.hostByPeer(r.parent)
        if (parent === undefined || parent === host) return
        if (trust.badPiece(host, parent)) {
          state.dropHolding(parent, r.digest, r.piece)
          if (local) {
            counters?.barred()
            logger.warn({ parent: r.parent, reporter: host.info.peerId, digest: r.digest, piece: r.piece }, 'parent sent pieces that failed verification to more than one child; barred')
          }
        }
        return
      }
      case 'blob-mismatch': {
        disputed(host, r, local, effects)
        return
      }
      case 'origin-failed': {
        const task = state.task(r.digest)
        if (task === undefined) return
        if (host.info.seed) seedFailed(host, task)
        else releaseAssignments(task, host.slot)
      }
    }
  }

  function apply (envelope: Envelope, local: boolean): Outcome {
    const effects: Effect[] = []
    const e: SwarmEvent = envelope.e
    const t = envelope.at
    switch (e.type) {
      case 'register': {
        const existing = state.hostByPeer(e.host.peerId)
        // What it holds it announces again; what it was sent to the origin for it is still fetching
        // (it moved to another replica, it did not stop), so those leases stay: another first fetcher
        // for the same pieces would be a second copy from the origin.
        if (existing !== undefined) for (const digest of [...existing.tasks]) state.dropHolding(existing, digest, undefined, { keepLeases: true })
        const { host } = state.upsertHost(e.host)
        host.via = envelope.by
        return { effects, existed: existing !== undefined }
      }
      case 'leave': {
        const host = state.hostByPeer(e.peer)
        if (host === undefined || (e.via !== undefined && host.via !== e.via)) return { effects }
        const digests = [...host.tasks]
        state.removeHost(e.peer)
        for (const digest of digests) wake(digest)
        return { effects, left: host }
      }
      case 'replica-gone': {
        for (const host of [...state.hosts()]) {
          if (host.via !== e.replica) continue
          state.removeHost(host.info.peerId)
        }
        // Its jobs will not finish: their callers should ask again.
        for (const job of state.jobs()) {
          if (job.replica !== e.replica || job.status === 'SUCCESS' || job.status === 'FAILURE') continue
          state.putJob({ ...job, status: 'FAILURE', error: 'the scheduler replica running the job went away', finishedAt: t })
        }
        return { effects }
      }
      case 'job': {
        return { effects, job: state.putJob(e.job) }
      }
      case 'announce': {
        const host = state.hostByPeer(e.peer)
        if (host === undefined) return { effects }
        for (const update of e.tasks) {
          // A barred host's holdings still count, but it writes and vouches for nothing.
          const result = state.applyUpdate(host, update, !trust.isBarred(host))
          if (result.learned.length > 0 || update.remove !== undefined) wake(update.digest)
          // Origin bytes that disagree with the table say as much as a report would.
          const conflict = result.conflicts[0]
          if (conflict !== undefined) {
            disputed(host, { digest: update.digest, piece: conflict, sha256: update.add?.find(([i]) => i === conflict)?.[1] }, local, effects)
            continue
          }
          const task = state.task(update.digest)
          if (task === undefined) continue
          for (const verdict of trust.observed(task, host, result.observed)) if (local) counters?.disputeSettled(verdict.lied)
          if (result.learned.length > 0) askVerifier(task, t, effects)
        }
        for (const fact of e.facts ?? []) state.recordFact(fact, host.info.peerId)
        if (e.load !== undefined) {
          host.activeUploads = e.load.activeUploads
          if (e.load.bytes !== undefined) host.bytes = e.load.bytes
          for (const [parentId, rate] of e.load.parents ?? []) {
            const parent = state.hostByPeer(parentId)
            if (parent !== undefined) parent.throughput = parent.throughput === 0 ? rate : parent.throughput * 0.7 + rate * 0.3
          }
        }
        return { effects }
      }
      case 'report': {
        const host = state.hostByPeer(e.peer)
        if (host !== undefined) report(host, e.report, local, effects)
        return { effects }
      }
      case 'interest': {
        const host = state.hostByPeer(e.peer)
        const task = state.ensureTask(e.digest, e.size, { origin: e.origin })
        if (task !== undefined && host !== undefined && task.interested.size < MAX_INTERESTED && !task.interested.has(host.slot)) {
          task.interested.add(host.slot)
          host.tasks.add(task.digest)
        }
        return { effects, task }
      }
      case 'appoint': {
        const task = state.task(e.digest)
        if (task === undefined) return { effects, granted: new Map() }
        const granted = appoint(state, task, e.appointment, t)
        // A seed sent for pieces fetches the whole task into the swarm.
        const command = fetchCommand(task)
        for (const { peer } of e.appointment.first) {
          if (peer === e.peer || !granted.has(peer) || command === undefined) continue
          effects.push({ peer, command, onFail: { type: 'seed-failed', digest: task.digest, seed: peer }, what: 'seed the task' })
        }
        return { effects, granted }
      }
      case 'seed-failed': {
        const task = state.task(e.digest)
        const seed = state.hostByPeer(e.seed)
        if (task !== undefined && seed !== undefined) seedFailed(seed, task)
        return { effects }
      }
      case 'verifier-failed': {
        const task = state.task(e.digest)
        if (task !== undefined) task.verifierAsked = false
        return { effects }
      }
    }
  }

  return {
    apply: (envelope, local) => components.at(envelope.at, () => apply(envelope, local)),

    async waitForDigests (digest, pieces, waitMs, signal) {
      const task = state.task(digest)
      if (task === undefined || pieces.every(i => task.known.has(i)) || waitMs <= 0 || signal.aborted) return
      await new Promise<void>((resolve) => {
        const waiter: DigestWaiter = { pieces, resolve }
        let set = waiters.get(digest)
        if (set === undefined) { set = new Set(); waiters.set(digest, set) }
        set.add(waiter)
        const done = (): void => {
          clearTimeout(timer)
          signal.removeEventListener('abort', done)
          waiters.get(digest)?.delete(waiter)
          resolve()
        }
        const timer = setTimeout(done, waitMs)
        waiter.resolve = done
        signal.addEventListener('abort', done, { once: true })
      })
    },

    clear () {
      state.clear()
      trust.clear()
      for (const digest of [...waiters.keys()]) wake(digest)
    },

    snapshot: () => ({ state: state.snapshot(), trust: trust.snapshot() }),

    load (snapshot) {
      const s = snapshot as { state: StateSnapshot, trust: TrustSnapshot }
      state.load(s.state)
      trust.load(s.trust)
      for (const digest of [...waiters.keys()]) wake(digest)
    }
  }
}
