import { mkdir, readFile, rename, writeFile } from 'node:fs/promises'
import { dirname } from 'node:path'
import { LRUCache } from 'lru-cache'
import type { Logger } from '../../src/logger.ts'

export interface PersistedLruInit<V> {
  /** JSON file under the data dir; written whole, through a temporary file and a rename. */
  file: string
  maxEntries: number
  /** Writes are batched this long. */
  flushDelayMs: number
  /** Whether a value read back from the file is well-formed; others are skipped. */
  valid: (key: string, value: unknown) => value is V
}

export interface PersistedLru<V> {
  start: () => Promise<void>
  /** Writes what is pending and waits for any write under way. */
  stop: () => Promise<void>
  get: (key: string) => V | undefined
  has: (key: string) => boolean
  /** Stores a value; `persist` false keeps it in memory until the next write for another reason. */
  set: (key: string, value: V, persist?: boolean) => void
  /** Newest first. */
  entries: () => Array<[string, V]>
}

/**
 * A bounded map that survives restarts: facts a peer needs when the origin
 * cannot be asked (the last digest of a tag, whether content is public).
 * The file is rewritten whole, at most once per `flushDelayMs`; a file that
 * cannot be read is ignored with a warning.
 */
export function createPersistedLru<V extends object> (logger: Logger, init: PersistedLruInit<V>): PersistedLru<V> {
  const cache = new LRUCache<string, V>({ max: init.maxEntries })
  let timer: NodeJS.Timeout | undefined
  let writing: Promise<void> = Promise.resolve()

  async function flush (): Promise<void> {
    const write = async (): Promise<void> => {
      const rows = [...cache.entries()]
      await mkdir(dirname(init.file), { recursive: true })
      await writeFile(`${init.file}.tmp`, JSON.stringify(rows))
      await rename(`${init.file}.tmp`, init.file)
    }
    writing = writing.then(write, write)
    await writing
  }

  return {
    async start () {
      try {
        const rows = JSON.parse(await readFile(init.file, 'utf8')) as unknown
        if (!Array.isArray(rows)) throw new Error('not a list')
        // Oldest first, so the LRU ends with the newest as most recent.
        for (const row of rows.reverse()) {
          if (!Array.isArray(row) || typeof row[0] !== 'string') continue
          const [key, value] = row as [string, unknown]
          if (init.valid(key, value)) cache.set(key, value)
        }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') logger.warn({ err, file: init.file }, 'ignoring an unreadable file of remembered facts')
      }
    },
    async stop () {
      if (timer !== undefined) {
        clearTimeout(timer)
        timer = undefined
        await flush().catch((err: unknown) => { logger.warn({ err, file: init.file }, 'could not write remembered facts') })
      }
      await writing.catch(() => {})
    },
    get: (key) => cache.get(key),
    has: (key) => cache.has(key),
    set (key, value, persist = true) {
      cache.set(key, value)
      if (!persist || timer !== undefined) return
      timer = setTimeout(() => {
        timer = undefined
        flush().catch((err: unknown) => { logger.warn({ err, file: init.file }, 'could not write remembered facts') })
      }, init.flushDelayMs)
      timer.unref()
    },
    entries: () => [...cache.entries()]
  }
}
