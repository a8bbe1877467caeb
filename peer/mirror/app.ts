import { randomUUID } from 'node:crypto'
import { Socket } from 'node:net'
import type { Readable } from 'node:stream'
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerFactory } from 'fastify'
import { giveBackWhenWritten } from '../../src/buffer-pool.ts'
import { AbortError, InvalidQueryError, NotFoundError, OriginUnavailableError, UnsupportedOperationError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, Histogram, type Registry } from '../../src/metrics.ts'
import { parseDigest } from '../../src/oci/digest.ts'
import { DEFAULT_MANIFEST_ACCEPT } from '../../src/oci/media-types.ts'
import { isTag, validateName, validateReference } from '../../src/oci/names.ts'
import { formatContentRange, parseRangeSpec, resolveRange } from '../../src/oci/range.ts'
import { Priority, type BlobService, type OpenBlob, type OpenBlobRequest } from '../blobs/index.ts'
import type { Passthrough } from '../blobs/passthrough.ts'
import type { ManifestService } from '../manifests/index.ts'
import type { OriginClient, OriginCredentials } from '../origin/index.ts'
import type { Upstream, UpstreamSelector } from '../upstream/index.ts'
import { ociError, sendError } from './errors.ts'

export interface MirrorComponents {
  logger: Logger
  blobs: BlobService
  manifests: ManifestService
  /** Content of registries nobody configured, when `allowUnlistedRegistries` lets requests name them. */
  passthrough: Passthrough
  /** For `/v2/`, which reflects the origin's answer. */
  origin: OriginClient
  upstreams: UpstreamSelector
  metrics: Registry
  /** True once every component is started; `/healthy` answers 503 until then. */
  ready: () => boolean
}

export interface MirrorInit {
  /**
   * The registry this listener serves when a request names none. Lets one
   * peer give each registry its own port for clients that send no headers.
   */
  upstream?: Upstream | undefined
  /** Deadline for a request's headers. Default 30 s. */
  headersTimeoutMs?: number
  /** Idle keep-alive connections are closed after this. Default 65 s. */
  keepAliveTimeoutMs?: number
  /**
   * Builds the HTTP server around the app's handler; the forward proxy uses it
   * to take absolute-form requests and CONNECT on the same port.
   */
  serverFactory?: FastifyServerFactory | undefined
}

const REGISTRY_HEADER = 'x-dragonfly-registry'
const PRIORITY_HEADER = 'x-dragonfly-priority'
const PREFETCH_HEADER = 'x-dragonfly-prefetch'
const API_VERSION = { 'docker-distribution-api-version': 'registry/2.0' }
/** RFC 9111 §5.5 style marker for a tag answered from memory while the origin is down. */
const STALE_WARNING = '110 damselfly "Response is Stale"'
const DEFAULT_MANIFEST_TYPE = 'application/vnd.oci.image.manifest.v1+json'

type Route =
  | { kind: 'base' }
  | { kind: 'manifest', name: string, reference: string }
  | { kind: 'blob', name: string, digest: string }
  | { kind: 'tags', name: string }
  | { kind: 'referrers', name: string, digest: string }

/** The query parameters each listing passes on, and the form each must have. */
const TAGS_QUERY: Record<string, { test: (v: string) => boolean, form: string }> = {
  n: { test: v => /^\d{1,6}$/.test(v), form: 'a number of tags, e.g. 100' },
  last: { test: v => isTag(v), form: 'a tag, e.g. v1.2' }
}
const REFERRERS_QUERY: Record<string, { test: (v: string) => boolean, form: string }> = {
  artifactType: { test: v => /^[a-z0-9][\w.+-]{0,126}\/[\w.+-]{1,127}$/i.test(v), form: 'a media type, e.g. application/vnd.dev.cosign.artifact.sig.v1+json' }
}

/**
 * The pull side of the OCI distribution API. Domain services do the work;
 * this layer parses, picks the upstream, calls them and streams the reply.
 */
