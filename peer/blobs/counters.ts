import { Counter, type Registry } from '../../src/metrics.ts'
import type { BlobByteCounts } from './index.ts'

export type Source = 'local' | 'origin' | 'peer'

/** Bytes moved by the data path: as Prometheus counters, and as plain numbers for the scheduler's load report. */
export class ByteCounters {
  readonly #bytes: BlobByteCounts = { served: { local: 0, peer: 0, origin: 0 }, fetched: { peer: 0, origin: 0 } }
  readonly #served: Counter | undefined
  readonly #fetched: Counter | undefined

  constructor (metrics: Registry | undefined) {
    if (metrics === undefined) return
    const registers = [metrics]
    this.#served = new Counter({ name: 'damselfly_served_bytes_total', help: 'Bytes sent to clients, by where the piece came from (local: already cached)', labelNames: ['source'], registers })
    this.#fetched = new Counter({ name: 'damselfly_fetched_bytes_total', help: 'Piece bytes fetched into this node, by source', labelNames: ['source'], registers })
  }

  served (source: Source, bytes: number): void {
    this.#served?.inc({ source }, bytes)
    this.#bytes.served[source] += bytes
  }

  fetched (source: 'origin' | 'peer', bytes: number): void {
    this.#fetched?.inc({ source }, bytes)
    this.#bytes.fetched[source] += bytes
  }

  snapshot (): BlobByteCounts {
    const { served, fetched } = this.#bytes
    return { served: { ...served }, fetched: { ...fetched } }
  }
}
