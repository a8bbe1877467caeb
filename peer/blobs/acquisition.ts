import { raceSignal } from '../../src/abort.ts'
import type { BufferPool, Lease } from '../../src/buffer-pool.ts'
import {
  BlobDigestMismatchError, BlobUnknownError, DeniedError, ManifestUnknownError, OriginStatusError,
  PieceDigestMismatchError, RangeNotSatisfiableError, StorageError, TableDroppedError, UnauthorizedError, isAbort
} from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { choosePieceSize, pieceCount } from '../../src/pieces.ts'
import type { RateLimits } from '../../src/rate.ts'
import type { PieceWriter } from '../piece-store/index.ts'
import type { PieceSource } from '../swarm/source.ts'
import type { ByteCounters, Source } from './counters.ts'
import { Priority, swarmTask, type BlobTask, type LentPiece } from './index.ts'
import type { OriginRuns } from './origin-runs.ts'

/** A verified piece in hand. */
export interface Piece {
  data: Buffer
  /** SHA-256 (hex) of `data`: what it was checked against. */
  sha256: string
  source: Source
  /** Known genuine (see `RemotePiece.trusted`); origin bytes always are. */
  trusted: boolean
  /**
   * The holder's claim on `data` when it sits in a pooled buffer: released
   * once nothing will read `data` again (a reader lends it down its stream).
   */
  lease?: Lease | undefined
}

/** How a fetched piece is handed to its waiters. */
type Landed = Piece

interface Deferred {
  promise: Promise<Landed>
  resolve: (v: Landed) => void
  reject: (err: unknown) => void
}

export interface AcquisitionComponents {
  logger: Logger
  store: PieceWriter
  runs: OriginRuns
  counters: ByteCounters
  /** The swarm, consulted before the origin; absent on a node without one. */
  source?: PieceSource | undefined
  /** A piece from peers waits for its bytes in the download limit (and the prefetch one for prefetches). */
  rates?: Pick<RateLimits, 'download' | 'prefetch'> | undefined
  /** Buffers a piece read back from the cache for a reader goes into; a fresh one each when absent. */
  buffers?: BufferPool | undefined
}

/** Errors that another attempt will not fix. */
const FINAL_ERRORS = [UnauthorizedError, DeniedError, BlobUnknownError, ManifestUnknownError, OriginStatusError, RangeNotSatisfiableError]

/**
 * Each piece once per node, however many readers want it, and handed on only
 * verified: the rule the rest of the data path leans on.
 *
 * A piece is taken from the cache, or joins a fetch already under way, or
 * starts one: from the swarm (whose fetcher checks it against the piece
 * table) or from the origin, in a run of the consecutive pieces nobody is
 * getting. Origin bytes that contradict the swarm's table make the table the
 * suspect: that is reported, and this node's copy goes. A fetched piece wakes
 * its waiters as soon as it is verified and is written behind their backs
 * (on a busy disk a write can take longer than the network did).
 */
export class PieceAcquisition {
  readonly #logger: Logger
  readonly #store: PieceWriter
  readonly #runs: OriginRuns
  readonly #counters: ByteCounters
  readonly #source: PieceSource | undefined
  readonly #rates: AcquisitionComponents['rates']
  readonly #buffers: BufferPool | undefined
  readonly #attempts: number
  readonly #inflight = new Map<string, Promise<Landed>>()
  /** Verified pieces whose disk write has not finished. */
  readonly #landing = new Map<string, Piece & { written: Promise<unknown> }>()
  /** Per blob with swarm fetches under way: aborted when the swarm drops its table. */
  readonly #remoteFetches = new Map<string, { controller: AbortController, count: number }>()
  readonly #shutdown = new AbortController()

  constructor (components: AcquisitionComponents, init: { attempts?: number | undefined } = {}) {
    this.#logger = components.logger
    this.#store = components.store
    this.#runs = components.runs
    this.#counters = components.counters
    this.#source = components.source
    this.#rates = components.rates
    this.#buffers = components.buffers
    this.#attempts = Math.max(1, init.attempts ?? 3)
  }

