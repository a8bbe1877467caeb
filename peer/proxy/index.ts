import { createServer, type IncomingHttpHeaders, type IncomingMessage, type RequestListener, type Server, type ServerResponse } from 'node:http'
import { connect as netConnect, isIP, type Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { TLSSocket } from 'node:tls'
import type { FastifyServerFactory } from 'fastify'
import type { Dispatcher } from 'undici'
import type { Logger } from '../../src/logger.ts'
import { Counter, type Registry } from '../../src/metrics.ts'
import { canonicalHost } from '../../src/oci/hosts.ts'
import type { UpstreamSelector } from '../upstream/index.ts'
import type { CertificateAuthority } from './certs.ts'

export interface ForwardProxyComponents {
  logger: Logger
  upstreams: UpstreamSelector
  /** The peer's origin dispatcher (keep-alive pools, the operator's extra CAs). */
  dispatcher: Dispatcher
  metrics?: Registry | undefined
}

export interface ForwardProxyInit {
  /** Signs certificates for intercepted hosts; without it every CONNECT is tunnelled untouched. */
  ca?: CertificateAuthority | undefined
  /** host or host:port (443 when no port) whose CONNECT tunnels are opened and served here. */
  intercept?: ReadonlyArray<string>
  /**
   * `host:port` pairs (443 when no port is written) the proxy may forward to
   * or tunnel to, compared exactly. Empty: any, but only while
   * `openToLoopbackOnly` says only this machine can reach the proxy.
   */
  allowedHosts?: ReadonlyArray<string> | undefined
  /**
   * The mirror port listens on loopback only, so every caller is a process on
   * this node, to whom forwarding opens nothing new. Otherwise the proxy
   * forwards only to `allowedHosts`: an open proxy on the node network would
   * reach whatever the peer can (internal services, the scheduler's API).
   */
  openToLoopbackOnly?: boolean
  /** Open tunnels (intercepted or not) at once; more are refused with 503. Default 1024. */
  maxTunnels?: number
  /** Deadline to reach a tunnelled host. Default 10 s. */
  connectTimeoutMs?: number
  /** Deadline for an intercepted client's request headers. Default 30 s. */
  headersTimeoutMs?: number
}

export interface ForwardProxy {
  /**
   * Wraps the mirror's handler in a server that also speaks forward proxy:
   * absolute-form requests and CONNECT. Origin-form requests go to the mirror
   * untouched.
   */
  serverFactory: FastifyServerFactory
  /** Cuts every open tunnel (the HTTP server does not own them once upgraded). */
  close: () => void
}

/** Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy's own: never passed on. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authorization', 'proxy-authenticate', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'host'])
const BLOB_PATH = /^\/v2\/(.+)\/blobs\/([A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+)$/

interface Target {
  scheme: 'http' | 'https'
  /** host[:port] as the request named it (default port dropped). */
  authority: string
  hostname: string
  /** Path and query. */
  path: string
}

/**
 * nydusd's `proxy.url`, HTTP_PROXY clients and anything else that treats the
 * peer as a forward proxy. Blob reads (GET/HEAD `/v2/<name>/blobs/<digest>`)
 * are handed to the mirror with the origin named by `X-Dragonfly-Registry`,
 * so they go through the same verified cache and swarm; every other request
 * is forwarded to its origin as it is and streamed back. CONNECT to a host
 * listed for interception is answered with a certificate from the
 * operator's CA and served the same way; CONNECT to any other host is a
 * byte-for-byte tunnel.
 */