export function buildMirrorApp (components: MirrorComponents, init: MirrorInit = {}): FastifyInstance {
  const { blobs, origin, upstreams } = components
  const logger = components.logger.child({ component: 'peer:mirror' })
  const app = Fastify({
    loggerInstance: logger as FastifyBaseLogger,
    // Per-request lines are ours (debug level, in onResponse): nydusd's range traffic would flood info.
    logController: new LogController({ disableRequestLogging: true }),
    genReqId: (req) => {
      const given = req.headers['x-request-id']
      return typeof given === 'string' && /^[\w.-]{1,64}$/.test(given) ? given : randomUUID()
    },
    routerOptions: { ignoreDuplicateSlashes: false, maxParamLength: 2048 },
    bodyLimit: 64 * 1024,
    // Blob responses may stream for a long time; only header reads are bounded.
    connectionTimeout: 0,
    requestTimeout: 0,
    keepAliveTimeout: init.keepAliveTimeoutMs ?? 65_000,
    return503OnClosing: true,
    ...(init.serverFactory === undefined ? {} : { serverFactory: init.serverFactory })
  })
  app.server.headersTimeout = init.headersTimeoutMs ?? 30_000

  // One peer runs several listeners (extra mirror ports, a health port); they share the instruments.
  const requests = (components.metrics.getSingleMetric('damselfly_mirror_requests_total') as Counter | undefined) ?? new Counter({ name: 'damselfly_mirror_requests_total', help: 'Mirror requests, by route kind, method and status', labelNames: ['route', 'method', 'status'], registers: [components.metrics] })
  const durations = (components.metrics.getSingleMetric('damselfly_mirror_request_duration_seconds') as Histogram | undefined) ?? new Histogram({ name: 'damselfly_mirror_request_duration_seconds', help: 'Time to first byte of mirror responses', labelNames: ['route'], buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], registers: [components.metrics] })

  // The id names this request in every log line; the caller gets it back to quote.
  app.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id)
  })
  app.addHook('onSend', async (request, reply) => {
    // Headers are about to leave: this is the time to first byte the caller sees.
    durations.observe({ route: (request as FastifyRequest & { routeKind?: string }).routeKind ?? 'other' }, reply.elapsedTime / 1000)
  })
  app.addHook('onResponse', async (request, reply) => {
    const route = (request as FastifyRequest & { routeKind?: string }).routeKind ?? 'other'
    requests.inc({ route, method: request.method, status: String(reply.statusCode) })
    request.log.debug({ method: request.method, url: request.url, status: reply.statusCode, ms: Math.round(reply.elapsedTime) }, 'request')
  })

  // Probes and metrics: outside the OCI error handling.
  const health = async (_request: FastifyRequest, reply: FastifyReply): Promise<{ status: string }> => {
    if (!components.ready()) return reply.code(503).send({ status: 'starting' })
    return { status: 'ok' }
  }
  app.get('/healthy', health)
  // nydus's own configs use the mirror's root as ping_url; the snapshotter wants a 2xx within 3 s.
  app.get('/', health)
  app.get('/metrics', async (_request, reply) => {
    reply.header('content-type', components.metrics.contentType)
    return components.metrics.metrics()
  })

  app.register(async (v2) => {
    // Pushes and deletes are refused before any body is read or parsed.
    v2.addHook('onRequest', async (request, reply) => {
      reply.headers(API_VERSION)
      if (request.method !== 'GET' && request.method !== 'HEAD') throw new UnsupportedOperationError(`${request.method}`)
    })
    v2.setErrorHandler((err, request, reply) => {
      const status = sendError(reply, err, request.method === 'HEAD')
      if (status >= 500) request.log.warn({ err, url: request.url }, 'mirror request failed')
      else request.log.debug({ err: { code: (err as { code?: string }).code, message: (err as Error).message }, url: request.url }, 'mirror request refused')
    })
    v2.setNotFoundHandler((request, reply) => {
      sendError(reply, new NotFoundError(`${request.method} ${request.url.split('?')[0] ?? ''}`), request.method === 'HEAD')
    })

    const handler = async (request: FastifyRequest, reply: FastifyReply): Promise<void> => {
      const route = parseRoute((request.params as { '*': string })['*'])
      ;(request as FastifyRequest & { routeKind?: string }).routeKind = route.kind
      const upstream = selectUpstream(request)
      const credentials = credentialsOf(request)
      const isHead = request.method === 'HEAD'
      switch (route.kind) {
        case 'base': return base(reply, upstream, credentials)
        case 'blob': return blob(request, reply, upstream, route.name, route.digest, credentials, isHead)
        case 'manifest': return manifest(request, reply, upstream, route.name, route.reference, credentials, isHead)
        case 'tags': return listing(request, reply, upstream, `/v2/${route.name}/tags/list`, TAGS_QUERY, credentials, isHead)
        case 'referrers': return listing(request, reply, upstream, `/v2/${route.name}/referrers/${route.digest}`, REFERRERS_QUERY, credentials, isHead)
      }
    }
    v2.all('/v2/*', handler)
    v2.all('/v2', handler)
  })

  function selectUpstream (request: FastifyRequest): Upstream {
    const header = headerValue(request, REGISTRY_HEADER)
    const ns = (request.query as Record<string, unknown>).ns
    const nsValue = typeof ns === 'string' ? ns : undefined
    if (init.upstream !== undefined && (header === undefined || header === '') && (nsValue === undefined || nsValue === '')) return init.upstream
    return upstreams.select(header, nsValue)
  }

  /**
   * `/v2/` reflects the origin's answer, so clients that decide how to
   * authenticate from this ping (containers/image does) see the real
   * challenge. With the origin down the mirror still answers 200: cached
   * public content stays servable.
   */
  async function base (reply: FastifyReply, upstream: Upstream, credentials: OriginCredentials): Promise<void> {
    try {
      const { status, challenge } = await origin.ping(upstream, credentials, { signal: clientSignal(reply) })
      if (status === 401) {
        if (challenge !== undefined) reply.header('www-authenticate', challenge)
        return await reply.code(401).send(ociError('UNAUTHORIZED', 'authentication required'))
      }
    } catch (err) {
      if (!(err instanceof OriginUnavailableError)) throw err
    }
    await reply.code(200).send({})
  }

  async function blob (request: FastifyRequest, reply: FastifyReply, upstream: Upstream, name: string, digest: string, credentials: OriginCredentials, isHead: boolean): Promise<void> {
    // Syntax first: a malformed Range is refused before anything is fetched.
    const rangeHeader = request.headers.range
    const spec = parseRangeSpec(rangeHeader)
    const signal = clientSignal(reply)
    const priority = priorityOf(request)
    const opened = await open({ upstream, repo: name, digest, kind: 'blob', credentials }, signal)
    const range = spec === undefined || isHead ? undefined : resolveRange(spec, opened.task.size, rangeHeader as string)
    // nydusd (proxy mode) asks for the whole blob to follow a range read into the cache and the swarm.
    if (range !== undefined && upstream.trusted && headerValue(request, PREFETCH_HEADER)?.toLowerCase() === 'true') blobs.prefetch(opened.task)
    await sendContent(reply, opened, range, 'application/octet-stream', isHead, signal, priority)
  }

  async function manifest (request: FastifyRequest, reply: FastifyReply, upstream: Upstream, name: string, reference: string, credentials: OriginCredentials, isHead: boolean): Promise<void> {
    const ref = validateReference(reference)
    const signal = clientSignal(reply)
    if (ref.kind === 'digest') {
      const opened = await open({ upstream, repo: name, digest: ref.value, kind: 'manifest', credentials }, signal)
      return sendContent(reply, opened, undefined, opened.task.mediaType ?? DEFAULT_MANIFEST_TYPE, isHead, signal)
    }
    const answer = await components.manifests.byTag(upstream, name, ref.value, acceptOf(request), credentials, { signal, head: isHead })
    if (answer.from === 'cache') {
      // The origin is down: the tag's last digest, marked stale.
      reply.header('warning', STALE_WARNING)
      reply.header('x-damselfly-stale', new Date(answer.seenAt).toISOString())
      return sendContent(reply, answer.opened, undefined, answer.mediaType ?? DEFAULT_MANIFEST_TYPE, isHead, signal)
    }
    if (answer.digest !== undefined) reply.header('docker-content-digest', answer.digest)
    if (answer.mediaType !== undefined) reply.header('content-type', answer.mediaType)
    reply.header('content-length', answer.size)
    return reply.code(200).send(answer.body)
  }

  /**
   * Tags and referrers come from the origin for each caller, with the
   * caller's credentials, and are never cached: a list is the registry's
   * answer to one caller, and an old one would hide a new tag or signature.
   */
  async function listing (request: FastifyRequest, reply: FastifyReply, upstream: Upstream, path: string, allowed: typeof TAGS_QUERY, credentials: OriginCredentials, isHead: boolean): Promise<void> {
    const given = request.query as Record<string, unknown>
    const query = new URLSearchParams()
    for (const [key, rule] of Object.entries(allowed)) {
      const value = given[key]
      if (value === undefined) continue
      if (typeof value !== 'string' || !rule.test(value)) throw new InvalidQueryError(key, String(value), rule.form)
      query.set(key, value)
    }
    const answer = await origin.listing(upstream, query.size === 0 ? path : `${path}?${query.toString()}`, credentials, { signal: clientSignal(reply) })
    reply.code(answer.status)
    for (const [name, value] of Object.entries(answer.headers)) {
      reply.header(name, name === 'link' ? withNs(value, given.ns) : value)
    }
    reply.header('content-length', answer.body.length)
    return reply.send(isHead ? undefined : answer.body)
  }

  /** The swarm and the cache for configured registries; a pass-through for any other. */
  async function open (request: OpenBlobRequest, signal: AbortSignal): Promise<OpenBlob> {
    return request.upstream.trusted ? blobs.open(request, { signal }) : components.passthrough.open(request, { signal })
  }

  async function sendContent (reply: FastifyReply, opened: OpenBlob, range: { start: number, end: number } | undefined, contentType: string, isHead: boolean, signal: AbortSignal, priority: number = Priority.ON_DEMAND): Promise<void> {
    const { task } = opened
    reply.header('docker-content-digest', task.digest)
    reply.header('accept-ranges', 'bytes')
    reply.header('content-type', contentType)
    reply.header('etag', `"${task.digest}"`)
    if (opened.stale) reply.header('warning', STALE_WARNING)
    if (range !== undefined) {
      reply.code(206)
      reply.header('content-range', formatContentRange(range, task.size))
      reply.header('content-length', range.end - range.start + 1)
    } else {
      reply.code(200)
      reply.header('content-length', task.size)
    }
    if (isHead) return reply.send()
    const body: Readable = await opened.read(range, { signal, priority })
    // Pieces in pooled buffers go back to the pool as the socket takes them. Only a socket's write callback
    // means the bytes are gone (an injected response, in tests, keeps the chunks it was given).
    if (reply.raw.socket instanceof Socket) giveBackWhenWritten(reply.raw)
    return reply.send(body)
  }

  return app
}

