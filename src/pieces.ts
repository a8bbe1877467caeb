/**
 * Piece math. A blob is cut into fixed-size pieces; the piece size is a pure
 * function of the blob size, so every peer that learns a blob's size agrees on
 * its pieces without asking anyone.
 */

export const MIB = 1024 * 1024

/** Smallest piece: nydusd reads ~1 MiB at a time, so a range costs about one piece. */
export const MIN_PIECE_SIZE = 1 * MIB
/** Largest piece: bounds the memory a single in-flight piece can take. */
export const MAX_PIECE_SIZE = 16 * MIB
/** Pieces per blob before the piece size starts to grow (keeps piece tables small). */
export const TARGET_MAX_PIECES = 4096

export function choosePieceSize (size: number): number {
  let pieceSize = MIN_PIECE_SIZE
  while (pieceSize < MAX_PIECE_SIZE && Math.ceil(size / pieceSize) > TARGET_MAX_PIECES) pieceSize *= 2
  return pieceSize
}

export function pieceCount (size: number, pieceSize: number): number {
  return Math.ceil(size / pieceSize)
}

/** Byte offset and length of piece `index`. */
export function pieceBounds (index: number, size: number, pieceSize: number): { offset: number, length: number } {
  const offset = index * pieceSize
  return { offset, length: Math.min(pieceSize, size - offset) }
}

/** First and last piece (inclusive) covering bytes [start, end]. */
export function piecesCovering (start: number, end: number, pieceSize: number): { first: number, last: number } {
  return { first: Math.floor(start / pieceSize), last: Math.floor(end / pieceSize) }
}

/** A fixed-size bitset of held pieces, serialisable to base64 for metadata and the wire. */
export class PieceSet {
  readonly count: number
  readonly #bits: Uint8Array
  #held = 0

  constructor (count: number, bits?: Uint8Array) {
    this.count = count
    this.#bits = new Uint8Array(Math.ceil(count / 8))
    if (bits !== undefined) {
      this.#bits.set(bits.subarray(0, this.#bits.length))
      // Bits past `count` are noise from a foreign encoder; drop them.
      const tail = count % 8
      if (tail !== 0 && this.#bits.length > 0) this.#bits[this.#bits.length - 1]! &= (1 << tail) - 1
      for (const byte of this.#bits) this.#held += popcount(byte)
    }
  }

  static fromBase64 (count: number, b64: string): PieceSet {
    return new PieceSet(count, Buffer.from(b64, 'base64'))
  }

  has (i: number): boolean {
    return i >= 0 && i < this.count && ((this.#bits[i >> 3]! >> (i & 7)) & 1) === 1
  }

  add (i: number): boolean {
    if (i < 0 || i >= this.count || this.has(i)) return false
    this.#bits[i >> 3]! |= 1 << (i & 7)
    this.#held++
    return true
  }

  delete (i: number): boolean {
    if (!this.has(i)) return false
    this.#bits[i >> 3]! &= ~(1 << (i & 7))
    this.#held--
    return true
  }

  get size (): number {
    return this.#held
  }

  clear (): void {
    this.#bits.fill(0)
    this.#held = 0
  }

  get complete (): boolean {
    return this.#held === this.count
  }

  * [Symbol.iterator] (): IterableIterator<number> {
    for (let i = 0; i < this.count; i++) if (this.has(i)) yield i
  }

  toBase64 (): string {
    return Buffer.from(this.#bits).toString('base64')
  }
}

function popcount (b: number): number {
  let n = 0
  while (b !== 0) { n += b & 1; b >>= 1 }
  return n
}
