import { LRUCache } from 'lru-cache'
import { PieceSet, choosePieceSize, pieceCount } from '../../src/pieces.ts'
import type { ByteCounts, Fact, HostInfo, OriginRef, PreheatBlobResult, TaskUpdate } from '../../src/protocol/messages.ts'
import { HostSet } from './host-set.ts'

/** One connected peer. `slot` is a small integer used in per-task bitsets. */
export interface HostRecord {
  readonly slot: number
  info: HostInfo
  connectedAt: number
  lastSeen: number
  activeUploads: number
  /** Throughput children measured from this host, bytes/s (EWMA). */
  throughput: number
  /** Children sent here recently; decays, so load spreads before the host reports it. */
  recentSelections: number
  recentAt: number
  barredUntil: number
  /** Bytes the host reported moving since it started; undefined until it reports (older peers never do). */
  bytes: ByteCounts | undefined
  /** Tasks this host holds pieces of or is fetching, for cleanup. */
  readonly tasks: Set<string>
  /** The scheduler replica the host's session is with ('' for one scheduler). */
  via: string
}

export interface TaskRecord {
  readonly digest: string
  readonly size: number
  readonly pieceSize: number
  readonly pieceCount: number
  mediaType: string | undefined
  origin: OriginRef | undefined
  /**
   * The piece table: SHA-256 per piece, taken only from the host appointed to
   * fetch that piece from the origin (or, with no table yet, from a holder
   * re-announcing a whole blob it verified).
   */
  readonly digests: Buffer
  readonly known: PieceSet
  /** Per piece: slot + 1 of the host whose announcement wrote the entry; blamed if the table turns out wrong. */
  readonly author: Int32Array
  /**
   * Entries some host other than their author vouched for: it took the piece
   * from the origin and got the same SHA-256, or it assembled the whole blob
   * from pieces matching the table and the blob matched its digest. Every
   * piece confirmed: the table is certified, and no report can take it down.
   */
  readonly confirmed: PieceSet
  /** A seed has been asked to take a copy and so certify the table. */
  verifierAsked: boolean
  /** Hosts that asked where to get pieces of it lately: told to drop what they have if the table goes. */
  readonly interested: Set<number>
  /** Hosts holding every piece. */
  readonly complete: HostSet
  /** Hosts holding some pieces. */
  readonly partial: Map<number, PieceSet>
  /** Holders per piece among `partial` (complete holders are counted apart). */
  readonly pieceHolders: Uint32Array
  /** Per piece: slot + 1 of the host told to fetch it from the origin, 0 for none. */
  assignee: Int32Array | undefined
  /** Per piece: when that assignment lapses unless the host makes progress (ms epoch). */
  assignedUntil: Float64Array | undefined
  /**
   * Per piece: slot + 1 of a second host sent to the origin for a piece a
   * range reader needs before anyone but its author vouches for it. Whichever
   * of the two lands first writes the entry; the other confirms it (or, by
   * disagreeing, shows the table wrong).
   */
  confirmer: Int32Array | undefined
  confirmerUntil: Float64Array | undefined
  /** A seed tried this task and could not fetch it (e.g. a private repository). */
  seedFailed: boolean
  lastActivity: number
}

export type JobStatus = 'PENDING' | 'RUNNING' | 'SUCCESS' | 'FAILURE'

/** A preheat job as every replica sees it (the credentials it runs with are never here). */
export interface JobRecord {
  readonly id: string
  /** Small and increasing, for clients that read job ids as integers (Harbor). */
  number: number
  readonly request: { registry: string, repo: string, reference: string, platform?: string | undefined }
  status: JobStatus
  /** The seed peer that ran it. */
  seed: string | undefined
  /** The scheduler replica running it: if that replica goes, so does the job. */
  replica: string
  createdAt: number
  finishedAt: number | undefined
  error: string | undefined
  results: PreheatBlobResult[]
}

export interface StateInit {
  /** Tag and public-content facts kept. Default 100,000 each. */
  maxFacts?: number
  /**
   * Different hosts that must say the same thing before a fact is handed out
   * (a fact lets a peer serve content anonymously, or resolve a tag, while
   * the registry is down: one member's word must not be enough). Default 2.
   */
  factQuorum?: number
  now?: () => number
}

