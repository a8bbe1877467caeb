import { buffer } from 'node:stream/consumers'
import type { AbortOptions } from '../../src/abort.ts'
import type { Logger } from '../../src/logger.ts'
import { DEFAULT_MANIFEST_ACCEPT, INDEX_MEDIA_TYPES } from '../../src/oci/media-types.ts'
import { sha256Hex } from '../../src/oci/digest.ts'
import { matchesPlatform, parsePlatform, type Platform } from '../../src/oci/platform.ts'
import type { PreheatBlobResult } from '../../src/protocol/messages.ts'
import type { BlobService } from '../blobs/index.ts'
import type { OriginClient, OriginCredentials } from '../origin/index.ts'
import type { Upstream } from '../upstream/index.ts'

export interface ImageWalkComponents {
  logger: Logger
  origin: OriginClient
  blobs: BlobService
}

export interface ImageRef {
  upstream: Upstream
  repo: string
  /** Tag or digest. */
  reference: string
  /** `os/arch[/variant]`; every platform of an index when absent. */
  platform?: string | undefined
}

interface Descriptor { digest: string, size: number, mediaType?: string, platform?: Partial<Platform> }

/**
 * Fetches every blob of an image into the cache (and so into the swarm):
 * index → platform manifests → config and layers. Each blob goes through the
 * peer's own data path, verified like any other. Returns one result per blob.
 */
export async function fetchImage (components: ImageWalkComponents, ref: ImageRef, credentials: OriginCredentials, options: AbortOptions & { concurrency?: number } = {}): Promise<PreheatBlobResult[]> {
  const { origin, blobs } = components
  const logger = components.logger.child({ component: 'peer:preheat' })
  const results: PreheatBlobResult[] = []
  const top = await origin.getManifest(ref.upstream, ref.repo, ref.reference, DEFAULT_MANIFEST_ACCEPT, credentials, { signal: options.signal })
  const topDigest = top.digest ?? `sha256:${sha256Hex(top.body)}`

  const fetchOne = async (d: Descriptor, kind: 'blob' | 'manifest'): Promise<Buffer | undefined> => {
    try {
      const opened = await blobs.open({ upstream: ref.upstream, repo: ref.repo, digest: d.digest, kind, credentials }, { signal: options.signal })
      let body: Buffer | undefined
      if (kind === 'manifest') body = await buffer(await opened.read(undefined, { signal: options.signal }))
      else await blobs.complete(opened.task, { signal: options.signal })
      results.push({ digest: d.digest, size: opened.task.size, status: 'SUCCESS' })
      return body
    } catch (err) {
      logger.warn({ digest: d.digest, err: (err as Error).message }, 'preheat of a blob failed')
      results.push({ digest: d.digest, size: d.size, status: 'FAILURE', error: (err as Error).message.slice(0, 1000) })
      return undefined
    }
  }

  const walkManifest = async (body: Buffer): Promise<void> => {
    const manifest = JSON.parse(body.toString('utf8')) as { config?: Descriptor, layers?: Descriptor[] }
    const queue = [...(manifest.config === undefined ? [] : [manifest.config]), ...(manifest.layers ?? [])]
    const workers = Array.from({ length: Math.max(1, options.concurrency ?? 2) }, async () => {
      for (let d = queue.shift(); d !== undefined; d = queue.shift()) await fetchOne(d, 'blob')
    })
    await Promise.all(workers)
  }

  const topBody = await fetchOne({ digest: topDigest, size: top.size }, 'manifest') ?? top.body
  const parsed = JSON.parse(topBody.toString('utf8')) as { mediaType?: string, manifests?: Descriptor[] }
  const isIndex = INDEX_MEDIA_TYPES.has(top.mediaType ?? '') || INDEX_MEDIA_TYPES.has(parsed.mediaType ?? '') || Array.isArray(parsed.manifests)
  if (!isIndex) {
    await walkManifest(topBody)
    return results
  }
  const want = ref.platform === undefined ? undefined : parsePlatform(ref.platform)
  const wanted = (parsed.manifests ?? []).filter(d => ref.platform === undefined || (want !== undefined && matchesPlatform(d.platform, want)))
  for (const d of wanted) {
    const body = await fetchOne(d, 'manifest')
    if (body !== undefined) await walkManifest(body)
  }
  return results
}
