import { PieceSet } from '../../src/pieces.ts'
import type { ParentInfo } from '../../src/protocol/messages.ts'
import { ASSIGNMENT_LEASE_MS, type HostRecord, type SwarmState, type TaskRecord } from '../state/index.ts'

export interface SchedulingInit {
  /** Parents returned per request. Default 8. */
  maxParents?: number
  /** Whole-task holders sampled before ranking. Default 32. */
  sampleSize?: number
  /** Partial holders looked at before ranking. Default 256. */
  partialScan?: number
  now?: () => number
  random?: () => number
}

export interface ParentsPlan {
  parents: ParentInfo[]
  /** Pieces of the window the requester must fetch from the origin itself. */
  assigned: number[]
  digests: Array<[number, string]>
  /** Pieces of `digests` no host but their author has vouched for. */
  provisional: number[]
  /** A seed that was just made first fetcher of this task and must be told to start. */
  startSeed: HostRecord | undefined
  /**
   * The origin assignments the plan makes, not yet applied: `propose` leaves
   * the state alone so that replicas can agree on them through the event log
   * first; `plan` applies them at once.
   */
  appointment: Appointment
}

/**
 * Hosts sent to the origin for pieces. Each entry says whom the proposer saw
 * holding the assignment (`''`: nobody live), so applying it is a
 * compare-and-set: of two replicas proposing at once, the second finds the
 * piece taken and its proposal is refused for that piece.
 */
export interface Appointment {
  first: Array<{ peer: string, pieces: Array<[number, string]> }>
  confirm: Array<{ peer: string, pieces: Array<[number, string]> }>
  /** Leases of the requester's earlier assignments that run on. */
  renew: { peer: string, first: number[], confirm: number[] } | undefined
}

/** Half-life of the "recently sent children here" counter. */
const RECENT_HALF_LIFE_MS = 2_000

/**
 * Decides, for a window of pieces one peer wants, where each comes from:
 * peers that hold it, a peer already fetching it (waited for, not fetched
 * again), or — for pieces nobody has or is getting — exactly one first
 * fetcher from the origin: a seed when one is up, otherwise the requester.
 *
 * A table entry only its author vouches for is fine for a whole-blob read
 * (the whole digest is checked before the read completes) but not for a
 * range (`whole` false). For a range, such a piece comes from a confirmer:
 * a second host sent to the origin for it — the requester, unless one is
 * already on its way, in which case the requester waits for that one.
 */
export interface PlanOptions {
  /** The reader checks the whole digest (default true); false for a range, which needs confirmed entries. */
  whole?: boolean
  /** Whether a host may write entries of this task's table (not barred, not party to a dispute over it). Default: all may. */
  mayAuthor?: (host: HostRecord) => boolean
}

type PlanFn = (task: TaskRecord, requester: HostRecord, first: number, last: number, exclude: ReadonlySet<string>, options?: PlanOptions) => ParentsPlan

export interface Scheduling {
  /** The plan, its origin assignments applied to the state at once (one scheduler, or a test). */
  plan: PlanFn
  /** The plan without touching the state: its `appointment` is for the caller to apply (see `appoint`). */
  propose: PlanFn
}

