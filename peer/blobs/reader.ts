import { createHash } from 'node:crypto'
import { Readable, addAbortSignal } from 'node:stream'
import { giveBack, lend } from '../../src/buffer-pool.ts'
import { BlobDigestMismatchError, StorageError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { parseDigest, sha256Hex } from '../../src/oci/digest.ts'
import type { ByteRange } from '../../src/oci/range.ts'
import { pieceBounds, piecesCovering } from '../../src/pieces.ts'
import type { PieceWriter } from '../piece-store/index.ts'
import type { PieceSource } from '../swarm/source.ts'
import type { PieceAcquisition, Piece } from './acquisition.ts'
import type { ByteCounters } from './counters.ts'
import { Priority, swarmTask, type BlobTask, type ReadOptions } from './index.ts'
import type { OriginRuns } from './origin-runs.ts'
import { verifyWhole } from './verify.ts'

export interface ReaderComponents {
  logger: Logger
  store: PieceWriter
  acquisition: PieceAcquisition
  runs: OriginRuns
  counters: ByteCounters
  source?: PieceSource | undefined
}

export interface ReaderInit {
  /** Pieces a reader has under way ahead of the one it is sending. Default 8. */
  readahead?: number
  /**
   * How far ahead of the piece being sent those may be: within this many
   * pieces they are taken in a random order. Default 256.
   */
  window?: number
  /** Picks the pieces fetched ahead; injected for tests. */
  random?: () => number
}

/**
 * Streams the verified bytes of a blob, or of a range of it, in order.
 *
 * A whole read of a blob not yet verified here may send any piece that
 * matched the swarm's table, and hashes what it sends: its last bytes leave
 * only once the whole digest matched, and then it vouches for the blob in the
 * cache, which saves the cache a second pass. Any other read (a range, or the
 * whole of a verified blob) has no hash of its own to lean on, so it is sent
 * only pieces known genuine; a piece that is not is taken from the origin
 * (which confirms the swarm's entry, or shows it wrong).
 */
export class BlobReader {
  readonly #logger: Logger
  readonly #store: PieceWriter
  readonly #acquisition: PieceAcquisition
  readonly #runs: OriginRuns
  readonly #counters: ByteCounters
  readonly #source: PieceSource | undefined
  readonly #readahead: number
  readonly #window: number
  readonly #random: () => number

  constructor (components: ReaderComponents, init: ReaderInit = {}) {
    this.#logger = components.logger
    this.#store = components.store
    this.#acquisition = components.acquisition
    this.#runs = components.runs
    this.#counters = components.counters
    this.#source = components.source
    this.#readahead = Math.max(1, init.readahead ?? 8)
    this.#window = Math.max(this.#readahead, init.window ?? 256)
    this.#random = init.random ?? Math.random
  }

  /** The first piece is in hand before this resolves, so a failure to start is a clean error rather than a cut response. */
  async read (task: BlobTask, range: ByteRange | undefined, options: ReadOptions): Promise<Readable> {
    return this.#read(task, range, options, true)
  }

  /**
   * Makes the cache hold the whole blob, verified: a whole read whose bytes
   * go nowhere (a prefetch, a preheat, a seed's fetch), so they count as
   * fetched but not as served.
   */
  async fill (task: BlobTask, options: ReadOptions): Promise<void> {
    if (this.#store.track(task.digest, task.size, { mediaType: task.mediaType }).verified) return
    const stream = await this.#read(task, undefined, options, false)
    for await (const chunk of stream) giveBack(chunk)
    if (this.#store.info(task.digest)?.verified !== true && !await this.#store.verifyBlob(task.digest)) {
      throw new StorageError(`blob ${task.digest} could not be kept whole in the cache`)
    }
  }

  async #read (task: BlobTask, range: ByteRange | undefined, options: ReadOptions, serving: boolean): Promise<Readable> {
    const info = this.#store.track(task.digest, task.size, { mediaType: task.mediaType })
    if (task.size === 0) {
      if (!await this.#store.verifyBlob(task.digest)) throw new BlobDigestMismatchError(task.digest, 'the empty blob')
      return Readable.from([])
    }
    const start = range?.start ?? 0
    const end = range?.end ?? task.size - 1
    const hashing = start === 0 && end === task.size - 1 && !info.verified
    if (!hashing && info.verified) {
      // Verified whole and checked piece by piece in this run: the file's bytes go out as a plain file server sends them.
      const file = await this.#store.openVerified(task.digest, start, end)
      if (file !== undefined) {
        if (options.signal !== undefined) addAbortSignal(options.signal, file)
        if (serving) file.once('end', () => { this.#counters.served('local', end - start + 1) })
        return file
      }
    }
    const { first, last } = piecesCovering(start, end, info.pieceSize)
    const unpin = this.#store.pin(task.digest)
    const signal = options.signal
    const priority = options.priority ?? Priority.ON_DEMAND
    const usable = async (i: number): Promise<Piece> => this.#usable(task, i, last, signal, priority, hashing)
    let firstPiece: Piece
    try {
      firstPiece = await usable(first)
    } catch (err) {
      unpin()
      throw err
    }

    const self = this
    async function * pieces (): AsyncGenerator<{ data: Buffer, sha256: string }> {
      const ahead = new Ahead(self.#readahead, self.#window, self.#random, (i) => {
        const p = usable(i)
        // Read-ahead may be abandoned when the client leaves; its failure is not ours to report then.
        p.catch(() => {})
        return p
      }, (i) => self.#store.hasPiece(task.digest, i), () => self.#source?.settled?.(task.digest) !== true)
      try {
        for (let i = first; i <= last; i++) {
          const piece = i === first ? firstPiece : await ahead.take(i)
          ahead.fill(i + 1, last)
          const { offset, length } = pieceBounds(i, task.size, info.pieceSize)
          if (piece.data.length !== length) {
            piece.lease?.release()
            throw new StorageError(`piece ${i} of ${task.digest} is ${piece.data.length} bytes, expected ${length}`)
          }
          const from = Math.max(start - offset, 0)
          const to = Math.min(end - offset + 1, piece.data.length)
          const slice = from === 0 && to === piece.data.length ? piece.data : piece.data.subarray(from, to)
          if (serving) self.#counters.served(ahead.sourceOf(i, piece.source), slice.length)
          // A pooled buffer goes back once whoever consumes the stream says it is done with the chunk (giveBack).
          if (piece.lease !== undefined) lend(slice, piece.lease.release)
          yield { data: slice, sha256: piece.sha256 }
        }
      } finally {
        ahead.clear()
        unpin()
      }
    }
    async function * bytes (): AsyncGenerator<Buffer> {
      for await (const piece of pieces()) yield piece.data
    }
    if (!hashing) return Readable.from(bytes(), { objectMode: false, highWaterMark: 64 * 1024 })
    async function * verified (): AsyncGenerator<Buffer> {
      const table = createHash('sha256')
      async function * tabled (): AsyncGenerator<Buffer> {
        // The table this read checked its pieces against: each piece's SHA-256, in order.
        for await (const piece of pieces()) {
          table.update(Buffer.from(piece.sha256, 'hex'))
          yield piece.data
        }
      }
      const vouch = async (): Promise<void> => {
        // Every piece handed out is on its way to the cache; once there, this hash covers the blob it holds.
        await self.#acquisition.written(task.digest)
        self.#store.attest(task.digest, table.copy().digest('hex'))
      }
      try {
        yield * verifyWhole(tabled(), parseDigest(task.digest), task.size, vouch)
      } catch (err) {
        if (err instanceof BlobDigestMismatchError) {
          // Every piece matched the table and the whole did not: the table is wrong, and so is what the cache holds of it.
          self.#logger.error({ digest: task.digest, err: err.message }, 'the blob read does not match its digest; dropping the cached copy')
          self.#source?.mismatch(swarmTask(task), { table: table.digest('hex') })
          await self.#acquisition.written(task.digest)
          await self.#store.remove(task.digest, 'digest-mismatch')
        }
        throw err
      }
    }
    return Readable.from(verified(), { objectMode: false, highWaterMark: 64 * 1024 })
  }

  /** A piece a read may send: unless the read hashes the whole blob, one known genuine (taken from the origin when the swarm's is not). */
  async #usable (task: BlobTask, index: number, lastWanted: number, signal: AbortSignal | undefined, priority: number, hashing: boolean): Promise<Piece> {
    const piece = await this.#acquisition.acquire(task, index, lastWanted, signal, priority, hashing)
    if (hashing || piece.trusted) return piece
    return this.#originPiece(task, index, signal, priority)
  }

  /**
   * A range read's piece whose entry only its author vouches for, and that
   * reached this node without a confirmation: the origin is asked for exactly
   * that piece. Equal to the swarm's entry, it is now trusted here and
   * confirms the entry swarm-wide; different, the table is wrong: that is
   * reported, this node's copy dropped, and the origin's bytes are what the
   * reader gets.
   */
  async #originPiece (task: BlobTask, index: number, signal: AbortSignal | undefined, priority: number): Promise<Piece> {
    const data = await this.#runs.piece(task, index, priority, signal ?? AbortSignal.timeout(120_000))
    const hex = sha256Hex(data)
    this.#counters.fetched('origin', data.length)
    const expected = this.#source?.expected(task.digest, index)?.sha256 ?? this.#store.pieceDigest(task.digest, index)
    if (expected !== undefined && expected !== hex) {
      this.#logger.warn({ digest: task.digest, piece: index }, 'the origin contradicts the swarm\'s piece table; reporting it and dropping this copy')
      this.#source?.mismatch(swarmTask(task), { piece: index, sha256: hex })
      await this.#acquisition.abandon(task.digest)
      return { data, sha256: hex, source: 'origin', trusted: true }
    }
    await this.#store.writePiece(task.digest, index, data, { sha256: hex, source: 'origin' }).catch((err: unknown) => {
      this.#logger.debug({ err, digest: task.digest, piece: index }, 'could not keep a piece confirmed from the origin')
    })
    return { data, sha256: hex, source: 'origin', trusted: true }
  }
}

