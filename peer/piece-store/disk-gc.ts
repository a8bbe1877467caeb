import { statfs } from 'node:fs/promises'
import { heldBytes } from './quota.ts'
import type { Entry } from './entry.ts'

export interface DiskGcInit {
  /** Start evicting when the data dir's file system is fuller than this share (0–1). */
  high: number
  /** …and stop once it is back under this one. */
  low: number
  /** Blobs unused for this long go, however much room there is; 0 keeps them. */
  ttlMs: number
}

/** The file system as `df` sees it. */
export interface DiskUsage {
  totalBytes: number
  usedBytes: number
}

export async function diskUsage (dir: string): Promise<DiskUsage> {
  const s = await statfs(dir)
  // What df reports as Use%: the blocks reserved for root count as neither used nor available.
  const used = (s.blocks - s.bfree) * s.bsize
  return { totalBytes: used + s.bavail * s.bsize, usedBytes: used }
}

/**
 * What to evict beside the byte quota: the file system the cache lives on
 * may be shared (images, logs, other caches), so the quota alone cannot keep
 * it from filling. Past the high watermark, least recently used blobs nobody
 * has pinned go until the estimate of what they free brings it under the
 * low one; blobs unused for the TTL go whatever the room. A pure choice:
 * the store evicts what it returns.
 */
export function chooseEvictions (entries: Iterable<Entry>, usage: DiskUsage, init: DiskGcInit, now: number): { ttl: Entry[], watermark: Entry[] } {
  const ttl: Entry[] = []
  const watermark: Entry[] = []
  const candidates = [...entries].filter(e => e.pins === 0 && !e.removed)
  if (init.ttlMs > 0) for (const e of candidates) if (now - e.usedAt > init.ttlMs) ttl.push(e)
  const expired = new Set(ttl)
  let used = usage.usedBytes - ttl.reduce((n, e) => n + heldBytes(e), 0)
  if (usage.totalBytes > 0 && usage.usedBytes / usage.totalBytes > init.high) {
    const target = init.low * usage.totalBytes
    for (const e of candidates) {
      if (used <= target) break
      if (expired.has(e) || e.held.size === 0) continue
      watermark.push(e)
      used -= heldBytes(e)
    }
  }
  return { ttl, watermark }
}
