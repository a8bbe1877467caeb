import type { FileHandle } from 'node:fs/promises'
import type { Digest } from '../../src/oci/digest.ts'
import { PieceSet } from '../../src/pieces.ts'
import type { BlobInfo } from './index.ts'

export const SHA256_BYTES = 32

/** One open descriptor of a blob's data file, shared by the reads and writes under way. */
export interface SharedHandle {
  readonly fh: Promise<FileHandle>
  users: number
  idle: NodeJS.Timeout | undefined
}

/**
 * What the store keeps about one blob. The modules beside this one each own a
 * few of its fields: handles.ts `handle`, metadata.ts the flush fields,
 * whole-hash.ts the hash fields; the store itself the rest.
 */
export interface Entry {
  readonly digest: Digest
  readonly dir: string
  readonly size: number
  readonly pieceSize: number
  readonly count: number
  mediaType: string | undefined
  readonly held: PieceSet
  /** Held pieces known genuine: from the origin, matched to a confirmed entry, or in a verified blob. */
  readonly trusted: PieceSet
  /** count × 32 bytes: each held piece's SHA-256, recorded when it was written. */
  readonly digests: Buffer
  /**
   * Held pieces whose bytes on disk this process has matched with their
   * SHA-256: written by it, or read back and checked once. Not persisted: after
   * a restart every piece is checked again on its first read.
   */
  readonly checked: PieceSet
  verified: boolean
  pins: number
  /** When it was last read or written (ms since the epoch); load time after a restart. For the cache TTL. */
  usedAt: number
  removed: boolean
  fileReady: Promise<void> | undefined
  handle: SharedHandle | undefined
  flushTimer: NodeJS.Timeout | undefined
  flushing: Promise<void>
  dirty: boolean
  /** The whole-blob hash under way (whole-hash.ts), if any. */
  hashing: Promise<void> | undefined
  mismatch: string | undefined
}

export function newEntry (digest: Digest, dir: string, size: number, pieceSize: number, count: number, mediaType: string | undefined): Entry {
  return {
    digest,
    dir,
    size,
    pieceSize,
    count,
    mediaType,
    held: new PieceSet(count),
    trusted: new PieceSet(count),
    digests: Buffer.alloc(count * SHA256_BYTES),
    checked: new PieceSet(count),
    verified: false,
    pins: 0,
    usedAt: Date.now(),
    removed: false,
    fileReady: undefined,
    handle: undefined,
    flushTimer: undefined,
    flushing: Promise.resolve(),
    dirty: false,
    hashing: undefined,
    mismatch: undefined
  }
}

/** The recorded SHA-256 (hex) of a held piece. */
export function pieceDigestOf (entry: Entry, index: number): string | undefined {
  if (!entry.held.has(index)) return undefined
  return entry.digests.subarray(index * SHA256_BYTES, (index + 1) * SHA256_BYTES).toString('hex')
}

export function snapshot (entry: Entry): BlobInfo {
  return {
    digest: entry.digest.value,
    size: entry.size,
    pieceSize: entry.pieceSize,
    pieceCount: entry.count,
    mediaType: entry.mediaType,
    heldCount: entry.held.size,
    complete: entry.held.complete,
    verified: entry.verified
  }
}
