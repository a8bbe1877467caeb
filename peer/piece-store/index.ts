import type { Readable } from 'node:stream'
import type { AbortOptions } from '../../src/abort.ts'
import type { Logger } from '../../src/logger.ts'
import type { Registry } from '../../src/metrics.ts'
import { DiskPieceStore } from './disk-store.ts'

export interface PieceStoreComponents {
  logger: Logger
  metrics?: Registry | undefined
}

export interface PieceStoreInit {
  /** Root of everything the store writes; nothing is read or written outside it. */
  dataDir: string
  /** Byte quota for piece data; least recently used blobs are evicted past it. Default `DEFAULTS.cacheSize`. */
  quotaBytes?: number
  /** Verified pieces kept in memory for repeated range reads. Default `DEFAULTS.memoryCacheSize`. */
  memoryCacheBytes?: number
  /** Metadata of a changing blob is written at most this often. Default 250 ms. */
  flushDelayMs?: number
  /** Past this share (0–1) of the data dir's file system in use, blobs are evicted… Default 0.9. */
  diskHighWatermark?: number
  /** …until it is under this one. Default 0.8. */
  diskLowWatermark?: number
  /** Blobs unused this long are evicted; 0 keeps them. Default 0. */
  ttlMs?: number
  /** How often the file system and the TTL are checked. Default 10 s. */
  gcIntervalMs?: number
}

/** What the store knows about one blob. A snapshot: read it again after awaiting. */
export interface BlobInfo {
  readonly digest: string
  readonly size: number
  readonly pieceSize: number
  readonly pieceCount: number
  /** For manifests: the media type the origin gave, served back as Content-Type. */
  readonly mediaType: string | undefined
  /** Number of pieces held on disk. */
  readonly heldCount: number
  /** Every piece is held. */
  readonly complete: boolean
  /** Every piece is held and the whole blob hashed to its digest. */
  readonly verified: boolean
}

export type PieceSource = 'origin' | 'peer' | 'local'

export interface WritePieceOptions extends AbortOptions {
  /** SHA-256 hex of `data` when the caller already computed it while verifying. */
  sha256?: string | undefined
  /** Where the bytes came from, for metrics and for who to blame on a digest mismatch. */
  source?: PieceSource
  /**
   * The bytes are known genuine: they came from the origin (always the case
   * for `source: 'origin'`), or they matched a table entry someone other than
   * its author vouched for. Only such pieces are served to range reads; any
   * held piece is fine for a whole-blob read, which checks the digest.
   */
  trusted?: boolean
  /**
   * Keep the buffer in the hot-piece memory afterwards (default true). False
   * for a buffer that goes back to a pool once written: the store must not
   * hand out bytes that will be overwritten.
   */
  keep?: boolean
}

export interface StoreEvents {
  /** A piece was written and is servable (or, from the origin, confirmed a piece already held). */
  piece: (digest: string, index: number, sha256: string, source: PieceSource) => void
  /** A blob is complete and its whole digest checked. */
  verified: (digest: string) => void
  /**
   * A blob whose every piece matched its recorded SHA-256 did not match its
   * digest (it is being removed): the table those pieces were checked against
   * is wrong. `table` is the SHA-256 of that table (the pieces' SHA-256s, concatenated).
   */
  mismatch: (digest: string, table: string) => void
  /** A blob (or a piece of it, when `index` is set) is gone: evicted, corrupt or removed. */
  removed: (digest: string, reason: string, index?: number) => void
}

