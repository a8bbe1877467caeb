import type { AbortOptions } from '../../src/abort.ts'
import { OriginUnavailableError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { parseDigest, sha256Hex } from '../../src/oci/digest.ts'
import type { AccessChecker } from '../auth/index.ts'
import type { BlobService, OpenBlob } from '../blobs/index.ts'
import type { TagCache, TagRecord } from '../facts/tags.ts'
import type { OriginClient, OriginCredentials } from '../origin/index.ts'
import type { Upstream } from '../upstream/index.ts'

export interface ManifestServiceComponents {
  logger: Logger
  origin: OriginClient
  blobs: BlobService
  access: AccessChecker
  tags: TagCache
  /** The swarm's memory of tags, for when this peer never saw a tag itself. */
  swarm?: {
    lookupTag: (origin: string, repo: string, tag: string, options?: AbortOptions) => Promise<TagRecord | undefined>
    announceTag: (origin: string, repo: string, tag: string, record: TagRecord) => void
  } | undefined
}

/** A manifest by tag: from the origin, or — the origin being down — from the cache, by the tag's last digest. */
export type TagAnswer =
  | { from: 'origin', digest: string | undefined, mediaType: string | undefined, size: number, body: Buffer | undefined }
  | { from: 'cache', opened: OpenBlob, mediaType: string | undefined, seenAt: number }

export interface ManifestService {
  /**
   * Resolves a tag. Tags are mutable, so the origin is always asked; what it
   * says is remembered (the digest, and the manifest itself under its digest,
   * which is what containerd asks for next). When the origin cannot be
   * reached, the tag's last digest this peer or the swarm saw is served from
   * the cache, if the caller may read it.
   */
  byTag: (upstream: Upstream, repo: string, tag: string, accept: string, credentials: OriginCredentials, options: AbortOptions & { head: boolean }) => Promise<TagAnswer>
}

export function createManifestService (components: ManifestServiceComponents): ManifestService {
  const { origin, blobs, tags } = components
  const logger = components.logger.child({ component: 'peer:manifests' })

  /** A manifest fetched by tag is kept under its digest, through the data path like any other blob. */
  async function keep (upstream: Upstream, repo: string, digest: string, body: Buffer, mediaType: string | undefined, credentials: OriginCredentials): Promise<void> {
    try {
      parseDigest(digest)
      components.access.remember(upstream, repo, 'manifest', digest, credentials, { size: body.length, mediaType })
      await blobs.keep({ upstream, repo, digest, kind: 'manifest', size: body.length, mediaType, credentials }, body)
    } catch (err) {
      logger.debug({ err, digest }, 'manifest not cached')
    }
  }

  return {
    async byTag (upstream, repo, tag, accept, credentials, options) {
      try {
        const res = await origin.getManifest(upstream, repo, tag, accept, credentials, { signal: options.signal, method: options.head ? 'HEAD' : 'GET' })
        let digest = res.digest
        // A registry nobody configured: its answer goes to its caller and is remembered nowhere.
        if (!upstream.trusted) return { from: 'origin', digest, mediaType: res.mediaType, size: res.size, body: options.head ? undefined : res.body }
        if (!options.head) {
          const computed = `sha256:${sha256Hex(res.body)}`
          if (digest === undefined) digest = computed
          if (digest === computed) await keep(upstream, repo, digest, res.body, res.mediaType, credentials)
        }
        if (digest !== undefined) {
          const record = { digest, mediaType: res.mediaType, size: res.size, seenAt: Date.now() }
          tags.set(upstream.origin, repo, tag, record)
          components.swarm?.announceTag(upstream.origin, repo, tag, record)
        }
        return { from: 'origin', digest, mediaType: res.mediaType, size: res.size, body: options.head ? undefined : res.body }
      } catch (err) {
        // The origin is down: answer with the last digest this tag was seen at, if the content is still ours to serve.
        if (!(err instanceof OriginUnavailableError) || !upstream.trusted) throw err
        const last = tags.get(upstream.origin, repo, tag) ?? await components.swarm?.lookupTag(upstream.origin, repo, tag, { signal: options.signal })
        if (last === undefined) throw err
        const opened = await blobs.open({ upstream, repo, digest: last.digest, kind: 'manifest', credentials }, { signal: options.signal })
        return { from: 'cache', opened, mediaType: last.mediaType ?? opened.task.mediaType, seenAt: last.seenAt }
      }
    }
  }
}