/**
 * Who holds what, in this process's memory. With one scheduler a restart
 * is refilled by the peers' re-announcements; replicas each keep a copy,
 * kept alike by applying one shared log of events (scheduler/swarm).
 */
export interface SwarmState {
  upsertHost: (info: HostInfo) => { host: HostRecord, fresh: boolean }
  removeHost: (peerId: string) => HostRecord | undefined
  hostByPeer: (peerId: string) => HostRecord | undefined
  hostBySlot: (slot: number) => HostRecord | undefined
  hosts: () => IterableIterator<HostRecord>
  readonly hostCount: number

  task: (digest: string) => TaskRecord | undefined
  ensureTask: (digest: string, size: number, extra?: { mediaType?: string | undefined, origin?: OriginRef | undefined }) => TaskRecord | undefined
  tasks: () => IterableIterator<TaskRecord>
  readonly taskCount: number
  /** Applies a peer's update: holdings, table entries it may write, confirmations. */
  /** `vouches` false (a barred host): its pieces are counted where they match, but it writes and confirms no entry. */
  applyUpdate: (host: HostRecord, update: TaskUpdate, vouches?: boolean) => UpdateResult
  /**
   * Forgets a host's holdings of one task (or one piece of it), and the
   * pieces it was sent to the origin for unless `keepLeases` (it is still
   * fetching them).
   */
  dropHolding: (host: HostRecord, digest: string, piece?: number, options?: { keepLeases?: boolean }) => void
  /** Forgets a task entirely: table, holders, assignments. */
  dropTask: (digest: string) => TaskRecord | undefined
  /**
   * Empties a task's table, holdings and assignments but keeps the task (and
   * who was interested in it): its table was shown wrong and starts afresh.
   */
  resetTable: (task: TaskRecord) => void
  holds: (task: TaskRecord, slot: number, piece: number) => boolean
  hasHolder: (task: TaskRecord, piece: number) => boolean

  /** A host says a tag points at a digest, or that content is public. Counts once per host. */
  recordFact: (fact: Fact, by: string) => void
  /** The newest digest `factQuorum` different hosts say the tag points at. */
  tagFact: (registry: string, repo: string, tag: string) => Fact | undefined
  /** That content is public, if `factQuorum` different hosts say so (alike). */
  publicFact: (registry: string, repo: string, digest: string) => Fact | undefined

  /** A new job (numbered here) or a change to one. Returns the job as kept. */
  putJob: (job: JobRecord) => JobRecord
  job: (id: string) => JobRecord | undefined
  jobByNumber: (number: number) => JobRecord | undefined
  jobs: () => JobRecord[]

  /** Forgets everything: hosts, tasks, facts, jobs. */
  clear: () => void
  /** Everything, as plain data a replica can load (`load`) to catch up with a shared log. */
  snapshot: () => StateSnapshot
  /** Replaces everything with a snapshot. */
  load: (snapshot: StateSnapshot) => void
}

export interface UpdateResult {
  /** Pieces whose digest became known. */
  learned: number[]
  /** The update certified the table (every entry confirmed). */
  certified: boolean
  /** Pieces the host fetched from the origin whose SHA-256 disagrees with the table. */
  conflicts: number[]
  /**
   * What this host vouched for, piece by piece: SHA-256s it took from the
   * origin itself, or of a whole blob it verified. Independent evidence in a
   * dispute about the table.
   */
  observed: Array<[number, string]>
}

/** Whether every entry of the table has been confirmed by a host other than its author. */
export function isCertified (task: TaskRecord): boolean {
  return task.pieceCount > 0 && task.confirmed.complete
}

export function createMemoryState (init: StateInit = {}): SwarmState {
  return new MemorySwarmState(init)
}

class MemorySwarmState implements SwarmState {
  readonly #now: () => number
  readonly #byPeer = new Map<string, HostRecord>()
  readonly #bySlot: Array<HostRecord | undefined> = []
  readonly #freeSlots: number[] = []
  readonly #tasks = new Map<string, TaskRecord>()
  readonly #tags: LRUCache<string, Vouched[]>
  readonly #public: LRUCache<string, Vouched[]>
  readonly #quorum: number
  readonly #jobs = new LRUCache<string, JobRecord>({ max: 1000 })
  readonly #jobNumbers = new LRUCache<number, string>({ max: 1000 })
  #lastJobNumber = 0

