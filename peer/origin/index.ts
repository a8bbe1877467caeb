import { Readable } from 'node:stream'
import type { Dispatcher } from 'undici'
import { backoff, sleep, withDeadline, type AbortOptions } from '../../src/abort.ts'
import { OriginProtocolError, OriginStatusError, OriginUnavailableError, RangeNotSatisfiableError, isAbort, redactUrl } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, type Registry } from '../../src/metrics.ts'
import type { ByteRange } from '../../src/oci/range.ts'
import { parseChallenge } from '../../src/oci/challenge.ts'
import { MAX_ERROR_BODY_BYTES, MAX_MANIFEST_BYTES, header, readBounded } from '../../src/oci/response.ts'
import { refusalError } from '../../src/oci/status.ts'
import { MAX_TOKEN_BYTES, basicAuthorization, parsePullToken, pullTokenUrl } from '../../src/oci/token.ts'
import type { Upstream } from '../upstream/index.ts'
import { createHash } from 'node:crypto'
import { LRUCache } from 'lru-cache'

export interface OriginClientComponents {
  logger: Logger
  /** One undici Agent for the process: it keeps a keep-alive pool per origin. */
  dispatcher: Dispatcher
  metrics?: Registry | undefined
}

export interface OriginClientInit {
  /** Attempts for a request that fails before its body starts (connection errors, 5xx). Default 3. */
  attempts?: number
  /** First backoff step; doubles per attempt with full jitter. Default 200 ms. */
  retryBaseMs?: number
  /** Redirects followed inside the peer (to blob storage). Default 5. */
  maxRedirects?: number
  /** Deadline for a HEAD or manifest request, whole. Default 30 s. */
  metadataTimeoutMs?: number
  /** Deadline until response headers of a blob request. Default 60 s. */
  blobHeadersTimeoutMs?: number
  /** Longest pause between two chunks of a blob body before it is abandoned. Default 30 s. */
  blobIdleTimeoutMs?: number
  userAgent?: string
}

/** A registry account (preheat jobs carry one); turned into an Authorization by `authorize`. */
export interface RegistryIdentity {
  username: string
  password: string
}

/** Request headers that matter to the origin; nothing else from the caller is forwarded. */
export interface OriginCredentials {
  /** The caller's `Authorization`, forwarded to the origin only. */
  authorization?: string | undefined
}

export interface BlobHead {
  size: number
  digest: string | undefined
  mediaType: string | undefined
}

export interface BlobBody {
  /** First byte of the body within the blob. */
  start: number
  /** Bytes the body will carry. */
  length: number
  /** Size of the whole blob, when the origin said. */
  size: number | undefined
  body: Readable
}

export interface ManifestResponse {
  status: number
  mediaType: string | undefined
  digest: string | undefined
  size: number
  /** The manifest bytes; bounded by MAX_MANIFEST_BYTES. Empty for HEAD. */
  body: Buffer
}

/** A listing as the origin answered it: tags, or referrers. */
export interface ListingResponse {
  status: number
  /** The headers a client of a listing reads: type, pagination, auth challenge, referrers filters. */
  headers: { 'content-type'?: string, link?: string, 'www-authenticate'?: string, 'oci-filters-applied'?: string }
  /** Bounded by MAX_MANIFEST_BYTES (an error body by MAX_ERROR_BODY_BYTES). */
  body: Buffer
}

export interface ProxiedResponse {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: Readable
}

const RETRY_STATUSES = new Set([500, 502, 503, 504])
const ORIGIN_REFUSALS = { unauthorized: 'the origin requires authentication', denied: 'the origin denied access', rateLimited: 'the origin is rate limiting' }

interface Limits {
  signal: AbortSignal | undefined
  headersTimeout?: number
  bodyTimeout?: number
}

