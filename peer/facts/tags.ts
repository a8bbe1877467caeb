import { join } from 'node:path'
import type { Logger } from '../../src/logger.ts'
import { createPersistedLru } from './persisted-lru.ts'

/** The last digest a tag was seen to point at, for when the origin cannot be asked. */
export interface TagRecord {
  digest: string
  mediaType: string | undefined
  size: number
  /** Milliseconds since the epoch when the origin last said so. */
  seenAt: number
}

export interface TagCacheComponents {
  logger: Logger
}

export interface TagCacheInit {
  dataDir: string
  /** Tags remembered. Default 10,000. */
  maxEntries?: number
  /** Writes are batched this long. Default 1 s. */
  flushDelayMs?: number
}

export interface TagCache {
  start: () => Promise<void>
  stop: () => Promise<void>
  get: (origin: string, repo: string, tag: string) => TagRecord | undefined
  set: (origin: string, repo: string, tag: string, record: TagRecord) => void
  /** Everything remembered, newest first; what a peer announces to the swarm. */
  entries: () => Array<{ origin: string, repo: string, tag: string, record: TagRecord }>
}

export function createTagCache (components: TagCacheComponents, init: TagCacheInit): TagCache {
  const logger = components.logger.child({ component: 'peer:tags' })
  const store = createPersistedLru<TagRecord>(logger, {
    file: join(init.dataDir, 'tags.json'),
    maxEntries: init.maxEntries ?? 10_000,
    flushDelayMs: init.flushDelayMs ?? 1_000,
    valid: (_key, v): v is TagRecord => typeof (v as TagRecord | null)?.digest === 'string'
  })
  const key = (origin: string, repo: string, tag: string): string => `${origin}\n${repo}\n${tag}`

  return {
    start: store.start,
    stop: store.stop,
    get: (origin, repo, tag) => store.get(key(origin, repo, tag)),
    set (origin, repo, tag, record) {
      const k = key(origin, repo, tag)
      const before = store.get(k)
      // Seeing the same digest again is news for the file only once a minute.
      store.set(k, record, before?.digest !== record.digest || record.seenAt - before.seenAt >= 60_000)
    },
    entries: () => store.entries().map(([k, record]) => {
      const [origin, repo, tag] = k.split('\n') as [string, string, string]
      return { origin, repo, tag, record }
    })
  }
}