  constructor (init: StateInit) {
    this.#now = init.now ?? Date.now
    this.#tags = new LRUCache({ max: init.maxFacts ?? 100_000 })
    this.#public = new LRUCache({ max: init.maxFacts ?? 100_000 })
    this.#quorum = Math.max(1, init.factQuorum ?? 2)
  }

  get hostCount (): number { return this.#byPeer.size }
  get taskCount (): number { return this.#tasks.size }

  upsertHost (info: HostInfo): { host: HostRecord, fresh: boolean } {
    const now = this.#now()
    const existing = this.#byPeer.get(info.peerId)
    if (existing !== undefined) {
      existing.info = info
      existing.lastSeen = now
      return { host: existing, fresh: false }
    }
    const slot = this.#freeSlots.pop() ?? this.#bySlot.length
    const host: HostRecord = {
      slot,
      info,
      connectedAt: now,
      lastSeen: now,
      activeUploads: 0,
      throughput: 0,
      recentSelections: 0,
      recentAt: now,
      barredUntil: 0,
      bytes: undefined,
      tasks: new Set(),
      via: ''
    }
    this.#byPeer.set(info.peerId, host)
    this.#bySlot[slot] = host
    return { host, fresh: true }
  }

  removeHost (peerId: string): HostRecord | undefined {
    const host = this.#byPeer.get(peerId)
    if (host === undefined) return undefined
    for (const digest of [...host.tasks]) this.dropHolding(host, digest)
    this.#byPeer.delete(peerId)
    this.#bySlot[host.slot] = undefined
    this.#freeSlots.push(host.slot)
    return host
  }

  hostByPeer (peerId: string): HostRecord | undefined { return this.#byPeer.get(peerId) }
  hostBySlot (slot: number): HostRecord | undefined { return this.#bySlot[slot] }
  hosts (): IterableIterator<HostRecord> { return this.#byPeer.values() }
  task (digest: string): TaskRecord | undefined { return this.#tasks.get(digest) }
  tasks (): IterableIterator<TaskRecord> { return this.#tasks.values() }

  ensureTask (digest: string, size: number, extra: { mediaType?: string | undefined, origin?: OriginRef | undefined } = {}): TaskRecord | undefined {
    const existing = this.#tasks.get(digest)
    if (existing !== undefined) {
      // Digests are immutable: a different size is a lie or a bug, never an update.
      if (existing.size !== size) return undefined
      if (extra.origin !== undefined) existing.origin = extra.origin
      if (extra.mediaType !== undefined) existing.mediaType = extra.mediaType
      existing.lastActivity = this.#now()
      return existing
    }
    const pieceSize = choosePieceSize(size)
    const count = pieceCount(size, pieceSize)
    const task: TaskRecord = {
      digest,
      size,
      pieceSize,
      pieceCount: count,
      mediaType: extra.mediaType,
      origin: extra.origin,
      digests: Buffer.alloc(count * 32),
      known: new PieceSet(count),
      author: new Int32Array(count),
      confirmed: new PieceSet(count),
      verifierAsked: false,
      interested: new Set(),
      complete: new HostSet(),
      partial: new Map(),
      pieceHolders: new Uint32Array(count),
      assignee: undefined,
      assignedUntil: undefined,
      confirmer: undefined,
      confirmerUntil: undefined,
      seedFailed: false,
      lastActivity: this.#now()
    }
    this.#tasks.set(digest, task)
    return task
  }

  applyUpdate (host: HostRecord, update: TaskUpdate, vouches = true): UpdateResult {
    const result: UpdateResult = { learned: [], certified: false, conflicts: [], observed: [] }
    if (update.remove === true) {
      this.dropHolding(host, update.digest)
      if ((update.add === undefined || update.add.length === 0) && update.verified !== true) return result
    }
    const task = this.ensureTask(update.digest, update.size, { mediaType: update.mediaType, origin: update.origin })
    if (task === undefined) return result
    if (Array.isArray(update.remove)) for (const i of update.remove) this.dropHolding(host, task.digest, i)
    const add = update.add ?? []
    const fromOrigin = new Set(update.fromOrigin ?? [])
    const wasCertified = isCertified(task)
    // A holder re-announcing a whole blob it verified may write a table nobody
    // else has (a restarted scheduler learns tables this way); only where it
    // agrees with every entry already known.
    const wholeVerified = vouches && update.verified === true && add.length === task.pieceCount &&
      add.every(([i, hex]) => i < task.pieceCount && (!task.known.has(i) || this.#entry(task, i) === hex))
    if (add.length > 0) host.tasks.add(task.digest)
    let pieces = task.partial.get(host.slot)
    const wasComplete = task.complete.has(host.slot)
    for (const [index, hex] of add) {
      if (index >= task.pieceCount || wasComplete) continue
      // A host sent to the origin for this piece speaks for the origin's bytes, whatever it says.
      const fromTheOrigin = vouches && (fromOrigin.has(index) || task.assignee?.[index] === host.slot + 1 || task.confirmer?.[index] === host.slot + 1)
      if (fromTheOrigin || wholeVerified) result.observed.push([index, hex])
      if (task.known.has(index)) {
        // A holder whose bytes disagree with the table is not counted as holding them.
        if (this.#entry(task, index) !== hex) {
          if (fromTheOrigin) result.conflicts.push(index)
          continue
        }
        if (fromTheOrigin && task.author[index] !== host.slot + 1) task.confirmed.add(index)
      } else if (vouches && (task.assignee?.[index] === host.slot + 1 || task.confirmer?.[index] === host.slot + 1 || wholeVerified)) {
        task.digests.write(hex, index * 32, 'hex')
        task.known.add(index)
        task.author[index] = host.slot + 1
        result.learned.push(index)
      } else {
        // Not this host's entry to write: its piece counts once the table has it.
        continue
      }
      if (pieces === undefined) {
        pieces = new PieceSet(task.pieceCount)
        task.partial.set(host.slot, pieces)
      }
      if (pieces.add(index)) task.pieceHolders[index] = (task.pieceHolders[index] as number) + 1
      if (task.assignee?.[index] === host.slot + 1) task.assignee[index] = 0
      if (task.confirmer?.[index] === host.slot + 1) task.confirmer[index] = 0
    }
    // Progress keeps this host's other origin assignments alive.
    this.#extendAssignments(task, host.slot)
    if (pieces?.complete === true) {
      for (const i of pieces) task.pieceHolders[i] = (task.pieceHolders[i] as number) - 1
      task.partial.delete(host.slot)
      task.complete.add(host.slot)
    }
    // A whole blob that matched its digest vouches for every entry someone else wrote.
    if (vouches && update.verified === true && task.complete.has(host.slot)) {
      for (let i = 0; i < task.pieceCount; i++) {
        if (task.author[i] !== host.slot + 1) task.confirmed.add(i)
        if (!wholeVerified) result.observed.push([i, this.#entry(task, i)])
      }
    }
    result.certified = !wasCertified && isCertified(task)
    task.lastActivity = this.#now()
    return result
  }

  #entry (task: TaskRecord, index: number): string {
    return task.digests.toString('hex', index * 32, index * 32 + 32)
  }

  dropHolding (host: HostRecord, digest: string, piece?: number, options: { keepLeases?: boolean } = {}): void {
    const task = this.#tasks.get(digest)
    if (task === undefined) {
      host.tasks.delete(digest)
      return
    }
    if (piece === undefined) {
      task.interested.delete(host.slot)
      if (task.complete.delete(host.slot)) { /* whole-task holder gone */ }
      const pieces = task.partial.get(host.slot)
      if (pieces !== undefined) {
        for (const i of pieces) task.pieceHolders[i] = (task.pieceHolders[i] as number) - 1
        task.partial.delete(host.slot)
      }
      if (options.keepLeases !== true) releaseAssignments(task, host.slot)
      if (!hasLease(task, host.slot)) host.tasks.delete(digest)
      this.#forgetIfEmpty(task)
      return
    }
    if (task.complete.delete(host.slot)) {
      // Demote to a partial holder of everything but the dropped piece.
      const pieces = new PieceSet(task.pieceCount)
      for (let i = 0; i < task.pieceCount; i++) {
        if (i === piece) continue
        pieces.add(i)
        task.pieceHolders[i] = (task.pieceHolders[i] as number) + 1
      }
      task.partial.set(host.slot, pieces)
      return
    }
    const pieces = task.partial.get(host.slot)
    if (pieces?.delete(piece) === true) task.pieceHolders[piece] = (task.pieceHolders[piece] as number) - 1
  }

  dropTask (digest: string): TaskRecord | undefined {
    const task = this.#tasks.get(digest)
    if (task === undefined) return undefined
    for (const slot of task.complete) this.#bySlot[slot]?.tasks.delete(digest)
    for (const slot of task.partial.keys()) this.#bySlot[slot]?.tasks.delete(digest)
    this.#tasks.delete(digest)
    return task
  }

  resetTable (task: TaskRecord): void {
    task.digests.fill(0)
    task.known.clear()
    task.author.fill(0)
    task.confirmed.clear()
    task.complete.clear()
    task.partial.clear()
    task.pieceHolders.fill(0)
    task.assignee = undefined
    task.assignedUntil = undefined
    task.confirmer = undefined
    task.confirmerUntil = undefined
    task.verifierAsked = false
    task.seedFailed = false
    task.lastActivity = this.#now()
  }

  holds (task: TaskRecord, slot: number, piece: number): boolean {
    return task.complete.has(slot) || (task.partial.get(slot)?.has(piece) ?? false)
  }

  hasHolder (task: TaskRecord, piece: number): boolean {
    return task.complete.size > 0 || (task.pieceHolders[piece] as number) > 0
  }

  recordFact (fact: Fact, by: string): void {
    const [map, key, same] = fact.kind === 'tag'
      ? [this.#tags, `${fact.registry}\n${fact.repo}\n${fact.tag}`, (v: Fact) => v.kind === 'tag' && v.digest === fact.digest]
      : [this.#public, `${fact.registry}\n${fact.repo}\n${fact.digest}`, (v: Fact) => v.kind === 'public' && v.size === fact.size && v.mediaType === fact.mediaType]
    const candidates = map.get(key) ?? []
    let vouched = candidates.find(c => same(c.fact))
    if (vouched === undefined) {
      vouched = { fact, by: new Set() }
      // A few rival claims are kept; the least backed gives way.
      candidates.push(vouched)
      candidates.sort((a, b) => b.by.size - a.by.size)
      if (candidates.length > MAX_CLAIMS) candidates.length = MAX_CLAIMS
    } else if (fact.kind === 'tag' && vouched.fact.kind === 'tag' && fact.seenAt > vouched.fact.seenAt) {
      vouched.fact = fact
    }
    if (vouched.by.size < MAX_CLAIMS) vouched.by.add(by)
    map.set(key, candidates)
  }

  tagFact (registry: string, repo: string, tag: string): Fact | undefined {
    let best: Fact | undefined
    for (const c of this.#tags.get(`${registry}\n${repo}\n${tag}`) ?? []) {
      if (c.by.size < this.#quorum || c.fact.kind !== 'tag') continue
      if (best === undefined || (best.kind === 'tag' && c.fact.seenAt > best.seenAt)) best = c.fact
    }
    return best
  }

  publicFact (registry: string, repo: string, digest: string): Fact | undefined {
    return (this.#public.get(`${registry}\n${repo}\n${digest}`) ?? []).find(c => c.by.size >= this.#quorum)?.fact
  }

  putJob (job: JobRecord): JobRecord {
    const existing = this.#jobs.get(job.id)
    const kept: JobRecord = { ...job, results: [...job.results], number: existing?.number ?? ++this.#lastJobNumber }
    this.#jobs.set(kept.id, kept)
    this.#jobNumbers.set(kept.number, kept.id)
    return kept
  }

  job (id: string): JobRecord | undefined { return this.#jobs.get(id) }
  jobByNumber (number: number): JobRecord | undefined {
    const id = this.#jobNumbers.get(number)
    return id === undefined ? undefined : this.#jobs.get(id)
  }

  jobs (): JobRecord[] { return [...this.#jobs.values()] }

  clear (): void {
    this.#jobs.clear()
    this.#jobNumbers.clear()
    this.#lastJobNumber = 0
    this.#byPeer.clear()
    this.#bySlot.length = 0
    this.#freeSlots.length = 0
    this.#tasks.clear()
    this.#tags.clear()
    this.#public.clear()
  }

  snapshot (): StateSnapshot {
    const hosts: HostSnapshot[] = []
    for (const h of this.#byPeer.values()) {
      hosts.push({ info: h.info, connectedAt: h.connectedAt, lastSeen: h.lastSeen, activeUploads: h.activeUploads, throughput: h.throughput, barredUntil: h.barredUntil, bytes: h.bytes, via: h.via })
    }
    const peer = (slot: number): string => this.#bySlot[slot]?.info.peerId ?? ''
    const slots = (arr: Int32Array | undefined): string[] | undefined => arr === undefined ? undefined : Array.from(arr, a => a === 0 ? '' : peer(a - 1))
    const tasks: TaskSnapshot[] = []
    for (const t of this.#tasks.values()) {
      tasks.push({
        digest: t.digest,
        size: t.size,
        mediaType: t.mediaType,
        origin: t.origin,
        digests: t.digests.toString('base64'),
        known: t.known.toBase64(),
        author: slots(t.author) as string[],
        confirmed: t.confirmed.toBase64(),
        verifierAsked: t.verifierAsked,
        interested: [...t.interested].map(peer),
        complete: [...t.complete].map(peer),
        partial: [...t.partial].map(([slot, pieces]) => [peer(slot), pieces.toBase64()]),
        assignee: slots(t.assignee),
        assignedUntil: t.assignedUntil === undefined ? undefined : Array.from(t.assignedUntil),
        confirmer: slots(t.confirmer),
        confirmerUntil: t.confirmerUntil === undefined ? undefined : Array.from(t.confirmerUntil),
        seedFailed: t.seedFailed,
        lastActivity: t.lastActivity
      })
    }
    const facts = (cache: LRUCache<string, Vouched[]>): Array<[string, Array<{ fact: Fact, by: string[] }>]> =>
      [...cache.entries()].reverse().map(([k, v]) => [k, v.map(c => ({ fact: c.fact, by: [...c.by] }))])
    return { hosts, tasks, tags: facts(this.#tags), public: facts(this.#public), jobs: [...this.#jobs.values()].reverse(), lastJobNumber: this.#lastJobNumber }
  }

  load (snapshot: StateSnapshot): void {
    this.clear()
    for (const h of snapshot.hosts) {
      const { host } = this.upsertHost(h.info)
      Object.assign(host, { connectedAt: h.connectedAt, lastSeen: h.lastSeen, activeUploads: h.activeUploads, throughput: h.throughput, barredUntil: h.barredUntil, bytes: h.bytes, via: h.via })
    }
    const slotOf = (peerId: string): number | undefined => this.#byPeer.get(peerId)?.slot
    const slots = (list: string[]): Int32Array => Int32Array.from(list, p => p === '' ? 0 : (slotOf(p) ?? -1) + 1)
    for (const s of snapshot.tasks) {
      const task = this.ensureTask(s.digest, s.size, { mediaType: s.mediaType, origin: s.origin })
      if (task === undefined) continue
      task.digests.write(s.digests, 'base64')
      for (const i of PieceSet.fromBase64(task.pieceCount, s.known)) task.known.add(i)
      task.author.set(slots(s.author))
      for (const i of PieceSet.fromBase64(task.pieceCount, s.confirmed)) task.confirmed.add(i)
      task.verifierAsked = s.verifierAsked
      for (const p of s.interested) { const slot = slotOf(p); if (slot !== undefined) task.interested.add(slot) }
      for (const p of s.complete) {
        const host = this.#byPeer.get(p)
        if (host === undefined) continue
        task.complete.add(host.slot)
        host.tasks.add(task.digest)
      }
      for (const [p, bits] of s.partial) {
        const host = this.#byPeer.get(p)
        if (host === undefined) continue
        const pieces = PieceSet.fromBase64(task.pieceCount, bits)
        task.partial.set(host.slot, pieces)
        for (const i of pieces) task.pieceHolders[i] = (task.pieceHolders[i] as number) + 1
        host.tasks.add(task.digest)
      }
      if (s.assignee !== undefined) task.assignee = slots(s.assignee)
      if (s.assignedUntil !== undefined) task.assignedUntil = Float64Array.from(s.assignedUntil)
      if (s.confirmer !== undefined) task.confirmer = slots(s.confirmer)
      if (s.confirmerUntil !== undefined) task.confirmerUntil = Float64Array.from(s.confirmerUntil)
      for (const arr of [task.assignee, task.confirmer]) {
        if (arr === undefined) continue
        for (const a of arr) if (a > 0) this.#bySlot[a - 1]?.tasks.add(task.digest)
      }
      task.seedFailed = s.seedFailed
      task.lastActivity = s.lastActivity
    }
    const facts = (cache: LRUCache<string, Vouched[]>, list: StateSnapshot['tags']): void => {
      for (const [k, v] of list) cache.set(k, v.map(c => ({ fact: c.fact, by: new Set(c.by) })))
    }
    facts(this.#tags, snapshot.tags)
    facts(this.#public, snapshot.public)
    for (const job of snapshot.jobs) {
      this.#jobs.set(job.id, job)
      this.#jobNumbers.set(job.number, job.id)
    }
    this.#lastJobNumber = snapshot.lastJobNumber
  }

  #extendAssignments (task: TaskRecord, slot: number): void {
    const until = this.#now() + ASSIGNMENT_LEASE_MS
    if (task.assignee !== undefined && task.assignedUntil !== undefined) {
      for (let i = 0; i < task.pieceCount; i++) if (task.assignee[i] === slot + 1) task.assignedUntil[i] = until
    }
    if (task.confirmer !== undefined && task.confirmerUntil !== undefined) {
      for (let i = 0; i < task.pieceCount; i++) if (task.confirmer[i] === slot + 1) task.confirmerUntil[i] = until
    }
  }

  #forgetIfEmpty (task: TaskRecord): void {
    if (task.complete.size > 0 || task.partial.size > 0) return
    if (task.assignee?.some(a => a !== 0) === true || task.confirmer?.some(a => a !== 0) === true) return
    // Keep the table of a task nobody holds only while it is young; it is cheap to relearn.
    this.#tasks.delete(task.digest)
  }
}

export interface HostSnapshot {
  info: HostInfo
  connectedAt: number
  lastSeen: number
  activeUploads: number
  throughput: number
  barredUntil: number
  bytes: ByteCounts | undefined
  via: string
}

/** A task with hosts named by peer id ('' for none): slots are each replica's own. */
export interface TaskSnapshot {
  digest: string
  size: number
  mediaType: string | undefined
  origin: OriginRef | undefined
  digests: string
  known: string
  author: string[]
  confirmed: string
  verifierAsked: boolean
  interested: string[]
  complete: string[]
  partial: Array<[string, string]>
  assignee: string[] | undefined
  assignedUntil: number[] | undefined
  confirmer: string[] | undefined
  confirmerUntil: number[] | undefined
  seedFailed: boolean
  lastActivity: number
}

export interface StateSnapshot {
  hosts: HostSnapshot[]
  tasks: TaskSnapshot[]
  tags: Array<[string, Array<{ fact: Fact, by: string[] }>]>
  public: Array<[string, Array<{ fact: Fact, by: string[] }>]>
  jobs: JobRecord[]
  lastJobNumber: number
}

/** A fact and the hosts that said it. */
interface Vouched {
  fact: Fact
  by: Set<string>
}

/** Rival claims kept per fact, and hosts counted per claim. */
const MAX_CLAIMS = 8

/** How long a host may sit on an origin assignment without landing a piece of it. */
export const ASSIGNMENT_LEASE_MS = 30_000

function hasLease (task: TaskRecord, slot: number): boolean {
  return task.assignee?.includes(slot + 1) === true || task.confirmer?.includes(slot + 1) === true
}

/** Frees every piece a host was sent to the origin for, as first fetcher or confirmer. */
export function releaseAssignments (task: TaskRecord, slot: number): void {
  if (task.assignee !== undefined) for (let i = 0; i < task.pieceCount; i++) if (task.assignee[i] === slot + 1) task.assignee[i] = 0
  if (task.confirmer !== undefined) for (let i = 0; i < task.pieceCount; i++) if (task.confirmer[i] === slot + 1) task.confirmer[i] = 0
}