export interface OriginClient {
  headBlob: (upstream: Upstream, repo: string, digest: string, credentials: OriginCredentials, options?: AbortOptions) => Promise<BlobHead>
  /** GETs a blob, or the bytes `range` covers. A 200 to a ranged request is trimmed to the range. */
  getBlob: (upstream: Upstream, repo: string, digest: string, range: ByteRange | undefined, credentials: OriginCredentials, options?: AbortOptions) => Promise<BlobBody>
  getManifest: (upstream: Upstream, repo: string, reference: string, accept: string, credentials: OriginCredentials, options?: AbortOptions & { method?: 'GET' | 'HEAD' }) => Promise<ManifestResponse>
  /**
   * GETs a listing (`/v2/<name>/tags/list`, `/v2/<name>/referrers/<digest>`,
   * with their query) for the caller, with the caller's credentials: what a
   * registry lists is its answer to this caller, so it is never cached. 2xx
   * and 4xx come back as the origin gave them; 5xx is OriginUnavailableError.
   */
  listing: (upstream: Upstream, pathAndQuery: string, credentials: OriginCredentials, options?: AbortOptions) => Promise<ListingResponse>
  /** `GET /v2/` for the caller, so a 401 and its challenge come from the real origin. */
  ping: (upstream: Upstream, credentials: OriginCredentials, options?: AbortOptions) => Promise<{ status: number, challenge: string | undefined }>
  /**
   * Credentials for this peer's own requests (seeds, preheat): answers the
   * registry's challenge with Basic, or fetches a pull token from its realm —
   * anonymously when there is no identity, which is how public images on
   * token-auth registries (Docker Hub, Harbor) are read. Tokens are cached
   * in memory until shortly before they expire.
   */
  authorize: (upstream: Upstream, repo: string, identity: RegistryIdentity | undefined, options?: AbortOptions) => Promise<OriginCredentials>
}

