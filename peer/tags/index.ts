import { mkdir, readFile, rename, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { LRUCache } from 'lru-cache'
import type { Logger } from '../../src/logger.ts'

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
  const file = join(init.dataDir, 'tags.json')
  const flushDelay = init.flushDelayMs ?? 1_000
  const cache = new LRUCache<string, TagRecord>({ max: init.maxEntries ?? 10_000 })
  let timer: NodeJS.Timeout | undefined
  let writing: Promise<void> = Promise.resolve()

  const key = (origin: string, repo: string, tag: string): string => `${origin}\n${repo}\n${tag}`

  async function flush (): Promise<void> {
    const write = async (): Promise<void> => {
      const rows = [...cache.entries()].map(([k, v]) => [k, v] as const)
      await mkdir(dirname(file), { recursive: true })
      await writeFile(`${file}.tmp`, JSON.stringify(rows))
      await rename(`${file}.tmp`, file)
    }
    writing = writing.then(write, write)
    await writing
  }

  return {
    async start () {
      try {
        const rows = JSON.parse(await readFile(file, 'utf8')) as Array<[string, TagRecord]>
        // Oldest first, so the LRU ends with the newest as most recent.
        for (const [k, v] of rows.reverse()) {
          if (typeof k === 'string' && typeof v?.digest === 'string') cache.set(k, v)
        }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') logger.warn({ err }, 'ignoring an unreadable tag cache')
      }
    },
    async stop () {
      if (timer !== undefined) {
        clearTimeout(timer)
        timer = undefined
        await flush().catch((err: unknown) => { logger.warn({ err }, 'could not write the tag cache') })
      }
      await writing.catch(() => {})
    },
    get (origin, repo, tag) {
      return cache.get(key(origin, repo, tag))
    },
    set (origin, repo, tag, record) {
      const k = key(origin, repo, tag)
      const before = cache.get(k)
      cache.set(k, record)
      if (before?.digest === record.digest && record.seenAt - before.seenAt < 60_000) return
      if (timer !== undefined) return
      timer = setTimeout(() => {
        timer = undefined
        flush().catch((err: unknown) => { logger.warn({ err }, 'could not write the tag cache') })
      }, flushDelay)
      timer.unref()
    },
    entries () {
      return [...cache.entries()].map(([k, record]) => {
        const [origin, repo, tag] = k.split('\n') as [string, string, string]
        return { origin, repo, tag, record }
      })
    }
  }
}
