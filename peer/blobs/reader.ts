import { createHash } from 'node:crypto'
import { Readable, addAbortSignal } from 'node:stream'
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
  /** Pieces a reader fetches ahead of the one it is sending. Default 4. */
  readahead?: number
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

  constructor (components: ReaderComponents, init: ReaderInit = {}) {
    this.#logger = components.logger
    this.#store = components.store
    this.#acquisition = components.acquisition
    this.#runs = components.runs
    this.#counters = components.counters
    this.#source = components.source
    this.#readahead = Math.max(1, init.readahead ?? 4)
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
    for await (const chunk of stream) void chunk
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
      const ahead: Array<Promise<Piece>> = []
      let next = first + 1
      const fill = (): void => {
        while (next <= last && ahead.length < self.#readahead) {
          const p = usable(next++)
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
          const from = Math.max(start - offset, 0)
          const to = Math.min(end - offset + 1, piece.data.length)
          const slice = from === 0 && to === piece.data.length ? piece.data : piece.data.subarray(from, to)
          if (serving) self.#counters.served(piece.source, slice.length)
          yield { data: slice, sha256: piece.sha256 }
        }
      } finally {
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