export function createOriginClient (components: OriginClientComponents, init: OriginClientInit = {}): OriginClient {
  const logger = components.logger.child({ component: 'peer:origin' })
  const attempts = init.attempts ?? 3
  const retryBaseMs = init.retryBaseMs ?? 200
  const maxRedirects = init.maxRedirects ?? 5
  const metadataTimeoutMs = init.metadataTimeoutMs ?? 30_000
  const blobHeadersTimeoutMs = init.blobHeadersTimeoutMs ?? 60_000
  const blobIdleTimeoutMs = init.blobIdleTimeoutMs ?? 30_000
  const userAgent = init.userAgent ?? 'damselfly'
  const registers = components.metrics === undefined ? undefined : [components.metrics]
  const requests = registers === undefined
    ? undefined
    : new Counter({ name: 'damselfly_origin_requests_total', help: 'Requests sent to origin registries, by method and status class', labelNames: ['method', 'status'], registers })

  /**
   * One logical request: retried on connection errors and 5xx before any body
   * byte is handed out, redirects followed (dropping Authorization when the
   * redirect leaves the registry's origin, as storage pre-signs its own URLs).
   */
  async function send (method: 'GET' | 'HEAD', url: string, headers: Record<string, string>, limits: Limits): Promise<Dispatcher.ResponseData> {
    const { signal } = limits
    let lastError: unknown
    for (let attempt = 0; attempt < attempts; attempt++) {
      if (attempt > 0) await sleep(backoff(attempt, retryBaseMs, 5_000), { signal })
      try {
        const res = await followRedirects(method, url, headers, limits)
        requests?.inc({ method, status: `${Math.floor(res.statusCode / 100)}xx` })
        if (RETRY_STATUSES.has(res.statusCode) && attempt < attempts - 1) {
          lastError = new OriginUnavailableError(`origin answered ${res.statusCode} for ${redactUrl(url)}`)
          await res.body.dump().catch(() => {})
          continue
        }
        return res
      } catch (err) {
        if (signal?.aborted === true) throw signal.reason
        if (isAbort(err)) throw err
        requests?.inc({ method, status: 'error' })
        lastError = err
        logger.debug({ err, url: redactUrl(url), attempt }, 'origin request failed')
        // Asking again will not change what the server speaks.
        if (plainHttpAnswer(err)) throw new OriginUnavailableError(plainHttpHint(url), { cause: err })
      }
    }
    if (lastError instanceof OriginUnavailableError) throw lastError
    throw new OriginUnavailableError(`origin unreachable for ${redactUrl(url)}: ${(lastError as Error | undefined)?.message ?? 'unknown error'}`, { cause: lastError })
  }

  async function followRedirects (method: 'GET' | 'HEAD', url: string, headers: Record<string, string>, limits: Limits): Promise<Dispatcher.ResponseData> {
    let current = new URL(url)
    let currentHeaders = headers
    for (let hop = 0; ; hop++) {
      const res = await components.dispatcher.request({
        origin: current.origin,
        path: `${current.pathname}${current.search}`,
        method,
        headers: { 'user-agent': userAgent, ...currentHeaders },
        signal: limits.signal ?? null,
        ...(limits.headersTimeout === undefined ? {} : { headersTimeout: limits.headersTimeout }),
        ...(limits.bodyTimeout === undefined ? {} : { bodyTimeout: limits.bodyTimeout })
      })
      const location = res.headers.location
      if (res.statusCode < 300 || res.statusCode >= 400 || res.statusCode === 304 || location === undefined) return res
      await res.body.dump().catch(() => {})
      if (hop >= maxRedirects) throw new OriginProtocolError(`too many redirects from ${redactUrl(url)}`)
      const next = new URL(Array.isArray(location) ? location[0] as string : location, current)
      if (next.protocol !== 'http:' && next.protocol !== 'https:') throw new OriginProtocolError(`redirect to a non-http URL from ${redactUrl(url)}`)
      if (next.origin !== current.origin) {
        const { authorization: _dropped, ...rest } = currentHeaders
        currentHeaders = rest
      }
      current = next
    }
  }

  async function failure (res: Dispatcher.ResponseData, url: string, what: { digest?: string, reference?: string }): Promise<never> {
    const status = res.statusCode
    const body = await readBounded(res.body, MAX_ERROR_BODY_BYTES, { truncate: true }).catch(() => undefined)
    const refused = refusalError(status, res, { digest: what.digest, manifest: what.reference, ...ORIGIN_REFUSALS })
    if (refused !== undefined) throw refused
    if (status >= 500) throw new OriginUnavailableError(`origin answered ${status} for ${redactUrl(url)}`)
    throw new OriginStatusError(status, url, body?.toString('utf8'))
  }

  const tokens = new LRUCache<string, { credentials: OriginCredentials, until: number }>({ max: 1024 })

  async function authorize (upstream: Upstream, repo: string, identity: RegistryIdentity | undefined, options: AbortOptions): Promise<OriginCredentials> {
    const basic = identity === undefined ? undefined : basicAuthorization(identity.username, identity.password)
    const key = `${upstream.origin}\n${repo}\n${basic === undefined ? '-' : createHash('sha256').update(basic).digest('base64url')}`
    const cached = tokens.get(key)
    if (cached !== undefined && cached.until > Date.now()) return cached.credentials
    const signal = withDeadline(options.signal, metadataTimeoutMs, 'registry authorization')
    const ping = await send('GET', `${upstream.origin}/v2/`, {}, { signal })
    await ping.body.dump().catch(() => {})
    const challenge = ping.statusCode === 401 ? parseChallenge(header(ping, 'www-authenticate')) : undefined
    let credentials: OriginCredentials = basic === undefined ? {} : { authorization: basic }
    let ttl = 300_000
    const realm = pullTokenUrl(challenge, repo)
    if (realm !== undefined) {
      const res = await send('GET', realm.toString(), basic === undefined ? {} : { authorization: basic }, { signal })
      if (res.statusCode !== 200) return failure(res, realm.toString(), { reference: 'token' })
      const token = parsePullToken(await readBounded(res.body, MAX_TOKEN_BYTES))
      credentials = { authorization: token.authorization }
      ttl = Math.max(10, (token.expiresIn ?? 60) - 30) * 1000
    }
    tokens.set(key, { credentials, until: Date.now() + ttl })
    return credentials
  }

  function authHeaders (credentials: OriginCredentials, extra: Record<string, string> = {}): Record<string, string> {
    return credentials.authorization === undefined ? extra : { ...extra, authorization: credentials.authorization }
  }

  return {
    async headBlob (upstream, repo, digest, credentials, options = {}) {
      const signal = withDeadline(options.signal, metadataTimeoutMs, 'origin HEAD')
      const url = `${upstream.origin}/v2/${repo}/blobs/${digest}`
      const res = await send('HEAD', url, authHeaders(credentials), { signal })
      await res.body.dump().catch(() => {})
      if (res.statusCode !== 200) return failure(res, url, { digest })
      const size = Number(header(res, 'content-length'))
      if (!Number.isSafeInteger(size) || size < 0) throw new OriginProtocolError(`origin sent no usable Content-Length for ${digest}`)
      return { size, digest: header(res, 'docker-content-digest'), mediaType: header(res, 'content-type') }
    },

    async getBlob (upstream, repo, digest, range, credentials, options = {}) {
      const url = `${upstream.origin}/v2/${repo}/blobs/${digest}`
      const extra: Record<string, string> = range === undefined ? {} : { range: `bytes=${range.start}-${range.end}` }
      // Headers get a deadline; a long body only an idle limit, so a slow but
      // steady origin can take as long as the blob needs.
      const res = await send('GET', url, authHeaders(credentials, extra), { signal: options.signal, headersTimeout: blobHeadersTimeoutMs, bodyTimeout: blobIdleTimeoutMs })
      if (res.statusCode === 416 && range !== undefined) {
        await res.body.dump().catch(() => {})
        throw new RangeNotSatisfiableError(extra.range as string, Number(/\/(\d+)$/.exec(header(res, 'content-range') ?? '')?.[1] ?? 0))
      }
      if (res.statusCode !== 200 && res.statusCode !== 206) return failure(res, url, { digest })
      if (res.statusCode === 206) {
        const cr = parseContentRange(header(res, 'content-range'))
        if (cr === undefined || range === undefined || cr.start !== range.start || cr.end !== range.end) {
          res.body.destroy()
          throw new OriginProtocolError(`origin answered a different range (${header(res, 'content-range') ?? 'none'}) for ${digest}`)
        }
        return { start: cr.start, length: cr.end - cr.start + 1, size: cr.size, body: res.body }
      }
      const total = Number(header(res, 'content-length'))
      const size = Number.isSafeInteger(total) ? total : undefined
      if (range === undefined) {
        if (size === undefined) {
          res.body.destroy()
          throw new OriginProtocolError(`origin sent no Content-Length for ${digest}`)
        }
        return { start: 0, length: size, size, body: res.body }
      }
      // The origin ignored Range: skip to the start and stop after the end.
      logger.debug({ digest }, 'origin ignored Range; trimming a full response')
      return { start: range.start, length: range.end - range.start + 1, size, body: trim(res.body, range.start, range.end - range.start + 1) }
    },

    async getManifest (upstream, repo, reference, accept, credentials, options = {}) {
      const method = options.method ?? 'GET'
      const signal = withDeadline(options.signal, metadataTimeoutMs, 'origin manifest request')
      const url = `${upstream.origin}/v2/${repo}/manifests/${reference}`
      const res = await send(method, url, authHeaders(credentials, { accept }), { signal })
      if (res.statusCode !== 200) return failure(res, url, { reference })
      const declared = Number(header(res, 'content-length'))
      if (Number.isSafeInteger(declared) && declared > MAX_MANIFEST_BYTES) {
        res.body.destroy()
        throw new OriginProtocolError(`manifest ${reference} is larger than ${MAX_MANIFEST_BYTES} bytes`)
      }
      const body = method === 'HEAD' ? Buffer.alloc(0) : await readBounded(res.body, MAX_MANIFEST_BYTES)
      if (method === 'HEAD') await res.body.dump().catch(() => {})
      return {
        status: res.statusCode,
        mediaType: header(res, 'content-type'),
        digest: header(res, 'docker-content-digest'),
        size: method === 'HEAD' ? declared : body.length,
        body
      }
    },

    authorize: async (upstream, repo, identity, options = {}) => authorize(upstream, repo, identity, options),

    async listing (upstream, pathAndQuery, credentials, options = {}) {
      const signal = withDeadline(options.signal, metadataTimeoutMs, 'origin listing request')
      const url = `${upstream.origin}${pathAndQuery}`
      const res = await send('GET', url, authHeaders(credentials, { accept: 'application/json, application/vnd.oci.image.index.v1+json' }), { signal })
      if (res.statusCode >= 500 || res.statusCode < 200 || (res.statusCode >= 300 && res.statusCode < 400)) {
        await res.body.dump().catch(() => {})
        throw new OriginUnavailableError(`origin answered ${res.statusCode} for ${redactUrl(url)}`)
      }
      const ok = res.statusCode < 300
      const body = await readBounded(res.body, ok ? MAX_MANIFEST_BYTES : MAX_ERROR_BODY_BYTES, { truncate: !ok })
      const headers: ListingResponse['headers'] = {}
      for (const name of ['content-type', 'link', 'www-authenticate', 'oci-filters-applied'] as const) {
        const value = header(res, name)
        if (value !== undefined) headers[name] = value
      }
      return { status: res.statusCode, headers, body }
    },

    async ping (upstream, credentials, options = {}) {
      const signal = withDeadline(options.signal, metadataTimeoutMs, 'origin ping')
      const res = await send('GET', `${upstream.origin}/v2/`, authHeaders(credentials), { signal })
      await res.body.dump().catch(() => {})
      return { status: res.statusCode, challenge: header(res, 'www-authenticate') }
    }
  }
}

