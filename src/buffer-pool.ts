import { Gauge, type Registry } from './metrics.ts'

/**
 * Piece-sized buffers, reused. A fresh megabyte per piece is external memory
 * to V8, and at line rate every 64 MiB of it started a full mark of the heap:
 * a relaying peer spent about a third of its CPU in the collector (one hop,
 * 512 MiB: 12.2–13.0 ms per MiB with a fresh buffer per received piece,
 * 8.4–9.0 with reused ones).
 *
 * A buffer may be held by several parties at once (the disk write, readers,
 * a response on its way to a socket). Each holds a `Lease` of its own and
 * releases it when done; the buffer goes back to the pool when the last one
 * is released. The rules that keep a reused buffer from ever being read by
 * a former holder:
 *
 * - a lease is shared only from a lease still held (`share` on a released
 *   one answers undefined, so a latecomer takes the bytes from elsewhere);
 * - releasing is idempotent per lease, so releasing twice cannot take
 *   another holder's share;
 * - a holder that never releases costs nothing but the reuse: the buffer is
 *   then left to the collector, as any buffer would be.
 */
export class BufferPool {
  readonly #size: number
  readonly #max: number
  readonly #free: Buffer[] = []
  #reused = 0
  #allocated = 0

  /** `size`: the capacity of each buffer; `max`: how many free ones are kept. */
  constructor (size: number, max: number) {
    this.#size = size
    this.#max = max
  }

  get size (): number { return this.#size }
  /** Buffers handed out again after every holder released them. */
  get reused (): number { return this.#reused }
  /** Buffers allocated because none was free (or the length asked was too large). */
  get allocated (): number { return this.#allocated }
  get free (): number { return this.#free.length }

  /**
   * `length` bytes (the pool's size when omitted), held until released. A
   * length beyond the pool's size gets a buffer of its own that is never
   * pooled. The bytes are not zeroed.
   */
  take (length = this.#size): Lease {
    if (length > this.#size) {
      this.#allocated++
      return new Lease(new Holders(Buffer.allocUnsafeSlow(length), undefined), length)
    }
    const reused = this.#free.pop()
    if (reused !== undefined) this.#reused++
    else this.#allocated++
    return new Lease(new Holders(reused ?? Buffer.allocUnsafeSlow(this.#size), this), length)
  }

  /** @internal Called by the last lease released. */
  put (buffer: Buffer): void {
    if (this.#free.length < this.#max) this.#free.push(buffer)
  }
}

/** Who holds one buffer: a count, and the pool it returns to. */
class Holders {
  readonly buffer: Buffer
  readonly pool: BufferPool | undefined
  count = 1

  constructor (buffer: Buffer, pool: BufferPool | undefined) {
    this.buffer = buffer
    this.pool = pool
  }
}

/** One holder's claim on a pooled buffer. */
export class Lease {
  /** The bytes: the buffer's first `length`. */
  readonly data: Buffer
  readonly #holders: Holders
  #held = true

  constructor (holders: Holders, length: number) {
    this.#holders = holders
    // A view of its own per lease: chunks lent down a stream are told apart by object (see `lend`).
    this.data = holders.buffer.subarray(0, length)
  }

  get held (): boolean { return this.#held }

  /** A lease of its own for another holder; undefined once this one is released (the buffer may be someone else's by then). */
  share (): Lease | undefined {
    if (!this.#held) return undefined
    this.#holders.count++
    return new Lease(this.#holders, this.data.length)
  }

  /** Done with the bytes. Any call after the first does nothing. */
  release = (): void => {
    if (!this.#held) return
    this.#held = false
    if (--this.#holders.count === 0) this.#holders.pool?.put(this.#holders.buffer)
  }
}

/** Exports a pool's counts as `name{count="reused"|"allocated"|"free"}`. */
export function registerPoolMetrics (registry: Registry, name: string, help: string, pool: BufferPool): void {
  const gauge = new Gauge({
    name,
    help,
    labelNames: ['count'],
    registers: [registry],
    collect () {
      this.set({ count: 'reused' }, pool.reused)
      this.set({ count: 'allocated' }, pool.allocated)
      this.set({ count: 'free' }, pool.free)
    }
  })
  void gauge
}

/**
 * Chunks handed down a stream whose consumer may say when it is done with
 * them (see `giveBack`). A chunk nobody gives back is simply never reused.
 */
const lent = new WeakMap<object, () => void>()

/** Marks `chunk` (the exact object passed on) as held until `giveBack(chunk)`. */
export function lend (chunk: Uint8Array, release: () => void): void {
  lent.set(chunk, release)
}

/** The consumer is done with `chunk`: nothing will read it again. A chunk not lent is ignored. */
export function giveBack (chunk: unknown): void {
  if (typeof chunk !== 'object' || chunk === null) return
  const release = lent.get(chunk)
  if (release === undefined) return
  lent.delete(chunk)
  release()
}

export function isLent (chunk: unknown): boolean {
  return typeof chunk === 'object' && chunk !== null && lent.has(chunk)
}

/**
 * Gives back every lent chunk written to `out` once it has been written
 * (the write's callback: the bytes are in the kernel, or the write failed
 * and nothing will send them). Chunks not lent pass as they are.
 */
export function giveBackWhenWritten (out: { write: (chunk: never, ...rest: never[]) => boolean }): void {
  const write = out.write as (this: unknown, chunk: unknown, encoding?: unknown, cb?: unknown) => boolean
  out.write = function (this: unknown, chunk: unknown, encoding?: unknown, cb?: unknown): boolean {
    if (!isLent(chunk)) return write.call(this, chunk, encoding, cb)
    const done = typeof encoding === 'function' ? encoding as (err?: Error | null) => void : typeof cb === 'function' ? cb as (err?: Error | null) => void : undefined
    return write.call(this, chunk, (err?: Error | null) => {
      giveBack(chunk)
      done?.(err)
    })
  } as typeof out.write
}
