import { pieceBounds } from '../../src/pieces.ts'
import type { Entry } from './entry.ts'

/**
 * The byte quota of the cache. Bytes are reserved before a write starts, so
 * concurrent writers see each other; past the quota, least recently used
 * blobs nobody has pinned are evicted until the new bytes fit.
 */
export class Quota {
  readonly limit: number
  #used = 0

  constructor (limit: number) {
    this.limit = limit
  }

  get used (): number { return this.#used }

  reserve (bytes: number): void { this.#used += bytes }
  release (bytes: number): void { this.#used -= bytes }

  /**
   * Makes room for `bytes` more by evicting from `entries` (least recently
   * used first), never `forEntry`, a pinned blob or one holding nothing.
   * Whether the bytes fit now.
   */
  makeRoom (bytes: number, forEntry: Entry | undefined, entries: Iterable<Entry>, evict: (entry: Entry) => void): boolean {
    if (this.#used + bytes <= this.limit) return true
    for (const entry of [...entries]) {
      if (this.#used + bytes <= this.limit) break
      if (entry === forEntry || entry.pins > 0 || entry.held.size === 0) continue
      evict(entry)
    }
    return this.#used + bytes <= this.limit
  }
}

/** Bytes of piece data a blob holds. */
export function heldBytes (entry: Entry): number {
  if (entry.held.complete) return entry.size
  let bytes = 0
  for (const i of entry.held) bytes += pieceBounds(i, entry.size, entry.pieceSize).length
  return bytes
}