/**
 * `/v2/<name>/manifests/<reference>`, `/v2/<name>/blobs/<digest>`,
 * `/v2/<name>/tags/list` or `/v2/<name>/referrers/<digest>`; the name may
 * itself contain slashes, so the path is split from the right.
 */
export function parseRoute (rest: string | undefined): Route {
  const path = rest ?? ''
  if (path === '' || path === '/') return { kind: 'base' }
  const parts = path.split('/')
  if (parts.length >= 3) {
    const kind = parts[parts.length - 2]
    const last = parts[parts.length - 1] as string
    const name = validateName(parts.slice(0, -2).join('/'))
    if (kind === 'blobs') return { kind: 'blob', name, digest: parseDigest(last).value }
    if (kind === 'manifests') return { kind: 'manifest', name, reference: last }
    if (kind === 'tags' && last === 'list') return { kind: 'tags', name }
    if (kind === 'referrers') return { kind: 'referrers', name, digest: parseDigest(last).value }
  }
  throw new NotFoundError(`/v2/${path.slice(0, 256)}`)
}

/**
 * The next page's link, still naming the registry the way this request did:
 * a client that came with containerd's `ns=` follows the link with it.
 */
function withNs (link: string, ns: unknown): string {
  if (typeof ns !== 'string' || ns === '') return link
  return link.replace(/<([^>]*)>/, (_all, target: string) => `<${target}${target.includes('?') ? '&' : '?'}ns=${encodeURIComponent(ns)}>`)
}

