import { createHash } from 'node:crypto'
import { SHA256_BYTES, type Entry } from './entry.ts'

export interface WholeHashEvents {
  /** The blob hashed to its digest. */
  verified: (entry: Entry) => void
  /** It did not: `actual` is what it hashed to. */
  mismatch: (entry: Entry, actual: string) => void
}

/**
 * The whole-blob check. Hashing a blob costs a pass over every byte, so it is
 * done once, by whoever already has the bytes in order: a whole read hashes
 * what it sends and then vouches for the blob (`attest`) with the SHA-256s of
 * the pieces it hashed; a blob completed some other way (range reads, pieces
 * from several sources) is hashed here, reading its pieces back, one blob at
 * a time per entry.
 */
export class WholeHasher {
  readonly #events: WholeHashEvents
  readonly #read: (entry: Entry, index: number, into: Buffer) => Promise<Buffer | undefined>

  /** `read` fetches a held piece (checked against its own SHA-256), into the buffer given when it is not in memory. */
  constructor (events: WholeHashEvents, read: (entry: Entry, index: number, into: Buffer) => Promise<Buffer | undefined>) {
    this.#events = events
    this.#read = read
  }

  /** Hashes a complete blob, unless it is verified already or a piece goes meanwhile. */
  async verify (entry: Entry): Promise<void> {
    entry.hashing ??= this.#hash(entry).finally(() => { entry.hashing = undefined })
    await entry.hashing
  }

  /**
   * A reader hashed the whole blob to its digest, from pieces whose SHA-256s
   * hash to `table`. When those are the SHA-256s recorded for the pieces held
   * here (all of them), the blob held here is the blob that was hashed.
   */
  attest (entry: Entry, table: string): boolean {
    if (entry.removed || entry.verified) return entry.verified
    if (!entry.held.complete || tableOf(entry) !== table) return false
    this.#finish(entry, entry.digest.hex)
    return true
  }

  /** A piece went: whatever was verified no longer is. */
  reset (entry: Entry): void {
    entry.verified = false
  }

  async #hash (entry: Entry): Promise<void> {
    if (entry.removed || entry.verified || !entry.held.complete) return
    const hash = createHash(entry.digest.algorithm)
    const before = tableOf(entry)
    // One buffer for the pass: a fresh one per piece would be a blob's worth of garbage.
    const into = Buffer.allocUnsafeSlow(entry.pieceSize)
    for (let i = 0; i < entry.count; i++) {
      const buf = await this.#read(entry, i, into)
      // A piece failed its own check or was dropped: the blob is not complete any more.
      if (buf === undefined || entry.removed || entry.verified) return
      hash.update(buf)
    }
    // A piece replaced while we read would make this hash meaningless.
    if (!entry.held.complete || tableOf(entry) !== before) return
    this.#finish(entry, hash.digest('hex'))
  }

  #finish (entry: Entry, actualHex: string): void {
    if (actualHex === entry.digest.hex) {
      entry.verified = true
      for (const i of entry.held) entry.trusted.add(i)
      this.#events.verified(entry)
      return
    }
    entry.mismatch = `${entry.digest.algorithm}:${actualHex}`
    this.#events.mismatch(entry, entry.mismatch)
  }
}

/** The SHA-256 of a blob's piece table: its pieces' SHA-256s, in order. */
export function tableOf (entry: Entry): string {
  return createHash('sha256').update(entry.digests.subarray(0, entry.count * SHA256_BYTES)).digest('hex')
}