export function parseContentRange (value: string | undefined): { start: number, end: number, size: number | undefined } | undefined {
  if (value === undefined) return undefined
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(value.trim())
  if (m === null) return undefined
  const start = Number(m[1])
  const end = Number(m[2])
  const size = m[3] === '*' ? undefined : Number(m[3])
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end < start) return undefined
  return { start, end, size }
}

/** A readable that skips `skip` bytes of `source` and ends after `length` more. */
function trim (source: Readable, skip: number, length: number): Readable {
  let toSkip = skip
  let left = length
  async function * trimmed (): AsyncGenerator<Buffer> {
    for await (const c of source) {
      let chunk = c as Buffer
      if (toSkip > 0) {
        if (chunk.length <= toSkip) { toSkip -= chunk.length; continue }
        chunk = chunk.subarray(toSkip)
        toSkip = 0
      }
      if (chunk.length >= left) {
        yield chunk.subarray(0, left)
        left = 0
        return
      }
      left -= chunk.length
      yield chunk
    }
  }
  const out = Readable.from(trimmed(), { objectMode: false })
  // Stopping early must release the origin's connection.
  out.once('close', () => { source.destroy() })
  return out
}

/** A TLS handshake that met a plain-HTTP server: OpenSSL reads the HTTP answer as a record of an unknown version. */
function plainHttpAnswer (err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++) {
    if ((e as { code?: unknown }).code === 'ERR_SSL_WRONG_VERSION_NUMBER' || /wrong version number|packet length too long/i.test(e.message)) return true
  }
  return false
}

function plainHttpHint (url: string): string {
  const { host } = new URL(url)
  return `https://${host} answered a TLS handshake in plain HTTP: if it is a plain-HTTP registry, name it http://${host} (in the peer's registries, e.g. --registries http://${host}, or with http:// in the image reference)`
}
