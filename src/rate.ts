import { sleep, type AbortOptions } from './abort.ts'
import { Counter, type Registry } from './metrics.ts'

/**
 * A token bucket of bytes per second, shared by everything one limit covers
 * (all uploads of a peer, all its origin reads…), so the limit holds for the
 * node as a whole. A rate of 0 means unlimited. `waited` hears of each pause,
 * in seconds, for the metrics.
 */
export class TokenBucket {
  readonly #rate: number
  readonly #burst: number
  readonly #waited: ((seconds: number) => void) | undefined
  #tokens: number
  #at = performance.now()

  constructor (bytesPerSecond: number, options: { burst?: number | undefined, waited?: ((seconds: number) => void) | undefined } = {}) {
    this.#rate = bytesPerSecond
    this.#burst = options.burst ?? Math.max(256 * 1024, bytesPerSecond / 10)
    this.#tokens = this.#burst
    this.#waited = options.waited
  }

  get unlimited (): boolean { return this.#rate <= 0 }
  /** Bytes per second; 0 when unlimited. */
  get rate (): number { return Math.max(0, this.#rate) }

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
      const ms = Math.max(1, (Math.min(bytes, this.#burst) - this.#tokens) * 1000 / this.#rate)
      await sleep(ms, options)
      this.#waited?.(ms / 1000)
    }
  }
}

/** `source`, no faster than each bucket allows: a chunk waits for its bytes in every one. */
export async function * throttled (source: AsyncIterable<Buffer>, buckets: readonly TokenBucket[], options: AbortOptions = {}): AsyncGenerator<Buffer> {
  const active = buckets.filter(b => !b.unlimited)
  for await (const chunk of source) {
    for (const bucket of active) await bucket.take(chunk.length, options)
    yield chunk
  }
}

/** A peer's bandwidth limits, bytes per second (0: unlimited), as the configuration gives them. */
export interface RateLimitConfig {
  /** Bytes sent to other peers. */
  upload: number
  /** Bytes read from origin registries into the cache ("back to source"). */
  origin: number
  /** Every byte taken in: from peers and from origins. */
  download: number
  /** Bytes taken in for prefetch and preheat (work no client is waiting on). */
  prefetch: number
}

export type RateLimits = Record<keyof RateLimitConfig, TokenBucket>

/** One bucket per limit, each counting the time it made transfers wait (`damselfly_rate_limit_wait_seconds_total`). */
export function createRateLimits (config: Partial<RateLimitConfig>, metrics?: Registry): RateLimits {
  const waits = metrics === undefined ? undefined : new Counter({ name: 'damselfly_rate_limit_wait_seconds_total', help: 'Seconds transfers waited on a bandwidth limit, by limit', labelNames: ['limit'], registers: [metrics] })
  const bucket = (limit: keyof RateLimitConfig): TokenBucket => new TokenBucket(config[limit] ?? 0, { waited: waits === undefined ? undefined : (seconds) => { waits.inc({ limit }, seconds) } })
  return { upload: bucket('upload'), origin: bucket('origin'), download: bucket('download'), prefetch: bucket('prefetch') }
}
