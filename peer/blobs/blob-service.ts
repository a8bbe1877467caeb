import { Readable } from 'node:stream'
import { LRUCache } from 'lru-cache'
import { raceSignal, withDeadline, type AbortOptions } from '../../src/abort.ts'
import {
  BlobDigestMismatchError, BlobUnknownError, DeniedError, ManifestUnknownError, OriginProtocolError, OriginStatusError,
  PieceDigestMismatchError, QueueFullError, RangeNotSatisfiableError, RegistryNotAllowedError, StorageError, TableDroppedError, UnauthorizedError, isAbort
} from '../../src/errors.ts'
import { Limiter } from '../../src/limiter.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter } from '../../src/metrics.ts'
import { parseDigest, sha256Hex } from '../../src/oci/digest.ts'
import { DEFAULT_MANIFEST_ACCEPT } from '../../src/oci/media-types.ts'
import type { ByteRange } from '../../src/oci/range.ts'
import { choosePieceSize, pieceBounds, pieceCount as pieceCountOf, piecesCovering } from '../../src/pieces.ts'
import type { PieceStore } from '../piece-store/index.ts'
import type { OriginCredentials } from '../origin/index.ts'
import { verifyWhole } from './verify.ts'
import { Priority, type BlobByteCounts, type BlobService, type BlobServiceComponents, type BlobServiceInit, type BlobTask, type OpenBlob, type OpenBlobRequest, type ReadOptions, type ServePieceOptions } from './index.ts'

type Source = 'local' | 'origin' | 'peer'

/** Longest origin run for work below on-demand priority: an on-demand read waits on at most this many of its pieces. */
const LOW_PRIORITY_RUN = 4

/** How a fetched piece is handed to its waiters: in memory only when the cache could not keep it. */
interface Landed {
  data: Buffer | undefined
  source: Source
  /** Known genuine (see `RemotePiece.trusted`); origin bytes always are. */
  trusted: boolean
}

/** A verified piece in hand. */
interface Piece {
  data: Buffer
  source: Source
  trusted: boolean
}

interface Deferred {
  promise: Promise<Landed>
  resolve: (v: Landed) => void
  reject: (err: unknown) => void
}

/** Errors that another attempt will not fix. */
const FINAL_ERRORS = [UnauthorizedError, DeniedError, BlobUnknownError, ManifestUnknownError, OriginStatusError, RangeNotSatisfiableError]

/**
 * The data path: local cache, then the swarm, then the origin — every piece
 * verified before a byte of it is handed on.
 *
 * Pieces are fetched once per node however many readers want them (an
 * in-flight map keyed by digest and piece). Cold pieces come from the origin
 * in runs: one ranged GET covering up to `maxRunPieces` consecutive missing
 * pieces, cut into pieces as bytes arrive, each hashed and written before its
 * waiters are woken. A run that breaks leaves its remaining pieces to the
 * next attempt, which resumes at the first missing one.
 */
export class DefaultBlobService implements BlobService {
  readonly #logger: Logger
  readonly #store: PieceStore
  readonly #components: BlobServiceComponents
  readonly #readahead: number
  readonly #maxRun: number
  readonly #attempts: number
  readonly #runs: Limiter
  readonly #prefetches: Limiter
  readonly #prefetching = new Set<string>()
  readonly #maxPrefetchQueue: number
  readonly #inflight = new Map<string, Promise<Landed>>()
  /**
   * Verified pieces whose disk write has not finished. Readers take them from
   * here: on a busy disk a write can take longer than the network did.
   */
  readonly #landing = new Map<string, { data: Buffer, source: Source, trusted: boolean, written: Promise<unknown> }>()
  /** Tasks this node worked on lately, with the upstream and credentials to fetch more of them. */
  readonly #tasks = new LRUCache<string, BlobTask>({ max: 4096, ttl: 10 * 60_000 })
  /** Piece requests that arrived for a task this node was told to take but has not adopted yet. */
  readonly #adoption = new Map<string, Set<() => void>>()
  readonly #shutdown = new AbortController()
  readonly #maxPieceWaits: number
  #pieceWaits = 0
  /** Per blob with swarm fetches under way: aborted when the swarm drops its table. */
  readonly #remoteFetches = new Map<string, { controller: AbortController, count: number }>()
  readonly #served: Counter | undefined
  readonly #fetched: Counter | undefined
  readonly #bytes: BlobByteCounts = { served: { local: 0, peer: 0, origin: 0 }, fetched: { peer: 0, origin: 0 } }

