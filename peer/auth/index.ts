import { createHash } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import { raceSignal, type AbortOptions } from '../../src/abort.ts'
import { OriginUnavailableError, UnauthorizedError, isDamselflyError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, type Registry } from '../../src/metrics.ts'
import { DEFAULT_MANIFEST_ACCEPT } from '../../src/oci/media-types.ts'
import type { PublicFacts } from '../facts/public.ts'
import type { OriginClient, OriginCredentials } from '../origin/index.ts'
import type { Upstream } from '../upstream/index.ts'

export type ContentKind = 'blob' | 'manifest'

/** What the origin said about a piece of content when it let the caller see it. */
export interface Access {
  size: number
  mediaType: string | undefined
  /** The decision came from the cache (no origin request was made). */
  cached: boolean
  /** The origin could not be asked; an older decision (or a public fact) was used. */
  stale: boolean
}

export interface AccessCheckerComponents {
  logger: Logger
  origin: OriginClient
  metrics?: Registry | undefined
  publicFacts?: PublicFacts | undefined
}

export interface AccessCheckerInit {
  /** Check with the origin at all. Off only for registries that are public through and through. Default true. */
  enabled?: boolean
  /** How long a decision is reused without asking the origin again. Default 60 s. */
  ttlMs?: number
  /** How old a yes may be and still be used while the origin is unreachable. Default 10 min. */
  staleIfErrorMs?: number
  /** Decisions kept. Default 10,000. */
  maxEntries?: number
}

export interface AccessChecker {
  /**
   * Asks (or remembers asking) the origin whether these credentials may read
   * this content in this repository. Throws `UnauthorizedError` (with the
   * origin's challenge), `DeniedError`, `BlobUnknownError`… as the origin
   * answered. The answer also carries the content's size, so a cold blob
   * costs no extra request.
   */
  check: (upstream: Upstream, repo: string, kind: ContentKind, digest: string, credentials: OriginCredentials, options?: CheckOptions) => Promise<Access>
  /** Records a yes the origin just gave by other means (a manifest fetched by tag with these credentials). */
  remember: (upstream: Upstream, repo: string, kind: ContentKind, digest: string, credentials: OriginCredentials, facts: { size: number, mediaType: string | undefined }) => void
}

export interface CheckOptions extends AbortOptions {
  /** What the local cache knows; with the check turned off this answers without asking the origin. */
  local?: { size: number, mediaType: string | undefined } | undefined
}

interface Decision {
  size: number
  mediaType: string | undefined
  at: number
}

/**
 * The rule from DESIGN.md: cached or swarm-held content of a repository is
 * served only to a caller the origin accepts for that repository and digest.
 * The cache key holds a SHA-256 of the credentials, never the credentials.
 */
export function createAccessChecker (components: AccessCheckerComponents, init: AccessCheckerInit = {}): AccessChecker {
  const logger = components.logger.child({ component: 'peer:auth' })
  const enabled = init.enabled ?? true
  const ttlMs = init.ttlMs ?? 60_000
  const staleIfErrorMs = init.staleIfErrorMs ?? 600_000
  const decisions = new LRUCache<string, Decision>({ max: init.maxEntries ?? 10_000 })
  const inflight = new Map<string, Promise<Decision>>()
  const registers = components.metrics === undefined ? undefined : [components.metrics]
  const checks = registers === undefined
    ? undefined
    : new Counter({ name: 'damselfly_auth_checks_total', help: 'Authorization decisions, by outcome', labelNames: ['outcome'], registers })

  async function ask (upstream: Upstream, repo: string, kind: ContentKind, digest: string, credentials: OriginCredentials, options: AbortOptions): Promise<Decision> {
    if (kind === 'blob') {
      const head = await components.origin.headBlob(upstream, repo, digest, credentials, options)
      return { size: head.size, mediaType: head.mediaType, at: Date.now() }
    }
    const head = await components.origin.getManifest(upstream, repo, digest, DEFAULT_MANIFEST_ACCEPT, credentials, { ...options, method: 'HEAD' })
    return { size: head.size, mediaType: head.mediaType, at: Date.now() }
  }

  return {
    remember (upstream, repo, kind, digest, credentials, facts) {
      decisions.set(keyOf(upstream, repo, kind, digest, credentials), { ...facts, at: Date.now() })
      if (credentials.authorization === undefined) components.publicFacts?.record(upstream.origin, repo, digest, facts.size, facts.mediaType)
    },

    async check (upstream, repo, kind, digest, credentials, options = {}) {
      if (!enabled && options.local !== undefined) {
        checks?.inc({ outcome: 'unchecked' })
        return { size: options.local.size, mediaType: options.local.mediaType, cached: true, stale: false }
      }
      const key = keyOf(upstream, repo, kind, digest, credentials)
      const known = decisions.get(key)
      if (known !== undefined && Date.now() - known.at < ttlMs) {
        checks?.inc({ outcome: 'cached' })
        return { size: known.size, mediaType: known.mediaType, cached: true, stale: false }
      }
      let pending = inflight.get(key)
      if (pending === undefined) {
        // Shared by every caller with the same key, so no one caller's signal may cancel it.
        pending = ask(upstream, repo, kind, digest, credentials, {})
        inflight.set(key, pending)
        pending.then(() => inflight.delete(key), () => inflight.delete(key))
      }
      try {
        const decision = await raceSignal(pending, options.signal)
        decisions.set(key, decision)
        if (credentials.authorization === undefined) components.publicFacts?.record(upstream.origin, repo, digest, decision.size, decision.mediaType)
        checks?.inc({ outcome: 'allowed' })
        return { size: decision.size, mediaType: decision.mediaType, cached: false, stale: false }
      } catch (err) {
        if (options.signal?.aborted === true) throw err
        if (!(err instanceof OriginUnavailableError)) {
          decisions.delete(key)
          checks?.inc({ outcome: isDamselflyError(err) && err instanceof UnauthorizedError ? 'unauthorized' : 'refused' })
          throw err
        }
        // The origin cannot be asked. A recent enough yes for these very
        // credentials still holds; so does a swarm fact that the content is public.
        if (known !== undefined && Date.now() - known.at < staleIfErrorMs) {
          checks?.inc({ outcome: 'stale' })
          return { size: known.size, mediaType: known.mediaType, cached: true, stale: true }
        }
        const fact = await components.publicFacts?.lookup(upstream.origin, repo, digest)
        if (fact !== undefined) {
          checks?.inc({ outcome: 'public' })
          return { size: fact.size, mediaType: fact.mediaType, cached: true, stale: true }
        }
        checks?.inc({ outcome: 'unavailable' })
        logger.debug({ origin: upstream.origin, repo, digest }, 'origin unreachable and no decision to fall back on')
        throw err
      }
    }
  }
}

function keyOf (upstream: Upstream, repo: string, kind: ContentKind, digest: string, credentials: OriginCredentials): string {
  const who = credentials.authorization === undefined ? '-' : createHash('sha256').update(credentials.authorization).digest('base64url')
  return `${upstream.origin}\n${repo}\n${kind}\n${digest}\n${who}`
}
