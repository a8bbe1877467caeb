import { join } from 'node:path'
import type { Logger } from '../../src/logger.ts'
import { createPersistedLru } from './persisted-lru.ts'

/**
 * Whether (registry, repository, digest) was readable without credentials,
 * as this peer or the swarm saw it. A fact about content, never about a
 * caller, so it may be shared.
 */
export interface PublicFacts {
  lookup: (origin: string, repo: string, digest: string) => Promise<{ size: number, mediaType: string | undefined } | undefined>
  record: (origin: string, repo: string, digest: string, size: number, mediaType: string | undefined) => void
}

/** Content a registry let anyone read: what stays servable anonymously while that registry is down. */
export interface PublicRecord {
  size: number
  mediaType: string | undefined
}

export interface PublicContent {
  start: () => Promise<void>
  stop: () => Promise<void>
  get: (origin: string, repo: string, digest: string) => PublicRecord | undefined
  /** The registry just let an anonymous caller read this; remembered across restarts. */
  set: (origin: string, repo: string, digest: string, record: PublicRecord) => void
  entries: () => Array<{ origin: string, repo: string, digest: string, record: PublicRecord }>
}

/**
 * What this peer itself saw a registry serve without credentials. A fact
 * about content, never about a caller. Persisted, so a peer restarted while
 * its registry is down still serves public content it holds.
 */
export function createPublicContent (components: { logger: Logger }, init: { dataDir: string, maxEntries?: number, flushDelayMs?: number }): PublicContent {
  const logger = components.logger.child({ component: 'peer:public' })
  const store = createPersistedLru<PublicRecord>(logger, {
    file: join(init.dataDir, 'public.json'),
    maxEntries: init.maxEntries ?? 16_384,
    flushDelayMs: init.flushDelayMs ?? 1_000,
    valid: (_key, v): v is PublicRecord => Number.isSafeInteger((v as PublicRecord | null)?.size)
  })
  const key = (origin: string, repo: string, digest: string): string => `${origin}\n${repo}\n${digest}`
  return {
    start: store.start,
    stop: store.stop,
    get: (origin, repo, digest) => store.get(key(origin, repo, digest)),
    set (origin, repo, digest, record) {
      const k = key(origin, repo, digest)
      if (store.has(k)) return
      store.set(k, record)
    },
    entries: () => store.entries().map(([k, record]) => {
      const [origin, repo, digest] = k.split('\n') as [string, string, string]
      return { origin, repo, digest, record }
    })
  }
}
