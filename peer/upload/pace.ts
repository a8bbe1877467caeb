/**
 * How many pieces this node may send at once, from the rate its uplink has
 * shown. A piece is of use to the swarm only once it has all arrived and been
 * verified, so sends that share a slow uplink delay every one of them: behind
 * 2 MiB/s, eight pieces at once all land after four seconds, one at a time
 * one lands each half second, and each can be passed on at once (the
 * emulated cluster's seed sent eight pieces to one child at once, and nobody
 * had a piece to pass on for eight seconds). So a new send starts only while
 * those under way would each still take no longer than `targetMs` at the
 * measured rate; at fleet speeds (100 MiB/s) that is every slot.
 *
 * The rate is the highest the node's sends reached, summed, over any stretch
 * of continuous sending of `sampleMs` or `sampleBytes`, whichever comes
 * first, within the last `windowMs`: a child that reads slowly lowers a
 * sample, never the maximum; at 100 MiB/s a sample takes 20 ms, not the
 * quarter second that held every peer of a starting swarm to `min` sends
 * (fleet simulation, N = 200: p50 1.60× T* against 1.52×). Until a sample
 * is in, and whatever the rate, `min` sends may run. A configured upload
 * limit is the rate when there is one. Pure: time comes in as arguments.
 */
export interface UploadPaceInit {
  /** The most sends at once, whatever the rate (`uploadConcurrency`). */
  max: number
  /** Sends allowed at once whatever the rate, and before it is known. Default 2 (at most `max`). */
  min?: number | undefined
  /** Longest a piece should take to send at the rate, with the others under way. Default 250 ms. */
  targetMs?: number
  /** The node's configured upload limit in bytes per second, if any: the rate, unmeasured. */
  rate?: number | undefined
  /** Continuous sending that makes one sample of the rate. Default 250 ms. */
  sampleMs?: number
  /** Or this many bytes sent, if sooner (and at least `sampleMs` ÷ 25 passed). Default 2 MiB. */
  sampleBytes?: number
  /** How long a sample counts towards the maximum. Default 30 s. */
  windowMs?: number
}

const DEFAULT_MIN = 2
const DEFAULT_TARGET_MS = 250
const DEFAULT_SAMPLE_MS = 250
const DEFAULT_SAMPLE_BYTES = 2 * 1024 * 1024
const DEFAULT_WINDOW_MS = 30_000

export class UploadPace {
  readonly #max: number
  readonly #min: number
  readonly #targetMs: number
  readonly #rate: number | undefined
  readonly #sampleMs: number
  readonly #sampleBytesEnough: number
  readonly #windowMs: number
  #active = 0
  #sampleStart = 0
  #sampleBytes = 0
  /** Samples in time order with falling rates: the first is the window's maximum. At most windowMs ÷ sampleMs + 1. */
  readonly #peaks: Array<{ at: number, rate: number }> = []

  constructor (init: UploadPaceInit) {
    if (!(init.max >= 1)) throw new RangeError('upload pace: max must be at least 1')
    this.#max = init.max
    this.#min = Math.max(1, Math.min(init.max, init.min ?? DEFAULT_MIN))
    this.#targetMs = init.targetMs ?? DEFAULT_TARGET_MS
    this.#rate = init.rate !== undefined && init.rate > 0 ? init.rate : undefined
    this.#sampleMs = init.sampleMs ?? DEFAULT_SAMPLE_MS
    this.#sampleBytesEnough = init.sampleBytes ?? DEFAULT_SAMPLE_BYTES
    this.#windowMs = init.windowMs ?? DEFAULT_WINDOW_MS
  }

  /** Bytes per second: the configured limit, or the highest measured in the window; undefined before any sample. */
  rate (now: number): number | undefined {
    if (this.#rate !== undefined) return this.#rate
    while (this.#peaks.length > 0 && (this.#peaks[0] as { at: number }).at < now - this.#windowMs) this.#peaks.shift()
    return this.#peaks[0]?.rate
  }

  /** How many sends of pieces of this size may run at once now. */
  limit (pieceBytes: number, now: number): number {
    const rate = this.rate(now)
    if (rate === undefined) return this.#min
    const fit = Math.floor(rate * this.#targetMs / 1000 / Math.max(1, pieceBytes))
    return Math.max(this.#min, Math.min(this.#max, fit))
  }

  /** A send began. */
  begin (now: number): void {
    if (this.#active === 0) {
      this.#sampleStart = now
      this.#sampleBytes = 0
    }
    this.#active++
  }

  /** Bytes of a send went out (handed to the socket). */
  sent (bytes: number, now: number): void {
    if (this.#active === 0) return
    this.#sampleBytes += bytes
    const elapsed = now - this.#sampleStart
    if (elapsed < this.#sampleMs && (this.#sampleBytes < this.#sampleBytesEnough || elapsed < this.#sampleMs / 25)) return
    this.#record(this.#sampleBytes * 1000 / elapsed, now)
    this.#sampleStart = now
    this.#sampleBytes = 0
  }

  /** A send ended, delivered or not. A sample cut short by the last send ending is dropped. */
  end (): void {
    if (this.#active > 0) this.#active--
  }

  #record (rate: number, now: number): void {
    const peaks = this.#peaks
    while (peaks.length > 0 && (peaks[peaks.length - 1] as { rate: number }).rate <= rate) peaks.pop()
    peaks.push({ at: now, rate })
    while (peaks.length > 0 && (peaks[0] as { at: number }).at < now - this.#windowMs) peaks.shift()
  }
}
