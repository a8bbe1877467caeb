import { sleep, type AbortOptions } from '../../src/abort.ts'

/**
 * A token bucket shared by every upload of a peer, so the limit holds for the
 * node as a whole. A rate of 0 means unlimited.
 */
export class TokenBucket {
  readonly #rate: number
  readonly #burst: number
  #tokens: number
  #at = performance.now()

  constructor (bytesPerSecond: number, burst = Math.max(256 * 1024, bytesPerSecond / 10)) {
    this.#rate = bytesPerSecond
    this.#burst = burst
    this.#tokens = burst
  }

  get unlimited (): boolean { return this.#rate <= 0 }

  async take (bytes: number, options: AbortOptions = {}): Promise<void> {
    if (this.#rate <= 0) return
    for (;;) {
      const now = performance.now()
      this.#tokens = Math.min(this.#burst, this.#tokens + (now - this.#at) * this.#rate / 1000)
      this.#at = now
      if (this.#tokens >= Math.min(bytes, this.#burst)) {
        // Large takes go into debt rather than waiting forever for a full bucket.
        this.#tokens -= bytes
        return
      }
      await sleep(Math.max(1, (Math.min(bytes, this.#burst) - this.#tokens) * 1000 / this.#rate), options)
    }
  }
}