export function createForwardProxy (components: ForwardProxyComponents, init: ForwardProxyInit = {}): ForwardProxy {
  const logger = components.logger.child({ component: 'peer:proxy' })
  const { upstreams, dispatcher } = components
  const intercept = new Set((init.intercept ?? []).map(normaliseAuthority))
  const allowed = new Set((init.allowedHosts ?? []).map(h => withPort(normaliseAuthority(h), 443)))
  const maxTunnels = init.maxTunnels ?? 1024
  const connectTimeoutMs = init.connectTimeoutMs ?? 10_000
  const tunnels = new Set<Duplex>()
  /** The host each intercepted TLS connection was opened for. */
  const tunnelTargets = new WeakMap<object, string>()
  const requests = components.metrics === undefined
    ? undefined
    : new Counter({ name: 'damselfly_proxy_requests_total', help: 'Forward-proxy requests, by how they were served (swarm, forward, tunnel, intercept, refused)', labelNames: ['kind'], registers: [components.metrics] })

  /** Whether the proxy may open a connection to `authority` (host[:port], default port `port`). */
  function mayReach (authority: string, defaultPort: number): boolean {
    if (allowed.size === 0) return init.openToLoopbackOnly === true
    return allowed.has(withPort(normaliseAuthority(authority), defaultPort))
  }

  function route (req: IncomingMessage, res: ServerResponse, mirror: RequestListener, tunnelAuthority: string | undefined): void {
    let target: Target | undefined
    try {
      target = tunnelAuthority === undefined ? absoluteTarget(req.url ?? '/') : tunnelTarget(tunnelAuthority, req.url ?? '/')
    } catch {
      return refuse(res, 400, 'malformed request target')
    }
    if (target === undefined) {
      mirror(req, res)
      return
    }
    // An intercepted tunnel's host is a configured registry. Otherwise nydusd's
    // use_http rewrites https to http, and a registry configured as https is
    // reached as https.
    const known = tunnelAuthority === undefined ? upstreams.known(target.authority) : upstreams.known(normaliseAuthority(target.authority))
    const scheme = known?.scheme ?? target.scheme
    const origin = `${scheme}://${known?.host ?? target.authority}`
    const pathOnly = target.path.split('?')[0] ?? ''
    const useP2P = String(req.headers['x-dragonfly-use-p2p'] ?? '').toLowerCase() !== 'false'
    // Only a configured registry's blobs come from the swarm; any other request is forwarded, if it may be.
    if (known !== undefined && (req.method === 'GET' || req.method === 'HEAD') && useP2P && BLOB_PATH.test(pathOnly) && !pathOnly.includes('/blobs/uploads/')) {
      requests?.inc({ kind: 'swarm' })
      req.url = target.path
      req.headers['x-dragonfly-registry'] = origin
      delete req.headers['proxy-authorization']
      delete req.headers['proxy-connection']
      mirror(req, res)
      return
    }
    if (tunnelAuthority === undefined && !mayReach(target.authority, target.scheme === 'https' ? 443 : 80)) {
      requests?.inc({ kind: 'refused' })
      return refuse(res, 403, `${target.authority} is not allowed through this proxy`)
    }
    requests?.inc({ kind: 'forward' })
    void forward(req, res, origin, target.path)
  }

  /** Sends the request to its origin as it is and streams the answer back; redirects are the client's to follow. */
  async function forward (req: IncomingMessage, res: ServerResponse, origin: string, path: string): Promise<void> {
    const abort = new AbortController()
    res.once('close', () => { if (!res.writableFinished) abort.abort() })
    const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined
    let answer: Dispatcher.ResponseData
    try {
      answer = await dispatcher.request({
        origin,
        path,
        method: (req.method ?? 'GET') as Dispatcher.HttpMethod,
        headers: passOn(req.headers),
        body: hasBody ? req : null,
        signal: abort.signal,
        headersTimeout: 60_000,
        bodyTimeout: 120_000
      })
    } catch (err) {
      if (abort.signal.aborted) return
      logger.debug({ err: (err as Error).message, origin }, 'forwarded request failed')
      return refuse(res, 502, `origin ${origin} unreachable: ${(err as Error).message}`, 'backend')
    }
    if (!hasBody) req.resume()
    const headers = passOn(answer.headers as IncomingHttpHeaders)
    if (answer.statusCode >= 400) headers['x-dragonfly-error-type'] = 'backend'
    try {
      res.writeHead(answer.statusCode, headers as Record<string, string | string[]>)
      await pipeline(answer.body, res)
    } catch (err) {
      answer.body.destroy()
      res.destroy()
      if (!abort.signal.aborted) logger.debug({ err: (err as Error).message, origin }, 'forwarded response cut')
    }
  }

  function connect (req: IncomingMessage, socket: Duplex, head: Buffer, inner: Server): void {
    socket.on('error', () => { socket.destroy() })
    const parsed = parseAuthority(req.url ?? '')
    if (parsed === undefined) return endSocket(socket, 400, 'Bad Request')
    const authority = normaliseAuthority(`${parsed.hostname}:${parsed.port}`)
    const intercepted = init.ca !== undefined && intercept.has(authority)
    // Refused before any connection is tried, so open and closed ports answer alike.
    if (!intercepted && !mayReach(`${parsed.hostname}:${parsed.port}`, 443)) {
      requests?.inc({ kind: 'refused' })
      return endSocket(socket, 403, 'Forbidden')
    }
    if (tunnels.size >= maxTunnels) return endSocket(socket, 503, 'Service Unavailable')
    if (intercepted) {
      requests?.inc({ kind: 'intercept' })
      void open(socket, head, parsed.hostname, authority, inner)
      return
    }
    requests?.inc({ kind: 'tunnel' })
    tunnel(socket, head, parsed.hostname, parsed.port)
  }

  /** Answers the tunnel with our certificate for the host and serves HTTP inside it. */
  async function open (socket: Duplex, head: Buffer, hostname: string, authority: string, inner: Server): Promise<void> {
    let context
    try {
      context = await (init.ca as CertificateAuthority).contextFor(hostname.replace(/^\[|\]$/g, ''))
    } catch (err) {
      logger.warn({ err, host: hostname }, 'could not issue a certificate for an intercepted host')
      return endSocket(socket, 502, 'Bad Gateway')
    }
    if (socket.destroyed) return
    socket.write('HTTP/1.1 200 Connection Established\r\n\r\n')
    if (head.length > 0) socket.unshift(head)
    const tls = new TLSSocket(socket as Socket, { isServer: true, secureContext: context, ALPNProtocols: ['http/1.1'] })
    tunnels.add(tls)
    tunnelTargets.set(tls, authority)
    tls.on('error', (err) => {
      logger.debug({ err: err.message, host: hostname }, 'intercepted TLS connection failed')
      tls.destroy()
    })
    tls.once('close', () => {
      tunnels.delete(tls)
      socket.destroy()
    })
    inner.emit('connection', tls)
  }

  /** A plain TCP tunnel: nothing read, nothing changed. */
  function tunnel (socket: Duplex, head: Buffer, hostname: string, port: number): void {
    const upstream = netConnect({ host: hostname.replace(/^\[|\]$/g, ''), port })
    let established = false
    tunnels.add(upstream)
    upstream.setTimeout(connectTimeoutMs, () => {
      if (!established) upstream.destroy(new Error(`connect to ${hostname}:${port} timed out`))
    })
    upstream.once('connect', () => {
      established = true
      upstream.setTimeout(0)
      socket.write('HTTP/1.1 200 Connection Established\r\n\r\n')
      if (head.length > 0) upstream.write(head)
      socket.pipe(upstream)
      upstream.pipe(socket)
    })
    upstream.on('error', (err) => {
      logger.debug({ err: err.message, host: hostname, port }, 'tunnel failed')
      if (!established) endSocket(socket, 502, 'Bad Gateway')
      else socket.destroy()
    })
    upstream.once('close', () => {
      tunnels.delete(upstream)
      if (established) socket.destroy()
    })
    socket.once('close', () => { upstream.destroy() })
  }

  const serverFactory: FastifyServerFactory = (handler) => {
    const mirror = handler as unknown as RequestListener
    // HTTP inside intercepted tunnels: never listens, fed TLS sockets by `open`.
    const inner = createServer((req, res) => { route(req, res, mirror, tunnelTargets.get(req.socket)) })
    inner.headersTimeout = init.headersTimeoutMs ?? 30_000
    inner.keepAliveTimeout = 65_000
    inner.on('clientError', (_err, socket) => { socket.destroy() })
    const server = createServer((req, res) => { route(req, res, mirror, undefined) })
    server.on('connect', (req: IncomingMessage, socket: Duplex, head: Buffer) => { connect(req, socket, head, inner) })
    return server
  }

  return {
    serverFactory,
    close () {
      for (const t of tunnels) t.destroy()
      tunnels.clear()
    }
  }
}