  constructor (components: BlobServiceComponents, init: BlobServiceInit) {
    this.#components = components
    this.#logger = components.logger.child({ component: 'peer:blobs' })
    this.#store = components.store
    this.#readahead = Math.max(1, init.readahead ?? 4)
    this.#maxRun = Math.max(1, init.maxRunPieces ?? 64)
    this.#attempts = Math.max(1, init.pieceAttempts ?? 3)
    this.#maxPieceWaits = Math.max(1, init.maxPieceWaits ?? 256)
    this.#runs = new Limiter('origin requests', init.maxOriginRuns ?? 16, init.maxQueuedRuns ?? 1024)
    const maxPrefetches = Math.max(1, init.maxPrefetches ?? 2)
    this.#maxPrefetchQueue = maxPrefetches * 16
    this.#prefetches = new Limiter('prefetch', maxPrefetches, this.#maxPrefetchQueue)
    const registers = components.metrics === undefined ? undefined : [components.metrics]
    if (registers !== undefined) {
      this.#served = new Counter({ name: 'damselfly_served_bytes_total', help: 'Bytes sent to clients, by where the piece came from (local: already cached)', labelNames: ['source'], registers })
      this.#fetched = new Counter({ name: 'damselfly_fetched_bytes_total', help: 'Piece bytes fetched into this node, by source', labelNames: ['source'], registers })
    }
  }