export function createScheduling (state: SwarmState, init: SchedulingInit = {}): Scheduling {
  const maxParents = init.maxParents ?? 8
  const sampleSize = init.sampleSize ?? 32
  const partialScan = init.partialScan ?? 256
  const now = init.now ?? Date.now
  const random = init.random ?? Math.random

  const usable = (host: HostRecord | undefined, requester: HostRecord, exclude: ReadonlySet<string>, t: number): host is HostRecord =>
    host !== undefined && host !== requester && host.barredUntil <= t && !exclude.has(host.info.peerId)

  function pickSeed (task: TaskRecord, requester: HostRecord, exclude: ReadonlySet<string>, t: number, mayAuthor: (host: HostRecord) => boolean): HostRecord | undefined {
    if (task.seedFailed || requester.info.seed) return undefined
    let best: HostRecord | undefined
    let bestLoad = Infinity
    for (const host of state.hosts()) {
      if (!host.info.seed || !usable(host, requester, exclude, t) || !mayAuthor(host)) continue
      const load = (host.activeUploads + decayed(host, t)) / host.info.uploadCapacity
      if (load < bestLoad) { best = host; bestLoad = load }
    }
    return best
  }

  /** Proposes sending a host to the origin for pieces, as first fetcher or as confirmer. */
  function lease (proposal: Appointment, task: TaskRecord, role: 'first' | 'confirmer', host: HostRecord, pieces: Iterable<number>, t: number): void {
    const who = role === 'first' ? task.assignee : task.confirmer
    const until = role === 'first' ? task.assignedUntil : task.confirmerUntil
    const seen: Array<[number, string]> = []
    for (const i of pieces) {
      const a = who?.[i] ?? 0
      const live = a !== 0 && (until?.[i] ?? 0) > t ? state.hostBySlot(a - 1) : undefined
      seen.push([i, live?.info.peerId ?? ''])
    }
    if (seen.length > 0) (role === 'first' ? proposal.first : proposal.confirm).push({ peer: host.info.peerId, pieces: seen })
  }

  function score (host: HostRecord, requester: HostRecord, t: number): number {
    const capacity = host.info.uploadCapacity
    const free = Math.max(0, 1 - (host.activeUploads + decayed(host, t) * 0.5) / capacity)
    const throughput = host.throughput <= 0 ? 0.5 : Math.min(1, host.throughput / (200 * 1024 * 1024))
    const idc = host.info.idc !== '' && host.info.idc === requester.info.idc ? 1 : 0
    const location = sharedPrefix(host.info.location, requester.info.location)
    const seed = host.info.seed ? 1 : 0.5
    return 0.45 * free + 0.2 * throughput + 0.15 * idc + 0.1 * location + 0.1 * seed + 0.02 * random()
  }

  /** Per task, where the last plan stopped in its partial holders. */
  const cursors = new WeakMap<TaskRecord, Iterator<[number, PieceSet]>>()

  /**
   * Partial holders, each plan going on from where the previous one stopped,
   * round and round. Scanning from the first entry every time handed every
   * child the same 64 candidates (the hosts that announced first): in the
   * fleet simulation (bench/sim/fleet.ts, 1,000 peers pulling in step) those
   * few had every child queued on them, answered "busy", while the other
   * peers' uploads idled; going round delivered a quarter more in the same time.
   */
  function * partialHolders (task: TaskRecord): Generator<[number, PieceSet]> {
    let it = cursors.get(task)
    let restarted = it === undefined
    it ??= task.partial.entries()
    for (let seen = 0; seen < task.partial.size;) {
      const r = it.next()
      if (r.done === true) {
        // Past the end: from the start again, once per plan.
        if (restarted) break
        restarted = true
        it = task.partial.entries()
        continue
      }
      seen++
      cursors.set(task, it)
      yield r.value
    }
    cursors.set(task, it)
  }

  const addTo = (map: Map<number, PieceSet>, slot: number, count: number, i: number): void => {
    let set = map.get(slot)
    if (set === undefined) { set = new PieceSet(count); map.set(slot, set) }
    set.add(i)
  }

  function propose (task: TaskRecord, requester: HostRecord, first: number, last: number, exclude: ReadonlySet<string>, options: PlanOptions = {}): ParentsPlan {
    const appointment: Appointment = { first: [], confirm: [], renew: undefined }
    const whole = options.whole ?? true
    const mayAuthor = options.mayAuthor ?? ((host: HostRecord) => host.barredUntil <= now())
    const t = now()
    last = Math.min(last, task.pieceCount - 1)
    // A requester that may not write entries still fetches for itself, but is sent nowhere on the swarm's behalf.
    const barred = !mayAuthor(requester)
    // Pieces a live, usable host is already fetching from the origin: waited for, not fetched again.
    const inProgress = new Map<number, PieceSet>()
    /** Of those, the ones a confirmer is fetching: what a range reader may wait for. */
    const confirming = new Map<number, PieceSet>()
    const mine: number[] = []
    const toConfirm: number[] = []
    const wanted: number[] = []
    /** Pieces this range reader may take only from a confirmer (or the origin). */
    const needsConfirmer = new Set<number>()
    for (let i = first; i <= last; i++) {
      const trusted = whole || task.confirmed.has(i)
      if (trusted && state.holds(task, requester.slot, i)) continue
      // Its own entry: the requester took those bytes from the origin itself.
      if (!trusted && task.author[i] === requester.slot + 1) continue
      wanted.push(i)
      const a = task.assignee?.[i] ?? 0
      const assignee = a === 0 ? undefined : state.hostBySlot(a - 1)
      if (assignee === requester) { mine.push(i); continue }
      const fetching = a !== 0 && (task.assignedUntil?.[i] ?? 0) > t && usable(assignee, requester, exclude, t)
      if (fetching) addTo(inProgress, assignee.slot, task.pieceCount, i)
      if (trusted) continue
      needsConfirmer.add(i)
      const c = task.confirmer?.[i] ?? 0
      const confirmer = c === 0 ? undefined : state.hostBySlot(c - 1)
      if (confirmer === requester) { mine.push(i); continue }
      if (c !== 0 && (task.confirmerUntil?.[i] ?? 0) > t && usable(confirmer, requester, exclude, t)) {
        addTo(inProgress, confirmer.slot, task.pieceCount, i)
        addTo(confirming, confirmer.slot, task.pieceCount, i)
        continue
      }
      // Nobody is confirming it: a piece someone holds or fetches gets this reader as its confirmer.
      if (task.known.has(i) || fetching) toConfirm.push(i)
    }

    // Candidates: holders of the window's pieces.
    const candidates = new Map<number, { host: HostRecord, held: PieceSet | undefined, complete: boolean }>()
    for (const slot of task.complete.sample(sampleSize, random)) {
      const host = state.hostBySlot(slot)
      if (usable(host, requester, exclude, t)) candidates.set(slot, { host, held: undefined, complete: true })
    }
    let scanned = 0
    for (const [slot, pieces] of partialHolders(task)) {
      if (scanned++ >= partialScan || candidates.size >= sampleSize * 2) break
      const host = state.hostBySlot(slot)
      if (!usable(host, requester, exclude, t) || !overlaps(pieces, first, last)) continue
      candidates.set(slot, { host, held: pieces, complete: false })
    }
    const covered = (i: number): boolean => {
      for (const c of candidates.values()) if (c.complete || c.held?.has(i) === true) return true
      for (const set of inProgress.values()) if (set.has(i)) return true
      return false
    }

    // Pieces nobody usable has or is getting get exactly one first fetcher.
    const confirmLater = new Set(toConfirm)
    const orphans = wanted.filter(i => !mine.includes(i) && !confirmLater.has(i) && !covered(i))
    let startSeed: HostRecord | undefined
    if (orphans.length > 0) {
      const seed = pickSeed(task, requester, exclude, t, mayAuthor)
      if (seed !== undefined) {
        // A seed takes the whole task: it fetches whole blobs into the swarm.
        const all = new Set(orphans)
        for (let i = 0; i < task.pieceCount; i++) {
          if (!state.hasHolder(task, i) && !((task.assignee?.[i] ?? 0) !== 0 && (task.assignedUntil?.[i] ?? 0) > t)) all.add(i)
        }
        lease(appointment, task, 'first', seed, all, t)
        startSeed = seed
        for (const i of all) addTo(inProgress, seed.slot, task.pieceCount, i)
        // A range reader then confirms what it needs of the seed's pieces from the origin.
        for (const i of orphans) if (needsConfirmer.has(i)) toConfirm.push(i)
      } else {
        mine.push(...orphans)
        // A barred host may still fetch for itself, but writes no table entry others would trust.
        if (!barred) lease(appointment, task, 'first', requester, orphans, t)
      }
    }
    if (toConfirm.length > 0) {
      mine.push(...toConfirm)
      if (!barred) lease(appointment, task, 'confirmer', requester, toConfirm, t)
    }
    // Pieces it was sent for before: their leases run on.
    const again = mine.filter(i => !toConfirm.includes(i) && !orphans.includes(i))
    if (again.length > 0 && !barred) {
      appointment.renew = {
        peer: requester.info.peerId,
        first: again.filter(i => task.assignee?.[i] === requester.slot + 1),
        confirm: again.filter(i => task.confirmer?.[i] === requester.slot + 1)
      }
    }

    // Rank; keep the best, then add whoever else is needed so every wanted piece has a source.
    const all = new Map<number, ParentInfo>()
    for (const [slot, c] of candidates) all.set(slot, parentInfo(c.host, c.complete, c.held, inProgress.get(slot), confirming.get(slot)))
    for (const [slot, fetching] of inProgress) {
      const host = state.hostBySlot(slot)
      if (host !== undefined && !all.has(slot)) all.set(slot, parentInfo(host, false, task.partial.get(slot), fetching, confirming.get(slot)))
    }
    const ranked = [...all.entries()]
      .map(([slot, info]) => {
        const host = state.hostBySlot(slot) as HostRecord
        // Peers (not seeds) holding the piece asked for come first: the child needs that one now, and a seed's
        // upload is what every new piece must pass through once (fleet simulation: the seed had most requests).
        const holdsFirst = !host.info.seed && (info.complete || (candidates.get(slot)?.held?.has(first) ?? false)) ? 0.5 : 0
        return { info, host, score: score(host, requester, t) + (inProgress.has(slot) ? 1 : 0) + holdsFirst }
      })
      .sort((a, b) => b.score - a.score)
    const chosen = ranked.slice(0, maxParents)
    const supplies = (r: { info: ParentInfo, host: HostRecord }, i: number): boolean => needsConfirmer.has(i)
      ? confirming.get(r.host.slot)?.has(i) ?? false
      : r.info.complete || (candidates.get(r.host.slot)?.held?.has(i) ?? false) || (inProgress.get(r.host.slot)?.has(i) ?? false)
    for (const i of wanted) {
      if (mine.includes(i) || chosen.some(r => supplies(r, i))) continue
      const extra = ranked.find(r => !chosen.includes(r) && supplies(r, i))
      if (extra !== undefined) chosen.push(extra)
    }
    for (const { host } of chosen) bump(host, t)

    const digests: Array<[number, string]> = []
    const provisional: number[] = []
    for (let i = first; i <= last; i++) {
      if (!task.known.has(i)) continue
      digests.push([i, task.digests.toString('hex', i * 32, i * 32 + 32)])
      if (!task.confirmed.has(i)) provisional.push(i)
    }
    return { parents: chosen.map(r => r.info), assigned: [...new Set(mine)].sort((a, b) => a - b), digests, provisional, startSeed, appointment }
  }

  return {
    propose,
    plan (task, requester, first, last, exclude, options) {
      const plan = propose(task, requester, first, last, exclude, options)
      const granted = appoint(state, task, plan.appointment, now())
      return withGranted(plan, granted, requester)
    }
  }
}

