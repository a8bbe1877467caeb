import type { Load } from '../../src/protocol/messages.ts'
import type { BlobByteCounts } from '../blobs/index.ts'
import type { SchedulerClient } from '../swarm/scheduler-client.ts'

export interface LoadReportComponents {
  session: SchedulerClient
  /** Uploads under way and bytes sent to other peers. */
  uploads: () => { active: number, bytes: number }
  /** Throughput measured from each parent, bytes/s. */
  parentRates: () => Array<[string, number]>
  /** Bytes the data path moved. */
  byteCounts: () => BlobByteCounts
}

/**
 * Every `intervalMs` (default 2 s), what the scheduler ranks parents by and
 * the swarm page shows: upload load, measured parent speeds, byte counts.
 * Sent only when it changed.
 */
export function startLoadReport (components: LoadReportComponents, init: { intervalMs?: number } = {}): { stop: () => void } {
  let last = ''
  const timer = setInterval(() => {
    const uploads = components.uploads()
    const load: Load = {
      activeUploads: uploads.active,
      parents: components.parentRates().map(([p, r]): [string, number] => [p, Math.round(r)]),
      bytes: { ...components.byteCounts(), uploaded: uploads.bytes }
    }
    const key = JSON.stringify(load)
    if (key === last) return
    last = key
    components.session.setLoad(load)
  }, init.intervalMs ?? 2_000)
  timer.unref()
  return { stop: () => { clearInterval(timer) } }
}