/**
 * The pieces a reader has asked for ahead of the one it sends: at most
 * `inflight` at once, anywhere within `window` pieces of it, picked at
 * random. A fleet reading one blob in step asks for the same next pieces at
 * the same moment; fetched in order they all come from the few nodes that
 * got them first (the seed, mostly), while taken in different orders they
 * are spread over the fleet, whose nodes then have pieces to give each other
 * (fleet simulation, 200 peers: p50 22.7× the lower bound in order, 4.1×
 * this way).
 *
 * Only pieces near the head keep their bytes here; one that landed further
 * ahead is let go (it is in the cache: taking it again reads it there), so a
 * reader holds at most `inflight` pieces besides the one it sends.
 *
 * When the swarm offers only parents that hold the whole blob, nobody's
 * order matters and the pieces are taken in order: read back from disk, a
 * piece let go cost a relaying peer a third more CPU per byte and its reader
 * a third of its speed (one hop, 512 MiB: 10 against 14.5 ms per MiB).
 */
class Ahead {
  readonly #inflight: number
  readonly #window: number
  readonly #random: () => number
  readonly #start: (index: number) => Promise<Piece>
  readonly #held: (index: number) => boolean
  readonly #spread: () => boolean
  readonly #started = new Map<number, { promise: Promise<Piece>, settled: boolean }>()
  /** Where pieces let go came from, for the byte counters. */
  readonly #sources = new Map<number, Piece['source']>()
  #head = 0
  #last = -1
  #closed = false