/**
 * Applies an appointment: each piece goes to its host unless, since the
 * proposal was made, someone else has been sent for it and is still on its
 * lease. Deterministic in the state and `t`, so every replica applying the
 * same log reaches the same assignments. Returns, per host, the pieces it got.
 */
export function appoint (state: SwarmState, task: TaskRecord, appointment: Appointment, t: number): Map<string, Set<number>> {
  const granted = new Map<string, Set<number>>()
  const take = (role: 'first' | 'confirmer', peer: string, pieces: Array<[number, string]>): void => {
    const host = state.hostByPeer(peer)
    if (host === undefined) return
    const who = role === 'first' ? (task.assignee ??= new Int32Array(task.pieceCount)) : (task.confirmer ??= new Int32Array(task.pieceCount))
    const until = role === 'first' ? (task.assignedUntil ??= new Float64Array(task.pieceCount)) : (task.confirmerUntil ??= new Float64Array(task.pieceCount))
    let mine = granted.get(peer)
    for (const [i, seen] of pieces) {
      if (i < 0 || i >= task.pieceCount) continue
      const a = who[i] as number
      const live = a !== 0 && (until[i] as number) > t ? state.hostBySlot(a - 1) : undefined
      const current = live?.info.peerId ?? ''
      if (current !== seen && current !== peer) continue
      who[i] = host.slot + 1
      until[i] = t + ASSIGNMENT_LEASE_MS
      if (mine === undefined) { mine = new Set(); granted.set(peer, mine) }
      mine.add(i)
    }
    // The host now has a stake in this task; its departure must release the assignment.
    if (mine !== undefined) host.tasks.add(task.digest)
  }
  for (const { peer, pieces } of appointment.first) take('first', peer, pieces)
  for (const { peer, pieces } of appointment.confirm) take('confirmer', peer, pieces)
  const renew = appointment.renew
  const host = renew === undefined ? undefined : state.hostByPeer(renew.peer)
  if (renew !== undefined && host !== undefined) {
    for (const i of renew.first) if (task.assignee?.[i] === host.slot + 1 && task.assignedUntil !== undefined) task.assignedUntil[i] = t + ASSIGNMENT_LEASE_MS
    for (const i of renew.confirm) if (task.confirmer?.[i] === host.slot + 1 && task.confirmerUntil !== undefined) task.confirmerUntil[i] = t + ASSIGNMENT_LEASE_MS
  }
  return granted
}