  async open (request: OpenBlobRequest, options: AbortOptions = {}): Promise<OpenBlob> {
    const { upstream, repo, digest, kind, credentials } = request
    // Only a configured registry may fill the cache, and only its yes opens it.
    if (!upstream.trusted) throw new RegistryNotAllowedError(upstream.origin)
    const local = this.#store.info(digest)
    const access = await this.#components.access.check(upstream, repo, kind, digest, credentials, {
      signal: options.signal,
      local: local === undefined ? undefined : { size: local.size, mediaType: local.mediaType }
    })
    const mediaType = kind === 'manifest' ? (access.mediaType ?? local?.mediaType) : undefined
    this.#store.track(digest, access.size, { mediaType })
    const task: BlobTask = { upstream, repo, digest, kind, size: access.size, mediaType, credentials }
    this.adopt(task)
    return {
      task,
      stale: access.stale,
      read: async (range, readOptions = {}) => this.#read(task, range, readOptions)
    }
  }

  byteCounts (): BlobByteCounts {
    const { served, fetched } = this.#bytes
    return { served: { ...served }, fetched: { ...fetched } }
  }

  async abandon (digest: string): Promise<void> {
    const fetches = this.#remoteFetches.get(digest)
    this.#remoteFetches.delete(digest)
    fetches?.controller.abort(new TableDroppedError(digest))
    await this.#store.keepTrusted(digest, 'the swarm dropped its piece table')
  }

  adopt (task: BlobTask): void {
    this.#tasks.set(task.digest, task)
    const waiting = this.#adoption.get(task.digest)
    this.#adoption.delete(task.digest)
    for (const wake of waiting ?? []) wake()
  }

  forget (credentials: OriginCredentials): void {
    for (const [digest, task] of this.#tasks.entries()) {
      if (task.credentials === credentials) this.#tasks.delete(digest)
    }
  }

  /** Waits (bounded by `signal`) for a task to be adopted; the scheduler may name us before we heard of it. */
  async #adopted (digest: string, signal: AbortSignal): Promise<BlobTask | undefined> {
    const known = this.#tasks.get(digest)
    if (known !== undefined) return known
    let set = this.#adoption.get(digest)
    if (set === undefined) {
      if (this.#adoption.size >= 4096) return undefined
      set = new Set()
      this.#adoption.set(digest, set)
    }
    const { promise, resolve } = Promise.withResolvers<void>()
    set.add(resolve)
    try {
      await raceSignal(promise, signal)
    } catch {
      return undefined
    } finally {
      set.delete(resolve)
      if (set.size === 0 && this.#adoption.get(digest) === set) this.#adoption.delete(digest)
    }
    return this.#tasks.get(digest)
  }

  async servePiece (digest: string, index: number, options: ServePieceOptions): Promise<Buffer | undefined> {
    const held = await this.#store.readPiece(digest, index) ?? this.#landing.get(pieceKey(digest, index))?.data
    if (held !== undefined) return held
    const pending = this.#inflight.get(pieceKey(digest, index))
    const fetch = (): boolean => typeof options.fetch === 'function' ? options.fetch() : options.fetch
    // Nothing here and nothing coming: say so now, whatever the request was willing to wait.
    if (options.waitMs === 0 || (pending === undefined && !fetch())) return undefined
    if (this.#pieceWaits >= this.#maxPieceWaits) throw new QueueFullError('piece waits')
    this.#pieceWaits++
    const signal = withDeadline(options.signal, options.waitMs, 'waiting for a piece')
    try {
      if (pending !== undefined) {
        const landed = await raceSignal(pending, signal)
        return landed.data ?? await this.#store.readPiece(digest, index)
      }
      const task = await this.#adopted(digest, signal)
      const info = this.#store.info(digest)
      if (!fetch() || task === undefined || info === undefined || index >= info.pieceCount) return undefined
      return (await this.#acquire(task, index, Math.min(info.pieceCount - 1, index + this.#maxRun - 1), signal, Priority.ON_DEMAND, true)).data
    } catch (err) {
      // The wait ran out (not the asker leaving): nothing to give yet.
      if (options.signal?.aborted !== true && signal.aborted) return undefined
      throw err
    } finally {
      this.#pieceWaits--
    }
  }

  prefetch (task: BlobTask): boolean {
    if (this.#prefetching.has(task.digest) || this.#store.info(task.digest)?.complete === true) return false
    if (this.#prefetches.queued >= this.#maxPrefetchQueue) return false
    this.#prefetching.add(task.digest)
    const signal = this.#shutdown.signal
    void (async () => {
      let release: (() => void) | undefined
      try {
        release = await this.#prefetches.acquire({ signal, priority: 0 })
        await this.complete(task, { signal, priority: Priority.BACKGROUND })
        this.#logger.debug({ digest: task.digest }, 'prefetched a whole blob')
      } catch (err) {
        if (!signal.aborted) this.#logger.info({ err, digest: task.digest }, 'background prefetch stopped')
      } finally {
        release?.()
        this.#prefetching.delete(task.digest)
      }
    })()
    return true
  }

  async complete (task: BlobTask, options: ReadOptions = {}): Promise<void> {
    this.adopt(task)
    const info = this.#store.track(task.digest, task.size, { mediaType: task.mediaType })
    const unpin = this.#store.pin(task.digest)
    try {
      const last = info.pieceCount - 1
      for (let i = 0; i <= last; i++) {
        if (this.#store.hasPiece(task.digest, i)) continue
        await this.#acquire(task, i, last, options.signal, options.priority ?? Priority.ON_DEMAND, true)
      }
      await this.#written(task.digest)
      if (!await this.#store.verifyBlob(task.digest)) {
        if (this.#store.info(task.digest)?.complete !== true) throw new StorageError(`blob ${task.digest} could not be kept whole in the cache`)
        throw new BlobDigestMismatchError(task.digest, 'unknown')
      }
    } finally {
      unpin()
    }
  }

  async stop (): Promise<void> {
    this.#shutdown.abort()
  }

  async #read (task: BlobTask, range: ByteRange | undefined, options: ReadOptions): Promise<Readable> {
    const info = this.#store.track(task.digest, task.size, { mediaType: task.mediaType })
    if (task.size === 0) {
      if (!await this.#store.verifyBlob(task.digest)) throw new BlobDigestMismatchError(task.digest, 'the empty blob')
      return Readable.from([])
    }
    const start = range?.start ?? 0
    const end = range?.end ?? task.size - 1
    // A whole-blob read checks the digest before its last bytes leave, so any
    // piece matching the table will do; a range needs pieces known genuine.
    const whole = start === 0 && end === task.size - 1
    const { first, last } = piecesCovering(start, end, info.pieceSize)
    const unpin = this.#store.pin(task.digest)
    const signal = options.signal
    const priority = options.priority ?? Priority.ON_DEMAND
    // Whatever the cache keeps of it, a whole read hashes what it sends unless the cache already vouched for the whole blob.
    const verifyHere = whole && info.verified !== true
    let firstPiece: Piece
    try {
      firstPiece = await this.#usable(task, first, last, signal, priority, whole)
    } catch (err) {
      unpin()
      throw err
    }

    const self = this
    async function * pieces (): AsyncGenerator<Buffer> {
      const ahead: Array<Promise<Piece>> = []
      let next = first + 1
      const fill = (): void => {
        while (next <= last && ahead.length < self.#readahead) {
          const p = self.#usable(task, next++, last, signal, priority, whole)
          // Read-ahead may be abandoned when the client leaves; its failure is not ours to report then.
          p.catch(() => {})
          ahead.push(p)
        }
      }
      try {
        for (let i = first; i <= last; i++) {
          fill()
          const piece = i === first ? firstPiece : await (ahead.shift() as Promise<Piece>)
          const { offset, length } = pieceBounds(i, task.size, info.pieceSize)
          if (piece.data.length !== length) throw new StorageError(`piece ${i} of ${task.digest} is ${piece.data.length} bytes, expected ${length}`)
          if (i === info.pieceCount - 1) {
            await self.#written(task.digest)
            await self.#checkWhole(task)
          }
          const from = Math.max(start - offset, 0)
          const to = Math.min(end - offset + 1, piece.data.length)
          const slice = from === 0 && to === piece.data.length ? piece.data : piece.data.subarray(from, to)
          self.#served?.inc({ source: piece.source }, slice.length)
          self.#bytes.served[piece.source] += slice.length
          yield slice
        }
      } finally {
        unpin()
      }
    }
    if (!verifyHere) return Readable.from(pieces(), { objectMode: false, highWaterMark: 64 * 1024 })
    async function * verified (): AsyncGenerator<Buffer> {
      try {
        yield * verifyWhole(pieces(), parseDigest(task.digest), task.size)
      } catch (err) {
        // Every piece matched the table and the whole did not: the table is wrong.
        if (err instanceof BlobDigestMismatchError) self.#components.remote?.mismatch?.(task, undefined)
        throw err
      }
    }
    return Readable.from(verified(), { objectMode: false, highWaterMark: 64 * 1024 })
  }

  /** A piece a read may send: for a range, one known genuine (taken from the origin when the swarm's is not). */
  async #usable (task: BlobTask, index: number, lastWanted: number, signal: AbortSignal | undefined, priority: number, whole: boolean): Promise<Piece> {
    const piece = await this.#acquire(task, index, lastWanted, signal, priority, whole)
    if (whole || piece.trusted) return piece
    return this.#originPiece(task, index, signal, priority)
  }

  /**
   * A range read's piece whose entry only its author vouches for, and that
   * reached this node without a confirmation: the origin is asked for exactly
   * that piece. Equal to the table, it is now trusted here and confirms the
   * entry swarm-wide; different, the table is wrong: that is reported, this
   * node's copy evicted, and the origin's bytes are what the reader gets.
   */
  async #originPiece (task: BlobTask, index: number, signal: AbortSignal | undefined, priority: number): Promise<Piece> {
    const pieceSize = choosePieceSize(task.size)
    const { offset, length } = pieceBounds(index, task.size, pieceSize)
    const release = await this.#runs.acquire({ signal: AbortSignal.any([this.#shutdown.signal, ...(signal === undefined ? [] : [signal])]), priority })
    let data: Buffer
    try {
      const res = await this.#components.origin.getBlob(task.upstream, task.repo, task.digest, { start: offset, end: offset + length - 1 }, task.credentials, { ...(signal === undefined ? {} : { signal }) })
      data = await readExactly(res.body, length, task.digest)
    } finally {
      release()
    }
    const hex = sha256Hex(data)
    this.#fetched?.inc({ source: 'origin' }, length)
    this.#bytes.fetched.origin += length
    const expected = this.#store.pieceDigest(task.digest, index)
    if (expected !== undefined && expected !== hex) {
      this.#logger.warn({ digest: task.digest, piece: index }, 'the origin contradicts the swarm\'s piece table; reporting it and dropping this copy')
      this.#components.remote?.mismatch?.(task, { piece: index, sha256: hex })
      await this.abandon(task.digest)
      return { data, source: 'origin', trusted: true }
    }
    await this.#store.writePiece(task.digest, index, data, { sha256: hex, source: 'origin' }).catch((err: unknown) => {
      this.#logger.debug({ err, digest: task.digest, piece: index }, 'could not keep a piece confirmed from the origin')
    })
    return { data, source: 'origin', trusted: true }
  }

  /**
   * Before the last byte of a blob leaves, the blob as a whole must match its
   * digest when the cache holds all of it. A blob dropped while we read it
   * (it failed that check elsewhere) fails this read too.
   */
  async #checkWhole (task: BlobTask): Promise<void> {
    const info = this.#store.info(task.digest)
    if (info === undefined) throw new BlobDigestMismatchError(task.digest, 'dropped while reading')
    if (info.complete && !await this.#store.verifyBlob(task.digest)) throw new BlobDigestMismatchError(task.digest, 'mismatch')
  }

  /** One verified piece, from wherever it can be had; retried a bounded number of times. */
  async #acquire (task: BlobTask, index: number, lastWanted: number, signal: AbortSignal | undefined, priority: number, whole: boolean): Promise<Piece> {
    let lastError: unknown
    for (let attempt = 0; attempt < this.#attempts; attempt++) {
      signal?.throwIfAborted()
      const local = await this.#store.readPiece(task.digest, index)
      if (local !== undefined) return { data: local, source: 'local', trusted: this.#store.isTrusted(task.digest, index) }
      const key = pieceKey(task.digest, index)
      const landing = this.#landing.get(key)
      if (landing !== undefined) return { data: landing.data, source: landing.source, trusted: landing.trusted }
      const pending = this.#inflight.get(key) ?? this.#startFetch(task, index, lastWanted, priority, whole)
      try {
        const landed = await raceSignal(pending, signal)
        if (landed.data !== undefined) return { data: landed.data, source: landed.source, trusted: landed.trusted }
        const stored = await this.#store.readPiece(task.digest, index)
        if (stored !== undefined) return { data: stored, source: landed.source, trusted: landed.trusted || this.#store.isTrusted(task.digest, index) }
        lastError = new StorageError(`piece ${index} of ${task.digest} vanished from the cache after it landed`)
      } catch (err) {
        // A dropped table cut the fetch short: the next attempt goes by the new one.
        if (signal?.aborted === true || (isAbort(err) && !(err instanceof TableDroppedError))) throw err
        if (FINAL_ERRORS.some(E => err instanceof E)) throw err
        lastError = err
        this.#logger.debug({ err, digest: task.digest, piece: index, attempt }, 'piece fetch failed; trying again')
      }
    }
    throw lastError
  }

  #startFetch (task: BlobTask, index: number, lastWanted: number, priority: number, whole: boolean): Promise<Landed> {
    const remote = this.#components.remote
    if (remote === undefined) return this.#startOriginRun(task, index, lastWanted, priority)
    const deferred = this.#register(task, index)
    let fetches = this.#remoteFetches.get(task.digest)
    if (fetches === undefined) {
      fetches = { controller: new AbortController(), count: 0 }
      this.#remoteFetches.set(task.digest, fetches)
    }
    fetches.count++
    const mine = fetches
    const signal = AbortSignal.any([this.#shutdown.signal, mine.controller.signal])
    void (async () => {
      try {
        const got = await remote.fetch({ task, lastWanted, whole }, index, { signal })
        if (got.kind === 'origin') {
          // This node is the piece's first fetcher (or the swarm cannot help): the origin it is.
          this.#unregister(task, index, deferred)
          this.#startOriginRun(task, index, Math.max(index, Math.min(lastWanted, got.upTo)), priority).then(deferred.resolve, deferred.reject)
          return
        }
        await this.#land(task, index, got.data, got.sha256, 'peer', deferred, got.trusted)
      } catch (err) {
        deferred.reject(err)
      } finally {
        if (--mine.count === 0 && this.#remoteFetches.get(task.digest) === mine) this.#remoteFetches.delete(task.digest)
      }
    })()
    return deferred.promise
  }

  /** Registers pieces [index, …] that nobody is fetching yet as one origin request and starts it. */
  #startOriginRun (task: BlobTask, index: number, lastWanted: number, priority: number): Promise<Landed> {
    // The piece size follows from the blob's size alone: the store may have dropped the blob meanwhile.
    const pieceCount = pieceCountOf(task.size, choosePieceSize(task.size))
    // Manifests have no Range support at the origin: one request covers all of it.
    const first = task.kind === 'manifest' ? 0 : index
    const maxRun = priority < Priority.ON_DEMAND ? Math.min(this.#maxRun, LOW_PRIORITY_RUN) : this.#maxRun
    const limit = task.kind === 'manifest' ? pieceCount - 1 : Math.min(lastWanted, index + maxRun - 1)
    let last = index
    while (last < limit && !this.#store.hasPiece(task.digest, last + 1) && !this.#busy(pieceKey(task.digest, last + 1))) last++
    const deferreds = new Map<number, Deferred>()
    for (let i = first; i <= last; i++) {
      if (i === index || (!this.#store.hasPiece(task.digest, i) && !this.#busy(pieceKey(task.digest, i)))) deferreds.set(i, this.#register(task, i))
    }
    void this.#runOrigin(task, first, last, deferreds, priority)
    return (deferreds.get(index) as Deferred).promise
  }

  async #runOrigin (task: BlobTask, first: number, last: number, deferreds: Map<number, Deferred>, priority: number): Promise<void> {
    const pieceSize = choosePieceSize(task.size)
    let i = first
    let release: (() => void) | undefined
    let body: Readable | undefined
    try {
      release = await this.#runs.acquire({ signal: this.#shutdown.signal, priority })
      const start = first * pieceSize
      const end = Math.min(task.size, (last + 1) * pieceSize) - 1
      if (task.kind === 'manifest') {
        const res = await this.#components.origin.getManifest(task.upstream, task.repo, task.digest, DEFAULT_MANIFEST_ACCEPT, task.credentials, { signal: this.#shutdown.signal })
        if (res.body.length !== task.size) throw new OriginProtocolError(`manifest ${task.digest} is ${res.body.length} bytes, expected ${task.size}`)
        body = Readable.from([res.body])
      } else {
        body = (await this.#components.origin.getBlob(task.upstream, task.repo, task.digest, { start, end }, task.credentials, { signal: this.#shutdown.signal })).body
      }
      let buf = Buffer.allocUnsafe(pieceBounds(i, task.size, pieceSize).length)
      let filled = 0
      for await (const c of body) {
        const chunk = c as Buffer
        let off = 0
        while (off < chunk.length && i <= last) {
          const n = Math.min(chunk.length - off, buf.length - filled)
          chunk.copy(buf, filled, off, off + n)
          filled += n
          off += n
          if (filled < buf.length) continue
          const deferred = deferreds.get(i)
          if (deferred !== undefined) await this.#land(task, i, buf, sha256Hex(buf), 'origin', deferred, true)
          i++
          if (i <= last) {
            buf = Buffer.allocUnsafe(pieceBounds(i, task.size, pieceSize).length)
            filled = 0
          }
        }
        if (i > last) break
      }
      if (i <= last) throw new OriginProtocolError(`origin body for ${task.digest} ended at piece ${i} of ${last}`)
    } catch (err) {
      if (!isAbort(err)) {
        this.#logger.debug({ err, digest: task.digest, first, last, at: i }, 'origin request ended early')
        this.#components.remote?.originFailed?.(task, err)
      }
      for (const [index, deferred] of deferreds) if (index >= i) deferred.reject(err)
    } finally {
      body?.destroy()
      release?.()
    }
  }

  #busy (key: string): boolean {
    return this.#inflight.has(key) || this.#landing.has(key)
  }

  /** Resolves once every piece of a blob handed to readers is on disk (or failed to get there). */
  async #written (digest: string): Promise<void> {
    const prefix = pieceKey(digest, 0).slice(0, -1)
    await Promise.all([...this.#landing].filter(([k]) => k.startsWith(prefix)).map(async ([, l]) => l.written))
  }

  /**
   * Writes a fetched piece and wakes its waiters. A piece that matches the
   * piece table (or that has no entry in it yet) wakes them at once and is
   * written behind their backs; the store checks it against the table
   * either way, and a mismatch fails the waiters instead.
   */
  async #land (task: BlobTask, index: number, data: Buffer, sha256: string, source: 'origin' | 'peer', deferred: Deferred, trusted: boolean): Promise<void> {
    const key = pieceKey(task.digest, index)
    const write = this.#store.writePiece(task.digest, index, data, { sha256, source, trusted })
    // The store compared the piece with the table before its first await: whatever it knows now, it knew then.
    const known = this.#store.pieceDigest(task.digest, index)
    const early = known === undefined || known === sha256
    if (early) {
      this.#landing.set(key, { data, source, trusted, written: write.catch(() => {}) })
      this.#fetched?.inc({ source }, data.length)
      this.#bytes.fetched[source] += data.length
      deferred.resolve({ data, source, trusted })
    }
    let stored: boolean
    try {
      stored = await write
    } catch (err) {
      if (err instanceof PieceDigestMismatchError && source === 'origin') {
        // The origin contradicts the table: the table is what is wrong. Say so, and drop this copy so the next attempt starts afresh.
        this.#logger.warn({ digest: task.digest, piece: index }, 'the origin contradicts the swarm\'s piece table; reporting it and dropping this copy')
        this.#components.remote?.mismatch?.(task, { piece: index, sha256 })
        await this.abandon(task.digest)
      }
      if (err instanceof PieceDigestMismatchError || err instanceof BlobDigestMismatchError) {
        if (!early) deferred.reject(err)
        throw err
      }
      this.#logger.warn({ err, digest: task.digest, piece: index }, 'could not cache a piece; serving it from memory')
      stored = false
    } finally {
      this.#landing.delete(key)
    }
    if (early) return
    this.#fetched?.inc({ source }, data.length)
    this.#bytes.fetched[source] += data.length
    deferred.resolve({ data: stored ? undefined : data, source, trusted })
  }

  #register (task: BlobTask, index: number): Deferred {
    const { promise, resolve, reject } = Promise.withResolvers<Landed>()
    // Pieces fetched ahead may find no reader; their failures must not go unhandled.
    promise.catch(() => {})
    const deferred = { promise, resolve, reject }
    const key = pieceKey(task.digest, index)
    this.#inflight.set(key, promise)
    const done = (): void => { this.#unregister(task, index, deferred) }
    promise.then(done, done)
    return deferred
  }

  #unregister (task: BlobTask, index: number, deferred: Deferred): void {
    const key = pieceKey(task.digest, index)
    if (this.#inflight.get(key) === deferred.promise) this.#inflight.delete(key)
  }
}

function pieceKey (digest: string, index: number): string {
  return `${digest}#${index}`
}

/** Exactly `length` bytes of a body, or an error; the body is released either way. */
async function readExactly (body: Readable, length: number, digest: string): Promise<Buffer> {
  const data = Buffer.allocUnsafe(length)
  let filled = 0
  try {
    for await (const c of body) {
      const chunk = c as Buffer
      if (filled + chunk.length > length) throw new OriginProtocolError(`origin sent more than ${length} bytes of ${digest}`)
      chunk.copy(data, filled)
      filled += chunk.length
    }
  } finally {
    body.destroy()
  }
  if (filled !== length) throw new OriginProtocolError(`origin sent ${filled} of ${length} bytes of ${digest}`)
  return data
}
