import { createHash } from 'node:crypto'
import type { Entry } from './entry.ts'

export interface WholeHashEvents {
  /** The blob hashed to its digest. */
  verified: (entry: Entry) => void
  /** It did not: `actual` is what it hashed to. */
  mismatch: (entry: Entry, actual: string) => void
}

/**
 * The whole-blob check, done as pieces land: each blob is hashed over the
 * contiguous prefix of pieces it holds, so an in-order download learns
 * whether the blob matches its digest the moment the last piece is written,
 * before that piece is handed to anyone. Steps run one at a time per blob.
 */
export class WholeHasher {
  readonly #events: WholeHashEvents
  readonly #read: (entry: Entry, index: number) => Promise<Buffer | undefined>

  /** `read` fetches a held piece (verified against its own digest) that is not in hand. */
  constructor (events: WholeHashEvents, read: (entry: Entry, index: number) => Promise<Buffer | undefined>) {
    this.#events = events
    this.#read = read
  }

  /** Feeds the hash with every piece of the prefix now held; `justWritten` saves a read of the piece just written. */
  async advance (entry: Entry, justIndex: number, justWritten: Buffer | undefined): Promise<void> {
    const step = async (): Promise<void> => {
      while (!entry.removed && !entry.verified && entry.hashedUpTo < entry.count && entry.held.has(entry.hashedUpTo)) {
        const i = entry.hashedUpTo
        const buf = i === justIndex && justWritten !== undefined ? justWritten : await this.#read(entry, i)
        if (buf === undefined || entry.hashedUpTo !== i) return
        entry.hasher ??= createHash(entry.digest.algorithm)
        entry.hasher.update(buf)
        entry.hashedUpTo++
      }
      if (entry.removed || entry.verified || entry.hashedUpTo < entry.count || entry.hasher === undefined) {
        if (entry.count === 0 && !entry.verified) this.#finish(entry, createHash(entry.digest.algorithm).digest('hex'))
        return
      }
      this.#finish(entry, entry.hasher.digest('hex'))
    }
    entry.hashChain = entry.hashChain.then(step, step)
    await entry.hashChain
  }

  /** Starts over (a piece of the prefix went). */
  reset (entry: Entry): void {
    entry.verified = false
    entry.hasher = undefined
    entry.hashedUpTo = 0
  }

  #finish (entry: Entry, actualHex: string): void {
    entry.hasher = undefined
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