/**
 * The plan as it stands once its appointment was applied: pieces proposed
 * for the requester that went to someone else are no longer its to fetch
 * (it waits for them like any piece in progress), and a seed that got
 * nothing is not started.
 */
export function withGranted (plan: ParentsPlan, granted: ReadonlyMap<string, ReadonlySet<number>>, requester: HostRecord): ParentsPlan {
  const proposed = new Set<number>()
  for (const list of [plan.appointment.first, plan.appointment.confirm]) {
    for (const { peer, pieces } of list) if (peer === requester.info.peerId) for (const [i] of pieces) proposed.add(i)
  }
  const mine = granted.get(requester.info.peerId)
  const seed = plan.startSeed
  return {
    ...plan,
    assigned: plan.assigned.filter(i => !proposed.has(i) || mine?.has(i) === true),
    startSeed: seed !== undefined && granted.has(seed.info.peerId) ? seed : undefined
  }
}

function parentInfo (host: HostRecord, complete: boolean, held: PieceSet | undefined, fetching: PieceSet | undefined, confirming: PieceSet | undefined): ParentInfo {
  return {
    peerId: host.info.peerId,
    addrs: host.info.addrs,
    ...(host.info.upload === undefined ? {} : { upload: host.info.upload }),
    seed: host.info.seed,
    complete,
    ...(complete || held === undefined ? {} : { held: held.toBase64() }),
    ...(fetching === undefined ? {} : { fetching: fetching.toBase64() }),
    ...(confirming === undefined ? {} : { confirming: confirming.toBase64() })
  }
}

function overlaps (pieces: PieceSet, first: number, last: number): boolean {
  for (let i = first; i <= last; i++) if (pieces.has(i)) return true
  return false
}

/** Fraction of "|"-separated location levels two hosts share from the top, up to 5. */
export function sharedPrefix (a: string, b: string): number {
  if (a === '' || b === '') return 0
  const x = a.split('|')
  const y = b.split('|')
  let n = 0
  while (n < 5 && n < x.length && n < y.length && x[n] === y[n]) n++
  return n / 5
}

function decayed (host: HostRecord, t: number): number {
  return host.recentSelections * 0.5 ** ((t - host.recentAt) / RECENT_HALF_LIFE_MS)
}

function bump (host: HostRecord, t: number): void {
  host.recentSelections = decayed(host, t) + 1
  host.recentAt = t
}