/** What the data path reads through: held pieces, checked against their SHA-256 before a byte of them is returned. */
export interface PieceReader {
  info: (digest: string) => BlobInfo | undefined
  hasPiece: (digest: string, index: number) => boolean
  /** Whether a held piece is known genuine (see `WritePieceOptions.trusted`). */
  isTrusted: (digest: string, index: number) => boolean
  /** The recorded SHA-256 (hex) of a held piece. */
  pieceDigest: (digest: string, index: number) => string | undefined
  /**
   * Reads a held piece, checking bytes from disk against the recorded SHA-256
   * the first time this process reads them. Returns `undefined` when the
   * piece is not held or failed that check (it is then dropped and must be
   * fetched again); never returns bytes that did not match the recorded digest.
   * With `into` (at least the piece's length) a piece not in memory is read
   * into it and not kept in memory: the caller may reuse the buffer once done.
   */
  readPiece: (digest: string, index: number, options?: AbortOptions & { into?: Buffer }) => Promise<Buffer | undefined>
  /**
   * Bytes `start`..`end` (inclusive) of a blob verified whole, as a file
   * stream, when every piece they cover was checked by this process; else
   * `undefined` (read piece by piece). Such bytes need no hashing: the stream
   * is what a plain file server sends. The blob stays pinned until it closes.
   */
  openVerified: (digest: string, start: number, end: number) => Promise<Readable | undefined>
  /**
   * Keeps a blob from eviction while it is read or written; call the returned
   * function to release. A pinned blob's background whole-blob check waits
   * until the last pin goes: the reader holding it may vouch for it instead.
   */
  pin: (digest: string) => () => void
}

/** What the data path writes through. */
export interface PieceWriter extends PieceReader {
  /**
   * Starts tracking a blob of known size (or returns the existing entry). A
   * size that contradicts what is recorded drops the old entry: digests are
   * immutable, so one of the two is wrong and the one on disk cannot be proven.
   */
  track: (digest: string, size: number, options?: { mediaType?: string | undefined }) => BlobInfo
  /**
   * Writes a piece. Throws `PieceDigestMismatchError` when `data` contradicts
   * the SHA-256 recorded for a piece already held. Returns false when the
   * quota left no room (the bytes are still good to serve, just not kept).
   * A write that completes a blob nobody has pinned starts its whole-blob
   * check in the background (a blob that fails it is removed).
   */
  writePiece: (digest: string, index: number, data: Buffer, options?: WritePieceOptions) => Promise<boolean>
  /** Hashes a complete blob unless verified already: true when it matched its digest (false when not, or not complete). */
  verifyBlob: (digest: string) => Promise<boolean>
  /**
   * A reader hashed the whole blob to its digest, from pieces whose SHA-256s,
   * in order, hash to `table`: when those are the pieces held here, the blob
   * is verified without another pass. Returns whether it is verified now.
   */
  attest: (digest: string, table: string) => boolean
  remove: (digest: string, reason: string) => Promise<void>
  /**
   * The swarm's table for a blob was wrong: keeps what is known genuine (a
   * blob verified whole here, or pieces taken from the origin or matched to
   * confirmed entries) and drops every other piece. A blob left with no piece
   * is removed.
   */
  keepTrusted: (digest: string, reason: string) => Promise<void>
}

/** What this peer announces to the swarm from: its inventory and what changes in it. */
export interface PieceInventory {
  info: (digest: string) => BlobInfo | undefined
  list: () => BlobInfo[]
  /** Indices of held pieces. */
  heldPieces: (digest: string) => number[]
  /** The recorded SHA-256 (hex) of a held piece. */
  pieceDigest: (digest: string, index: number) => string | undefined
  on: <E extends keyof StoreEvents>(event: E, listener: StoreEvents[E]) => void
  off: <E extends keyof StoreEvents>(event: E, listener: StoreEvents[E]) => void
}

export interface PieceStore extends PieceWriter, PieceInventory {
  start: () => Promise<void>
  /** Waits for writes under way, writes pending metadata and closes every file. */
  stop: () => Promise<void>
  usage: () => { bytes: number, quotaBytes: number, blobs: number }
  /** Evicts now what the disk's watermarks and the TTL call for (it also runs on a timer). */
  sweep: () => Promise<void>
}

export function createPieceStore (components: PieceStoreComponents, init: PieceStoreInit): PieceStore {
  return new DiskPieceStore(components, init)
}
