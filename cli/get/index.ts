import { createHash, randomBytes } from 'node:crypto'
import { createReadStream, createWriteStream } from 'node:fs'
import { mkdir, readFile, rename, rm, stat } from 'node:fs/promises'
import path from 'node:path'
import { Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { Agent, type Dispatcher } from 'undici'
import { withDeadline } from '../../src/abort.ts'
import {
  AbortError, BlobDigestMismatchError, MirrorStatusError, NotFoundError, OriginProtocolError, PeerUnavailableError, StorageError,
  TimeoutError, UnauthorizedError, isAbort, isDamselflyError
} from '../../src/errors.ts'
import { parseChallenge } from '../../src/oci/challenge.ts'
import { parseDigest, type Digest } from '../../src/oci/digest.ts'
import { DEFAULT_MANIFEST_ACCEPT, INDEX_MEDIA_TYPES } from '../../src/oci/media-types.ts'
import { formatPlatform, hostPlatform, pickPlatform, type Platform } from '../../src/oci/platform.ts'
import { MAX_ERROR_BODY_BYTES, MAX_MANIFEST_BYTES, header, readBounded } from '../../src/oci/response.ts'
import { ociErrorMessage, refusalError } from '../../src/oci/status.ts'
import { MAX_TOKEN_BYTES, basicAuthorization, parsePullToken, pullTokenUrl } from '../../src/oci/token.ts'
import { replaceFile } from '../clients/files.ts'
import type { ImageRef } from './reference.ts'

export { parseImageRef, platformFlag, type ImageRef } from './reference.ts'

/**
 * `damselfly get`: fetches blobs and images through the local peer as any
 * client would (the registry API, the origin named by `X-Dragonfly-Registry`),
 * and trusts nothing it did not hash. Bytes go to a temporary file beside the
 * target and are renamed into place only once their digest matched.
 */

export interface GetterComponents {
  /** Default: an Agent of its own, closed by close(). */
  dispatcher?: Dispatcher
}

export interface GetterInit {
  /** The peer's mirror, e.g. http://127.0.0.1:4001. */
  peer: string
  /** Sent to the peer as Basic auth (the peer hands it to the registry), or to the registry's token service. */
  username?: string | undefined
  password?: string | undefined
  /** Deadline for a manifest or token request. Default 60 s. */
  metadataTimeoutMs?: number
  /** A blob transfer fails when no byte arrives for this long. Default 60 s. */
  idleTimeoutMs?: number
}

export type BlobKind = 'blob' | 'config' | 'layer'

export type GetEvent =
  | { type: 'manifest', digest: string, mediaType: string, platform?: string }
  | { type: 'start', digest: string, kind: BlobKind, total: number | undefined }
  | { type: 'progress', digest: string, bytes: number, total: number | undefined }
  | { type: 'done', digest: string, bytes: number, skipped: boolean }

export interface GetOptions {
  signal?: AbortSignal | undefined
  onProgress?: ((event: GetEvent) => void) | undefined
}

export interface ImageResult {
  manifest: string
  blobs: number
  fetched: number
  skipped: number
}

export interface ImageGetter {
  /** Fetches one blob to `file`. Nothing is left at `file` (or beside it) unless it verified. */
  blob: (ref: ImageRef, file: string, options?: GetOptions & { size?: number | undefined }) => Promise<{ digest: string, size: number }>
  /** Fetches an image (one platform of an index) into the OCI image layout `dir`. */
  image: (ref: ImageRef, dir: string, options?: GetOptions & { platform?: Platform | undefined }) => Promise<ImageResult>
  close: () => Promise<void>
}

interface Descriptor {
  mediaType?: string
  digest: string
  size?: number
  platform?: Platform
}

const REF_NAME = 'org.opencontainers.image.ref.name'
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json'

export function createImageGetter (components: GetterComponents, init: GetterInit): ImageGetter {
  const own = components.dispatcher === undefined ? new Agent({ keepAliveTimeout: 10_000 }) : undefined
  const dispatcher = components.dispatcher ?? (own as Agent)
  const peer = new URL(init.peer)
  const metadataTimeoutMs = init.metadataTimeoutMs ?? 60_000
  const idleTimeoutMs = init.idleTimeoutMs ?? 60_000
  const basic = init.username === undefined ? undefined : basicAuthorization(init.username, init.password ?? '')
  // One authorization per repository: Basic as given, or a bearer token from the registry's realm.
  const authorizations = new Map<string, string>()

  async function send (ref: ImageRef, urlPath: string, headers: Record<string, string>, limits: { signal: AbortSignal, idle: boolean }): Promise<Dispatcher.ResponseData> {
    const key = `${ref.registry.server}\n${ref.repository}`
    for (let attempt = 0; ; attempt++) {
      const authorization = authorizations.get(key) ?? basic
      let res: Dispatcher.ResponseData
      try {
        const named = ref.schemeGiven || ref.registry.dockerHub
        res = await dispatcher.request({
          origin: peer.origin,
          path: named ? urlPath : `${urlPath}?ns=${encodeURIComponent(ref.registry.name)}`,
          method: 'GET',
          headers: { ...headers, ...(named ? { 'x-dragonfly-registry': ref.registry.server } : {}), ...(authorization === undefined ? {} : { authorization }) },
          signal: limits.signal,
          headersTimeout: limits.idle ? idleTimeoutMs : metadataTimeoutMs,
          bodyTimeout: idleTimeoutMs
        })
      } catch (err) {
        throw transportError(err, limits.signal)
      }
      if (res.statusCode !== 401 || attempt > 0) return res
      const challenge = header(res, 'www-authenticate')
      await res.body.dump().catch(() => {})
      const token = await bearerToken(ref, challenge, limits.signal)
      if (token === undefined) throw new UnauthorizedError(unauthorizedMessage(ref), challenge)
      authorizations.set(key, token)
    }
  }

  /**
   * The peer hands the registry's challenge back unchanged. A Basic realm has
   * already had our credentials (or we have none); a Bearer realm is asked
   * for a pull token, directly, as containerd and skopeo do.
   */
  async function bearerToken (ref: ImageRef, challenge: string | undefined, signal: AbortSignal): Promise<string | undefined> {
    const realm = pullTokenUrl(parseChallenge(challenge), ref.repository)
    if (realm === undefined) return undefined
    const deadline = withDeadline(signal, metadataTimeoutMs, 'registry token request')
    let res: Dispatcher.ResponseData
    try {
      res = await dispatcher.request({ origin: realm.origin, path: `${realm.pathname}${realm.search}`, method: 'GET', headers: basic === undefined ? {} : { authorization: basic }, signal: deadline })
    } catch (err) {
      throw transportError(err, deadline, `the registry's token service at ${realm.origin}`)
    }
    const body = await readBounded(res.body, MAX_TOKEN_BYTES)
    if (res.statusCode === 401 || res.statusCode === 403) return undefined
    if (res.statusCode !== 200) throw new OriginProtocolError(`the registry's token service answered ${res.statusCode}`)
    return parsePullToken(body).authorization
  }

  function unauthorizedMessage (ref: ImageRef): string {
    const where = `${ref.registry.name}/${ref.repository}`
    return basic === undefined ? `${where} requires credentials` : `the registry refused the credentials of ${JSON.stringify(init.username)} for ${where}`
  }

  async function failure (res: Dispatcher.ResponseData, ref: ImageRef, urlPath: string, what: { digest?: string, reference?: string }): Promise<never> {
    const body = await readBounded(res.body, MAX_ERROR_BODY_BYTES).catch(() => Buffer.alloc(0))
    const why = ociErrorMessage(body)
    const because = why === undefined ? '' : `: ${why}`
    // The peer refuses registries it is not configured for before asking them anything.
    const denied = header(res, 'x-dragonfly-error-type') === 'proxy'
      ? `the peer at ${peer.origin} refused ${ref.registry.name}${because}`
      : `the registry denied access to ${ref.registry.name}/${ref.repository}${because}`
    // A 429 or 5xx is the peer's answer (it says why in the body), not the registry's.
    throw refusalError(res.statusCode, res, { digest: what.digest, manifest: `${ref.registry.name}/${ref.repository}:${what.reference ?? ''}`, unauthorized: unauthorizedMessage(ref), denied }) ??
      new MirrorStatusError(res.statusCode, `${peer.origin}${urlPath}`, why)
  }

  /** A manifest, whole in memory (bounded) and checked against the digest it was asked by or announced with. */
  async function getManifest (ref: ImageRef, reference: string, signal: AbortSignal | undefined): Promise<{ body: Buffer, digest: string, mediaType: string }> {
    const deadline = withDeadline(signal, metadataTimeoutMs, `manifest ${reference}`)
    const urlPath = `/v2/${ref.repository}/manifests/${reference}`
    const res = await send(ref, urlPath, { accept: DEFAULT_MANIFEST_ACCEPT }, { signal: deadline, idle: false })
    if (res.statusCode !== 200) return failure(res, ref, urlPath, { reference })
    let body: Buffer
    try {
      body = await readBounded(res.body, MAX_MANIFEST_BYTES)
    } catch (err) {
      throw transportError(err, deadline)
    }
    const computed = `sha256:${createHash('sha256').update(body).digest('hex')}`
    const expected = reference.includes(':') ? reference : header(res, 'docker-content-digest')
    if (expected !== undefined && expected.startsWith('sha256:') && expected !== computed) throw new BlobDigestMismatchError(expected, computed)
    let declared: unknown
    try {
      declared = (JSON.parse(body.toString('utf8')) as { mediaType?: unknown }).mediaType
    } catch {
      throw new OriginProtocolError(`manifest ${reference} is not JSON`)
    }
    const contentType = header(res, 'content-type')?.split(';')[0]?.trim()
    const mediaType = typeof declared === 'string' ? declared : contentType ?? 'application/vnd.oci.image.manifest.v1+json'
    return { body, digest: computed, mediaType }
  }

  /** Streams a blob to `target` through a hash; renames it into place only once it verified. */
  async function download (ref: ImageRef, descriptor: Descriptor, target: string, kind: BlobKind, options: GetOptions): Promise<number> {
    const digest = parseDigest(descriptor.digest)
    const { signal, onProgress } = options
    signal?.throwIfAborted()
    const temp = path.join(path.dirname(target), `.${path.basename(target)}.partial-${randomBytes(4).toString('hex')}`)
    const urlPath = `/v2/${ref.repository}/blobs/${digest.value}`
    const controller = new AbortController()
    const onAbort = (): void => { controller.abort(signal?.reason ?? new AbortError('download')) }
    signal?.addEventListener('abort', onAbort, { once: true })
    try {
      const res = await send(ref, urlPath, {}, { signal: controller.signal, idle: true })
      if (res.statusCode !== 200) return await failure(res, ref, urlPath, { digest: digest.value })
      const announced = Number(header(res, 'content-length'))
      const total = descriptor.size ?? (Number.isSafeInteger(announced) && announced >= 0 ? announced : undefined)
      onProgress?.({ type: 'start', digest: digest.value, kind, total })
      const hash = createHash(digest.algorithm)
      let bytes = 0
      const verify = new Transform({
        transform (chunk: Buffer, _encoding, callback) {
          bytes += chunk.length
          // A peer that sends more than the descriptor says is wrong already; stop writing its bytes.
          if (descriptor.size !== undefined && bytes > descriptor.size) {
            callback(new BlobDigestMismatchError(digest.value, `more than ${descriptor.size} bytes`))
            return
          }
          hash.update(chunk)
          onProgress?.({ type: 'progress', digest: digest.value, bytes, total })
          callback(null, chunk)
        }
      })
      try {
        await pipeline(res.body, verify, createWriteStream(temp, { flags: 'wx', flush: true }), { signal: controller.signal })
      } catch (err) {
        if (isDamselflyError(err) || (err as NodeJS.ErrnoException).syscall !== undefined) throw err
        throw transportError(err, controller.signal)
      }
      const actual = `${digest.algorithm}:${hash.digest('hex')}`
      if (actual !== digest.value) throw new BlobDigestMismatchError(digest.value, actual)
      if (descriptor.size !== undefined && bytes !== descriptor.size) throw new BlobDigestMismatchError(digest.value, `${bytes} bytes, not ${descriptor.size}`)
      await rename(temp, target)
      onProgress?.({ type: 'done', digest: digest.value, bytes, skipped: false })
      return bytes
    } catch (err) {
      await rm(temp, { force: true })
      if (signal?.aborted === true) throw signal.reason
      throw err
    } finally {
      signal?.removeEventListener('abort', onAbort)
    }
  }

  return {
    async blob (ref, file, options = {}) {
      if (ref.digest === undefined) throw new NotFoundError('a digest in the reference (REGISTRY/REPO@sha256:…)')
      const target = path.resolve(file)
      await mkdir(path.dirname(target), { recursive: true })
      const size = await download(ref, { digest: ref.digest, ...(options.size === undefined ? {} : { size: options.size }) }, target, 'blob', options)
      return { digest: ref.digest, size }
    },

    async image (ref, dir, options = {}) {
      const { signal, onProgress } = options
      const platform = options.platform ?? hostPlatform()
      const root = path.resolve(dir)
      await mkdir(path.join(root, 'blobs'), { recursive: true })
      await writeIfChanged(path.join(root, 'oci-layout'), `${JSON.stringify({ imageLayoutVersion: '1.0.0' })}\n`)

      let manifest = await getManifest(ref, ref.digest ?? ref.tag ?? 'latest', signal)
      let chosenPlatform: Platform | undefined
      if (INDEX_MEDIA_TYPES.has(manifest.mediaType)) {
        const index = JSON.parse(manifest.body.toString('utf8')) as { manifests?: Descriptor[] }
        const entry = pickPlatform(index.manifests ?? [], platform)
        if (entry === undefined) {
          const offered = (index.manifests ?? []).flatMap(m => m.platform === undefined ? [] : [formatPlatform(m.platform)])
          throw new NotFoundError(`a manifest for ${formatPlatform(platform)} in ${ref.registry.name}/${ref.repository} (the index has ${offered.join(', ') || 'none'})`)
        }
        chosenPlatform = entry.platform
        manifest = await getManifest(ref, entry.digest, signal)
      }
      onProgress?.({ type: 'manifest', digest: manifest.digest, mediaType: manifest.mediaType, ...(chosenPlatform === undefined ? {} : { platform: formatPlatform(chosenPlatform) }) })
      const parsed = JSON.parse(manifest.body.toString('utf8')) as { schemaVersion?: number, config?: Descriptor, layers?: Descriptor[] }
      if (parsed.schemaVersion !== 2 || parsed.config === undefined || !Array.isArray(parsed.layers)) {
        throw new OriginProtocolError(`manifest ${manifest.digest} (${manifest.mediaType}) is not an image manifest this tool can lay out`)
      }

      const wanted: Array<{ descriptor: Descriptor, kind: BlobKind }> = [
        { descriptor: parsed.config, kind: 'config' },
        ...parsed.layers.map(descriptor => ({ descriptor, kind: 'layer' as const }))
      ]
      let fetched = 0
      let skipped = 0
      for (const { descriptor, kind } of wanted) {
        const digest = parseDigest(descriptor.digest)
        const target = await blobPath(root, digest)
        if (await alreadyThere(target, digest, descriptor.size, signal)) {
          skipped++
          onProgress?.({ type: 'done', digest: digest.value, bytes: descriptor.size ?? 0, skipped: true })
          continue
        }
        await download(ref, descriptor, target, kind, options)
        fetched++
      }
      // The manifest goes in last: a layout whose index names a manifest has all of its blobs.
      await writeIfChanged(await blobPath(root, parseDigest(manifest.digest)), manifest.body)
      await addToIndex(root, {
        mediaType: manifest.mediaType,
        digest: manifest.digest,
        size: manifest.body.length,
        ...(chosenPlatform === undefined ? {} : { platform: chosenPlatform }),
        ...(ref.tag === undefined ? {} : { annotations: { [REF_NAME]: ref.tag } })
      })
      return { manifest: manifest.digest, blobs: wanted.length, fetched, skipped }
    },

    async close () {
      await own?.close()
    }
  }
}

async function blobPath (root: string, digest: Digest): Promise<string> {
  const dir = path.join(root, 'blobs', digest.algorithm)
  await mkdir(dir, { recursive: true })
  return path.join(dir, digest.hex)
}

/** True when `file` exists and hashes to `digest` (streamed; a blob may be large). */
async function alreadyThere (file: string, digest: Digest, size: number | undefined, signal: AbortSignal | undefined): Promise<boolean> {
  try {
    const info = await stat(file)
    if (size !== undefined && info.size !== size) return false
  } catch {
    return false
  }
  const hash = createHash(digest.algorithm)
  await pipeline(createReadStream(file), async (source: AsyncIterable<Buffer>) => {
    for await (const chunk of source) hash.update(chunk)
  }, { signal })
  return `${digest.algorithm}:${hash.digest('hex')}` === digest.value
}

async function writeIfChanged (file: string, data: string | Buffer): Promise<void> {
  try {
    if ((await readFile(file)).equals(Buffer.from(data))) return
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new StorageError(`cannot read ${file}: ${(err as Error).message}`, { cause: err })
  }
  await replaceFile(file, data)
}

/** index.json keeps the images already there; an entry with the same tag (or, untagged, the same digest) is replaced. */
async function addToIndex (root: string, entry: Descriptor & { annotations?: Record<string, string> }): Promise<void> {
  const file = path.join(root, 'index.json')
  let manifests: Array<Descriptor & { annotations?: Record<string, string> }> = []
  try {
    const parsed = JSON.parse(await readFile(file, 'utf8')) as { manifests?: typeof manifests }
    if (Array.isArray(parsed.manifests)) manifests = parsed.manifests
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new StorageError(`${file} exists but is not an OCI index: ${(err as Error).message}`, { cause: err })
  }
  const tag = entry.annotations?.[REF_NAME]
  const kept = manifests.filter(m => tag !== undefined ? m.annotations?.[REF_NAME] !== tag : !(m.digest === entry.digest && m.annotations?.[REF_NAME] === undefined))
  await writeIfChanged(file, `${JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [...kept, entry] }, null, 2)}\n`)
}

/** Aborts stay aborts (the caller's reason); anything else on the wire means the peer is not there for us. */
function transportError (err: unknown, signal: AbortSignal, what = 'the peer'): unknown {
  if (signal.aborted) return signal.reason ?? new AbortError()
  if (isAbort(err) || isDamselflyError(err)) return err
  const code = (err as { code?: unknown }).code
  if (code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT') return new TimeoutError(`waiting for ${what}`)
  return new PeerUnavailableError(`cannot reach ${what}: ${(err as Error).message}`, { cause: err })
}