  /** One verified piece, from wherever it can be had; retried a bounded number of times. */
  async acquire (task: BlobTask, index: number, lastWanted: number, signal: AbortSignal | undefined, priority: number, whole: boolean): Promise<Piece> {
    let lastError: unknown
    for (let attempt = 0; attempt < this.#attempts; attempt++) {
      signal?.throwIfAborted()
      const local = await this.#heldPooled(task.digest, index)
      if (local !== undefined) return local
      const key = pieceKey(task.digest, index)
      const landing = this.#landing.get(key)
      if (landing !== undefined) {
        const claimed = claim(landing)
        if (claimed !== undefined) return claimed
      }
      const pending = this.#inflight.get(key) ?? this.#startFetch(task, index, lastWanted, priority, whole)
      try {
        const landed = await raceSignal(pending, signal)
        // Its buffer may have gone back to the pool meanwhile (written, and released by the fetch): the cache has it then.
        const claimed = claim(landed) ?? await this.#held(task.digest, index)
        if (claimed !== undefined) return claimed
        lastError = new StorageError(`piece ${index} of ${task.digest} landed and was gone before it could be read`)
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

  /**
   * A piece held here (on disk, or landed and still being written), without
   * fetching anything. The bytes are the caller's: a pooled buffer is copied
   * out (into `into` when it is large enough).
   */
  async peek (digest: string, index: number, into?: Buffer): Promise<Buffer | undefined> {
    const held = (await this.#held(digest, index, into))?.data
    if (held !== undefined) return held
    const landing = this.#landing.get(pieceKey(digest, index))
    return landing === undefined ? undefined : ownCopy(landing, into)
  }

  /** The piece's bytes once a fetch under way here lands them, lent (a pooled buffer is shared, not copied); undefined when none is under way. */
  whenLanded (digest: string, index: number): Promise<LentPiece> | undefined {
    return this.#inflight.get(pieceKey(digest, index))?.then(async landed => {
      const mine = claim(landed)
      if (mine !== undefined) return { data: mine.data, release: () => { mine.lease?.release() } }
      const held = await this.#held(digest, index)
      if (held === undefined) throw new StorageError(`piece ${index} of ${digest} landed and was gone before it could be read`)
      return { data: held.data, release: () => {} }
    })
  }

  /**
   * A held piece read into a pooled buffer whose lease comes with it: a
   * reader taking pieces out of order reads most of them back from the cache,
   * and a fresh megabyte each was garbage again. From the hot-piece memory it
   * comes as it is, without a lease.
   */
  async #heldPooled (digest: string, index: number): Promise<Piece | undefined> {
    if (this.#buffers === undefined || !this.#store.hasPiece(digest, index)) return this.#held(digest, index)
    const lease = this.#buffers.take()
    let piece: Piece | undefined
    try {
      piece = await this.#held(digest, index, lease.data)
    } catch (err) {
      lease.release()
      throw err
    }
    if (piece?.data.buffer === lease.data.buffer) return { ...piece, lease }
    lease.release()
    return piece
  }

  async #held (digest: string, index: number, into?: Buffer): Promise<Piece | undefined> {
    const data = await this.#store.readPiece(digest, index, into === undefined ? {} : { into })
    const sha256 = this.#store.pieceDigest(digest, index)
    if (data === undefined || sha256 === undefined) return undefined
    return { data, sha256, source: 'local', trusted: this.#store.isTrusted(digest, index) }
  }

  /** Resolves once every piece of a blob handed to readers is on disk (or failed to get there). */
  async written (digest: string): Promise<void> {
    const prefix = `${digest}#`
    await Promise.all([...this.#landing].filter(([k]) => k.startsWith(prefix)).map(async ([, l]) => l.written))
  }

  /** Stops swarm fetches under way for a blob whose table the swarm dropped, and keeps only what is known genuine. */
  async abandon (digest: string): Promise<void> {
    const fetches = this.#remoteFetches.get(digest)
    this.#remoteFetches.delete(digest)
    fetches?.controller.abort(new TableDroppedError(digest))
    await this.#store.keepTrusted(digest, 'the swarm dropped its piece table')
  }

  stop (): void {
    this.#shutdown.abort()
  }

  #startFetch (task: BlobTask, index: number, lastWanted: number, priority: number, whole: boolean): Promise<Landed> {
    const source = this.#source
    if (source === undefined) return this.#startOriginRun(task, index, lastWanted, priority)
    const deferred = this.#register(task, index)
    let fetches = this.#remoteFetches.get(task.digest)
    if (fetches === undefined) {
      fetches = { controller: new AbortController(), count: 0 }
      this.#remoteFetches.set(task.digest, fetches)
    }
    fetches.count++
    const mine = fetches
    const signal = AbortSignal.any([this.#shutdown.signal, mine.controller.signal])
    /** Pieces after `index` the source took on to bring in the same answer (see `PieceSourceContext.ahead`). */
    const claimed = new Map<number, Deferred>()
    const ahead = {
      claim: (i: number): boolean => {
        if (this.#store.hasPiece(task.digest, i) || this.#busy(pieceKey(task.digest, i))) return false
        claimed.set(i, this.#register(task, i))
        return true
      },
      unclaim: (i: number): void => {
        const d = claimed.get(i)
        if (d === undefined) return
        claimed.delete(i)
        this.#unregister(task, i, d)
        // Whoever waits for it already is served by a fetch of its own.
        this.#startFetch(task, i, lastWanted, priority, whole).then(d.resolve, d.reject)
      }
    }
    void (async () => {
      try {
        const got = await source.fetch({ task: swarmTask(task), lastWanted, whole, ahead }, index, { signal })
        const rates = this.#rates
        if (rates !== undefined && got.kind === 'piece') {
          // Paid for once it came from a peer (an origin run pays for its own bytes): the next fetch waits.
          const bytes = (got.more ?? []).reduce((a, x) => a + x.data.length, got.data.length)
          await rates.download.take(bytes, { signal })
          if (priority < Priority.ON_DEMAND) await rates.prefetch.take(bytes, { signal })
        }
        if (got.kind === 'origin') {
          // This node is the piece's first fetcher (or the swarm cannot help): the origin it is.
          this.#unregister(task, index, deferred)
          this.#startOriginRun(task, index, Math.max(index, Math.min(lastWanted, got.upTo)), priority).then(deferred.resolve, deferred.reject)
          return
        }
        const landings = [this.#land(task, index, got.data, got.sha256, 'peer', deferred, got.trusted, got.lease)]
        for (const [k, x] of (got.more ?? []).entries()) {
          const d = claimed.get(index + 1 + k)
          claimed.delete(index + 1 + k)
          if (d === undefined) x.lease?.release()
          else landings.push(this.#land(task, index + 1 + k, x.data, x.sha256, 'peer', d, x.trusted, x.lease))
        }
        await Promise.all(landings)
      } catch (err) {
        deferred.reject(err)
        for (const d of claimed.values()) d.reject(err)
        claimed.clear()
      } finally {
        // A source that brought fewer than it claimed and did not say so: those come another way.
        for (const i of [...claimed.keys()]) ahead.unclaim(i)
        if (--mine.count === 0 && this.#remoteFetches.get(task.digest) === mine) this.#remoteFetches.delete(task.digest)
      }
    })()
    return deferred.promise
  }

  /** Registers pieces [index, …] that nobody is fetching yet as one origin request and starts it. */
  #startOriginRun (task: BlobTask, index: number, lastWanted: number, priority: number): Promise<Landed> {
    // The piece count follows from the blob's size alone: the store may have dropped the blob meanwhile.
    const count = pieceCount(task.size, choosePieceSize(task.size))
    // Manifests have no Range support at the origin: one request covers all of it.
    const first = task.kind === 'manifest' ? 0 : index
    const limit = task.kind === 'manifest' ? count - 1 : Math.min(lastWanted, index + this.#runs.runLength(priority) - 1)
    let last = index
    while (last < limit && !this.#store.hasPiece(task.digest, last + 1) && !this.#busy(pieceKey(task.digest, last + 1))) last++
    const deferreds = new Map<number, Deferred>()
    for (let i = first; i <= last; i++) {
      if (i === index || (!this.#store.hasPiece(task.digest, i) && !this.#busy(pieceKey(task.digest, i)))) deferreds.set(i, this.#register(task, i))
    }
    let reached = first
    void this.#runs.run(task, first, last, priority, async (i, data, sha256, lease) => {
      reached = i + 1
      const deferred = deferreds.get(i)
      if (deferred !== undefined) await this.#land(task, i, data, sha256, 'origin', deferred, true, lease)
      else lease?.release()
    }, this.#shutdown.signal).catch((err: unknown) => {
      if (!isAbort(err)) this.#source?.originFailed(swarmTask(task), err)
      for (const [i, deferred] of deferreds) if (i >= reached) deferred.reject(err)
    })
    return (deferreds.get(index) as Deferred).promise
  }

  #busy (key: string): boolean {
    return this.#inflight.has(key) || this.#landing.has(key)
  }

  /**
   * Writes a fetched piece and wakes its waiters. Origin bytes that differ
   * from the swarm's table entry mean the table is wrong (the origin is the
   * operator's registry): that is reported, this node's copy dropped, and the
   * waiters fail so they try again under the next table.
   */
  async #land (task: BlobTask, index: number, data: Buffer, sha256: string, source: 'origin' | 'peer', deferred: Deferred, trusted: boolean, lease?: Lease): Promise<void> {
    const key = pieceKey(task.digest, index)
    const expected = this.#source?.expected(task.digest, index)
    if (source === 'origin' && expected !== undefined && expected.sha256 !== sha256) {
      this.#logger.warn({ digest: task.digest, piece: index }, 'the origin contradicts the swarm\'s piece table; reporting it and dropping this copy')
      this.#source?.mismatch(swarmTask(task), { piece: index, sha256 })
      await this.abandon(task.digest)
      const err = new PieceDigestMismatchError(task.digest, index, 'origin')
      deferred.reject(err)
      throw err
    }
    // The store keeps no pooled buffer in its memory: the pool has it back once the holders are done.
    const write = this.#store.writePiece(task.digest, index, data, { sha256, source, trusted, keep: lease === undefined })
    this.#landing.set(key, { data, sha256, source, trusted, lease, written: write.catch(() => {}) })
    this.#counters.fetched(source, data.length)
    deferred.resolve({ data, sha256, source, trusted, lease })
    let written = false
    try {
      written = await write
    } catch (err) {
      if (err instanceof PieceDigestMismatchError || err instanceof BlobDigestMismatchError) throw err
      this.#logger.warn({ err, digest: task.digest, piece: index }, 'could not cache a piece; serving it from memory')
    } finally {
      this.#landing.delete(key)
      // Once in the cache, anyone late reads it there. A piece that did not get there is only in this buffer: it is never reused.
      if (written) lease?.release()
    }
  }

  #register (task: BlobTask, index: number): Deferred {
    const { promise, resolve, reject } = Promise.withResolvers<Landed>()
    // Pieces fetched ahead may find no reader; their failures must not go unhandled.
    promise.catch(() => {})
    const deferred = { promise, resolve, reject }
    this.#inflight.set(pieceKey(task.digest, index), promise)
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

/** The piece with a lease of the caller's own; undefined when its pooled buffer was already released (read it from the cache). */
function claim (piece: Piece): Piece | undefined {
  if (piece.lease === undefined) return piece
  const lease = piece.lease.share()
  return lease === undefined ? undefined : { data: piece.data, sha256: piece.sha256, source: piece.source, trusted: piece.trusted, lease }
}

/** A copy the caller may keep of a piece's bytes; as they are when they are not pooled. Undefined when the pooled buffer was released. */
function ownCopy (piece: Piece, into?: Buffer): Buffer | undefined {
  if (piece.lease === undefined) return piece.data
  if (!piece.lease.held) return undefined
  if (into !== undefined && into.length >= piece.data.length) {
    piece.data.copy(into)
    return into.subarray(0, piece.data.length)
  }
  return Buffer.from(piece.data)
}