function headerValue (request: FastifyRequest, name: string): string | undefined {
  const value = request.headers[name]
  return Array.isArray(value) ? value[0] : value
}

/** `X-Dragonfly-Priority` (Dragonfly's levels 0–6; nydusd: 6 on demand, 3 prefetch). Anything else means on demand. */
function priorityOf (request: FastifyRequest): number {
  const raw = headerValue(request, PRIORITY_HEADER)
  if (raw === undefined || !/^\d{1,2}$/.test(raw.trim())) return Priority.ON_DEMAND
  return Math.min(Number(raw.trim()), Priority.ON_DEMAND)
}

function credentialsOf (request: FastifyRequest): OriginCredentials {
  const authorization = request.headers.authorization
  return authorization === undefined || authorization === '' ? {} : { authorization }
}

function acceptOf (request: FastifyRequest): string {
  const accept = request.headers.accept
  const value = Array.isArray(accept) ? accept.join(', ') : accept
  return value === undefined || value === '' || value === '*/*' ? DEFAULT_MANIFEST_ACCEPT : value
}

/**
 * Aborts when the client goes away before the response is finished, so an
 * abandoned pull stops pulling. (The request's own 'close' fires as soon as a
 * GET has been read, which is too early.)
 */
function clientSignal (reply: FastifyReply): AbortSignal {
  const controller = new AbortController()
  reply.raw.once('close', () => {
    if (!reply.raw.writableFinished) controller.abort(new AbortError('client request'))
  })
  return controller.signal
}
