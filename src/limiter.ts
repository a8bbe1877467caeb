import { AbortError, QueueFullError } from './errors.ts'
import type { AbortOptions } from './abort.ts'

export interface AcquireOptions extends AbortOptions {
  /** Higher goes first; equal priorities are served in arrival order. Default 0. */
  priority?: number
}

interface Waiter {
  priority: number
  seq: number
  resolve: (release: () => void) => void
  reject: (err: unknown) => void
  signal: AbortSignal | undefined
  onAbort: (() => void) | undefined
}

/**
 * A counting semaphore with a bounded, prioritised wait queue. Past
 * `maxQueue` waiters, `acquire` fails at once with `QueueFullError` instead of
 * letting the queue (and the memory behind it) grow. `max` may be a function,
 * asked at each acquire and release, for a limit that follows a measurement
 * (the upload pace); it should answer at least 1.
 */
export class Limiter {
  readonly #name: string
  readonly #max: number | (() => number)
  readonly #maxQueue: number
  #active = 0
  #seq = 0
  readonly #queue: Waiter[] = []

  constructor (name: string, max: number | (() => number), maxQueue: number) {
    if (typeof max === 'number' && !(max >= 1)) throw new RangeError(`${name}: max must be at least 1`)
    this.#name = name
    this.#max = max
    this.#maxQueue = maxQueue
  }

  get active (): number { return this.#active }
  get max (): number { return typeof this.#max === 'number' ? this.#max : this.#max() }
  get queued (): number { return this.#queue.length }

  async acquire (options: AcquireOptions = {}): Promise<() => void> {
    options.signal?.throwIfAborted()
    if (this.#active < this.max && this.#queue.length === 0) {
      this.#active++
      return this.#releaser()
    }
    if (this.#queue.length >= this.#maxQueue) throw new QueueFullError(this.#name)
    return new Promise((resolve, reject) => {
      const waiter: Waiter = { priority: options.priority ?? 0, seq: this.#seq++, resolve, reject, signal: options.signal, onAbort: undefined }
      if (options.signal !== undefined) {
        waiter.onAbort = () => {
          const i = this.#queue.indexOf(waiter)
          if (i !== -1) this.#queue.splice(i, 1)
          reject(options.signal?.reason ?? new AbortError(this.#name))
        }
        options.signal.addEventListener('abort', waiter.onAbort, { once: true })
      }
      // Keep the queue sorted: highest priority first, then arrival order.
      let at = this.#queue.length
      while (at > 0 && (this.#queue[at - 1] as Waiter).priority < waiter.priority) at--
      this.#queue.splice(at, 0, waiter)
    })
  }

  #releaser (): () => void {
    let released = false
    return () => {
      if (released) return
      released = true
      this.#active--
      this.#next()
    }
  }

  #next (): void {
    while (this.#active < this.max && this.#queue.length > 0) {
      const waiter = this.#queue.shift() as Waiter
      if (waiter.onAbort !== undefined) waiter.signal?.removeEventListener('abort', waiter.onAbort)
      this.#active++
      waiter.resolve(this.#releaser())
    }
  }
}