  constructor (inflight: number, window: number, random: () => number, start: (index: number) => Promise<Piece>, held: (index: number) => boolean, spread: () => boolean) {
    this.#inflight = inflight
    this.#window = window
    this.#random = random
    this.#start = start
    this.#held = held
    this.#spread = spread
  }

  /** The piece at the head: the one asked for ahead, or asked for now. */
  async take (index: number): Promise<Piece> {
    const started = this.#started.get(index)
    this.#started.delete(index)
    // Pieces landing meanwhile start more from the next one on, not this one again.
    this.#head = Math.max(this.#head, index + 1)
    return started === undefined ? this.#start(index) : started.promise
  }

  /** Where a piece came from: its first fetch's source when it was let go and taken again from the cache. */
  sourceOf (index: number, source: Piece['source']): Piece['source'] {
    const first = this.#sources.get(index)
    this.#sources.delete(index)
    return first ?? source
  }

  /**
   * Starts pieces from `head` on, up to `last`: `head` itself first, then at
   * random within the window; again each time one of them lands.
   */
  fill (head: number, last: number): void {
    this.#head = head
    this.#last = last
    this.#refill()
  }

  #refill (): void {
    const head = this.#head
    const last = this.#last
    if (this.#closed || head > last) return
    if (!this.#started.has(head)) this.#add(head)
    const spread = this.#spread()
    const end = Math.min(last, head + (spread ? this.#window : this.#inflight) - 1)
    let candidates: number[] | undefined
    while (this.#running() < this.#inflight) {
      candidates ??= this.#candidates(head + 1, end)
      if (candidates.length === 0) return
      // Bytes in hand are let go only to make room for a piece that is to be started.
      if (this.#started.size >= this.#inflight && !this.#letGo(head)) return
      if (!spread) {
        this.#add(candidates.shift() as number)
        continue
      }
      // Nearer pieces more often (the cube of a uniform draw): they are wanted sooner, and their bytes are
      // more likely still in hand or in memory when the head gets there; further ones keep the fleet's orders apart.
      const k = Math.floor(this.#random() ** 3 * candidates.length)
      this.#add(candidates.splice(k, 1)[0] as number)
    }
  }

  /** The reader is done: nothing more is started, and nothing is kept. */
  clear (): void {
    this.#closed = true
    for (const e of this.#started.values()) release(e.promise)
    this.#started.clear()
    this.#sources.clear()
  }

  #add (index: number): void {
    const entry = { promise: this.#start(index), settled: false }
    this.#started.set(index, entry)
    entry.promise.then((piece) => {
      entry.settled = true
      if (this.#closed) return
      this.#sources.set(index, piece.source)
      this.#refill()
    }, () => {
      // A failed piece is asked for again when it reaches the head, where its error is reported.
      if (this.#started.get(index) === entry) this.#started.delete(index)
    })
  }

  #running (): number {
    let n = 0
    for (const e of this.#started.values()) if (!e.settled) n++
    return n
  }

  /** Lets go of the landed piece furthest from the head; false when none has landed. */
  #letGo (head: number): boolean {
    let far: number | undefined
    for (const [i, e] of this.#started) if (e.settled && i !== head && (far === undefined || i > far)) far = i
    if (far === undefined) return false
    release((this.#started.get(far) as { promise: Promise<Piece> }).promise)
    this.#started.delete(far)
    return true
  }

  #candidates (from: number, to: number): number[] {
    const out: number[] = []
    // A piece that landed for this reader is not asked for again before the head reaches it, held yet or not (its write may still be under way).
    for (let i = from; i <= to; i++) if (!this.#started.has(i) && !this.#sources.has(i) && !this.#held(i)) out.push(i)
    return out
  }
}

/** Lets go of a piece's pooled buffer, now or when it lands. */
function release (piece: Promise<Piece>): void {
  piece.then(p => { p.lease?.release() }, () => {})
}
