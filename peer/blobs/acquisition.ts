import { raceSignal } from '../../src/abort.ts'
import {
  BlobDigestMismatchError, BlobUnknownError, DeniedError, ManifestUnknownError, OriginStatusError,
  PieceDigestMismatchError, RangeNotSatisfiableError, TableDroppedError, UnauthorizedError, isAbort
} from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { choosePieceSize, pieceCount } from '../../src/pieces.ts'
import type { RateLimits } from '../../src/rate.ts'
import type { PieceWriter } from '../piece-store/index.ts'
import type { PieceSource } from '../swarm/source.ts'
import type { ByteCounters, Source } from './counters.ts'
import { Priority, swarmTask, type BlobTask } from './index.ts'
import type { OriginRuns } from './origin-runs.ts'

/** A verified piece in hand. */
export interface Piece {
  data: Buffer
  /** SHA-256 (hex) of `data`: what it was checked against. */
  sha256: string
  source: Source
  /** Known genuine (see `RemotePiece.trusted`); origin bytes always are. */
  trusted: boolean
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
    this.#attempts = Math.max(1, init.attempts ?? 3)
  }

  /** One verified piece, from wherever it can be had; retried a bounded number of times. */
  async acquire (task: BlobTask, index: number, lastWanted: number, signal: AbortSignal | undefined, priority: number, whole: boolean): Promise<Piece> {
    let lastError: unknown
    for (let attempt = 0; attempt < this.#attempts; attempt++) {
      signal?.throwIfAborted()
      const local = await this.#held(task.digest, index)
      if (local !== undefined) return local
      const key = pieceKey(task.digest, index)
      const landing = this.#landing.get(key)
      if (landing !== undefined) return { data: landing.data, sha256: landing.sha256, source: landing.source, trusted: landing.trusted }
      const pending = this.#inflight.get(key) ?? this.#startFetch(task, index, lastWanted, priority, whole)
      try {
        return await raceSignal(pending, signal)
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

  /** A piece held here (on disk, or landed and still being written), without fetching anything. */
  async peek (digest: string, index: number, into?: Buffer): Promise<Buffer | undefined> {
    return (await this.#held(digest, index, into))?.data ?? this.#landing.get(pieceKey(digest, index))?.data
  }

  /** The piece's bytes once a fetch under way here lands them; undefined when none is under way. */
  whenLanded (digest: string, index: number): Promise<Buffer> | undefined {
    return this.#inflight.get(pieceKey(digest, index))?.then(landed => landed.data)
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
    void (async () => {
      try {
        const got = await source.fetch({ task: swarmTask(task), lastWanted, whole }, index, { signal })
        const rates = this.#rates
        if (rates !== undefined && got.kind === 'piece') {
          // Paid for once it came from a peer (an origin run pays for its own bytes): the next fetch waits.
          await rates.download.take(got.data.length, { signal })
          if (priority < Priority.ON_DEMAND) await rates.prefetch.take(got.data.length, { signal })
        }
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
    void this.#runs.run(task, first, last, priority, async (i, data, sha256) => {
      reached = i + 1
      const deferred = deferreds.get(i)
      if (deferred !== undefined) await this.#land(task, i, data, sha256, 'origin', deferred, true)
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
  async #land (task: BlobTask, index: number, data: Buffer, sha256: string, source: 'origin' | 'peer', deferred: Deferred, trusted: boolean): Promise<void> {
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
    const write = this.#store.writePiece(task.digest, index, data, { sha256, source, trusted })
    this.#landing.set(key, { data, sha256, source, trusted, written: write.catch(() => {}) })
    this.#counters.fetched(source, data.length)
    deferred.resolve({ data, sha256, source, trusted })
    try {
      await write
    } catch (err) {
      if (err instanceof PieceDigestMismatchError || err instanceof BlobDigestMismatchError) throw err
      this.#logger.warn({ err, digest: task.digest, piece: index }, 'could not cache a piece; serving it from memory')
    } finally {
      this.#landing.delete(key)
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