function absoluteTarget (url: string): Target | undefined {
  if (!/^https?:\/\//i.test(url)) return undefined
  const parsed = new URL(url)
  if (parsed.username !== '' || parsed.password !== '') throw new Error('credentials in the URL')
  return {
    scheme: parsed.protocol === 'https:' ? 'https' : 'http',
    authority: parsed.host.toLowerCase(),
    hostname: parsed.hostname.toLowerCase(),
    path: `${parsed.pathname}${parsed.search}`
  }
}

function tunnelTarget (authority: string, url: string): Target {
  if (!url.startsWith('/')) {
    const absolute = absoluteTarget(url)
    if (absolute === undefined) throw new Error('malformed target')
    return { ...absolute, scheme: 'https' }
  }
  const parsed = parseAuthority(authority.includes(':') && !authority.endsWith(']') ? authority : `${authority}:443`) as { hostname: string }
  return { scheme: 'https', authority, hostname: parsed.hostname, path: url }
}

/** `host:port` of a CONNECT line (IPv6 in brackets). */
function parseAuthority (value: string): { hostname: string, port: number } | undefined {
  const m = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$/.exec(value)
  if (m === null) return undefined
  const hostname = (m[1] as string).toLowerCase()
  const port = Number(m[2])
  if (port < 1 || port > 65535) return undefined
  if (hostname.startsWith('[') && isIP(hostname.slice(1, -1)) !== 6) return undefined
  return { hostname, port }
}

/** host[:port] with 443 dropped and Docker Hub's names made one. */
function normaliseAuthority (value: string): string {
  let v = value.trim().toLowerCase()
  if (v.endsWith(':443')) v = v.slice(0, -4)
  return canonicalHost(v)
}

/** host:port, with `port` added when the authority names none. */
function withPort (authority: string, port: number): string {
  return /:\d+$/.test(authority) && !authority.endsWith(']') ? authority : `${authority}:${port}`
}

function passOn (headers: IncomingHttpHeaders | Record<string, string | string[] | undefined>): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {}
  const named = String(headers.connection ?? '').toLowerCase().split(',').map(s => s.trim()).filter(Boolean)
  for (const [name, value] of Object.entries(headers)) {
    const lower = name.toLowerCase()
    if (value === undefined || HOP_BY_HOP.has(lower) || named.includes(lower)) continue
    out[lower] = value
  }
  return out
}

function refuse (res: ServerResponse, status: number, message: string, type: 'proxy' | 'backend' = 'proxy'): void {
  if (res.headersSent) {
    res.destroy()
    return
  }
  const body = JSON.stringify({ errors: [{ code: status === 403 ? 'DENIED' : status >= 500 ? 'UNAVAILABLE' : 'UNSUPPORTED', message }] })
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), 'x-dragonfly-error-type': type })
  res.end(body)
}

function endSocket (socket: Duplex, status: number, reason: string): void {
  if (socket.destroyed) return
  socket.end(`HTTP/1.1 ${status} ${reason}\r\nConnection: close\r\nContent-Length: 0\r\nX-Dragonfly-Error-Type: proxy\r\n\r\n`)
}
