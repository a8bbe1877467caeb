import { readFile } from 'node:fs/promises'
import http, { type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http'
import net, { type Socket } from 'node:net'
import { Duplex } from 'node:stream'
import tls from 'node:tls'

/**
 * An attacker's registry: a small node:http server that says yes to whatever
 * the test tells it to. It answers `GET /v2/` with 200, `HEAD` and `GET
 * /v2/<name>/blobs/<digest>` for the digests it was given (a HEAD announces
 * the size the test chose, e.g. the real size of someone else's private layer;
 * a GET sends the bytes the test chose, zeros by default, honouring a single
 * Range), and manifests by reference with a test-chosen body. Every TCP
 * connection and every request is recorded, so a test can assert it saw none.
 *
 * With `tls`, the same port also speaks https (the first byte of a connection
 * decides), the way a real registry an attacker runs would: a peer that reaches
 * `ns=<host>` over https is answered too.
 */
export interface FakeRegistryOptions {
  /** PEM files; the port then answers TLS as well as plain http. */
  tls?: { cert: string, key: string }
}

export interface FakeBlob {
  /** Content-Length a HEAD announces (and a GET, unless `bytes` says otherwise). */
  size: number
  /** What a GET sends; default `size` zero bytes. */
  bytes?: Buffer
}

export interface FakeManifest {
  body: Buffer | string
  mediaType?: string
  /** Docker-Content-Digest to send, if any. */
  digest?: string
}

export interface RecordedRequest {
  method: string
  url: string
  headers: IncomingHttpHeaders
  tls: boolean
}

export interface FakeRegistry {
  /** http://127.0.0.1:PORT */
  url: string
  /** https://127.0.0.1:PORT (with `tls`; the same port). */
  httpsUrl: string | undefined
  /** 127.0.0.1:PORT */
  host: string
  port: number
  /** Every HTTP request received, oldest first (plain and TLS). */
  readonly requests: RecordedRequest[]
  /** TCP connections accepted (an https handshake that failed is one too). */
  connections: () => number
  /** Serves `digest` as `blob` (replacing what was there). */
  setBlob: (digest: string, blob: FakeBlob) => void
  /** Serves `reference` (a tag or a digest) of any repository. */
  setManifest: (reference: string, manifest: FakeManifest) => void
  /** Forgets the recorded requests and connections (not the content). */
  reset: () => void
  /** Closes the listener and every open connection. */
  close: () => Promise<void>
}

function ociError (res: ServerResponse, status: number, code: string, message: string, head: boolean): void {
  const body = JSON.stringify({ errors: [{ code, message }] })
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'docker-distribution-api-version': 'registry/2.0' })
  res.end(head ? undefined : body)
}

/** A single `bytes=a-b`, `bytes=a-` or `bytes=-n`, resolved against `size`; undefined for anything else. */
function singleRange (header: string | undefined, size: number): { start: number, end: number } | 'unsatisfiable' | undefined {
  if (header === undefined) return undefined
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/.exec(header)
  if (m === null || (m[1] === '' && m[2] === '')) return undefined
  let start: number
  let end: number
  if (m[1] === '') {
    const n = Number(m[2])
    if (n === 0) return 'unsatisfiable'
    start = Math.max(0, size - n)
    end = size - 1
  } else {
    start = Number(m[1])
    end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1)
  }
  if (start >= size || start > end) return 'unsatisfiable'
  return { start, end }
}

export async function startFakeRegistry (opts: FakeRegistryOptions = {}): Promise<FakeRegistry> {
  const blobs = new Map<string, FakeBlob>()
  const manifests = new Map<string, FakeManifest>()
  const requests: RecordedRequest[] = []
  const sockets = new Set<Socket>()
  let connections = 0

  const handle = (tls: boolean) => (req: IncomingMessage, res: ServerResponse): void => {
    requests.push({ method: req.method ?? '', url: req.url ?? '', headers: { ...req.headers }, tls })
    req.resume()
    const method = req.method ?? 'GET'
    const head = method === 'HEAD'
    const pathname = (req.url ?? '/').split('?')[0] ?? '/'
    if (method !== 'GET' && method !== 'HEAD') return ociError(res, 405, 'UNSUPPORTED', 'read-only', false)
    if (pathname === '/v2/' || pathname === '/v2') {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': 2, 'docker-distribution-api-version': 'registry/2.0' })
      res.end(head ? undefined : '{}')
      return
    }
    const blob = /^\/v2\/(.+)\/blobs\/([^/]+)$/.exec(pathname)
    if (blob !== null) {
      const digest = decodeURIComponent(blob[2] as string)
      const found = blobs.get(digest)
      if (found === undefined) return ociError(res, 404, 'BLOB_UNKNOWN', 'blob unknown to registry', head)
      const common = { 'docker-content-digest': digest, 'content-type': 'application/octet-stream', 'accept-ranges': 'bytes', 'docker-distribution-api-version': 'registry/2.0' }
      if (head) {
        res.writeHead(200, { ...common, 'content-length': found.size })
        res.end()
        return
      }
      const bytes = found.bytes ?? Buffer.alloc(found.size)
      const range = singleRange(typeof req.headers.range === 'string' ? req.headers.range : undefined, bytes.length)
      if (range === 'unsatisfiable') {
        res.writeHead(416, { ...common, 'content-range': `bytes */${bytes.length}`, 'content-length': 0 })
        res.end()
        return
      }
      if (range === undefined) {
        res.writeHead(200, { ...common, 'content-length': bytes.length })
        res.end(bytes)
        return
      }
      res.writeHead(206, { ...common, 'content-range': `bytes ${range.start}-${range.end}/${bytes.length}`, 'content-length': range.end - range.start + 1 })
      res.end(bytes.subarray(range.start, range.end + 1))
      return
    }
    const manifest = /^\/v2\/(.+)\/manifests\/([^/]+)$/.exec(pathname)
    if (manifest !== null) {
      const found = manifests.get(decodeURIComponent(manifest[2] as string))
      if (found === undefined) return ociError(res, 404, 'MANIFEST_UNKNOWN', 'manifest unknown', head)
      const body = Buffer.from(found.body)
      res.writeHead(200, {
        'content-type': found.mediaType ?? 'application/vnd.oci.image.manifest.v1+json',
        'content-length': body.length,
        'docker-distribution-api-version': 'registry/2.0',
        ...(found.digest === undefined ? {} : { 'docker-content-digest': found.digest })
      })
      res.end(head ? undefined : body)
      return
    }
    ociError(res, 404, 'NOT_FOUND', 'not found', head)
  }

  const plain = http.createServer(handle(false))
  const secure = http.createServer(handle(true))
  for (const s of [plain, secure]) s.on('clientError', (_err, socket) => { socket.destroy() })
  const context = opts.tls === undefined
    ? undefined
    : tls.createSecureContext({ cert: await readFile(opts.tls.cert), key: await readFile(opts.tls.key) })

  /**
   * TLS over a socket whose first bytes were already read: a TLSSocket given
   * the net.Socket itself would take over its handle and lose them, so it gets
   * a JS duplex that replays them first.
   */
  const serveTls = (socket: Socket, first: Buffer): void => {
    const duplex = new Duplex({
      read () { socket.resume() },
      write (chunk: Buffer, _enc, cb) { socket.write(chunk, cb) },
      final (cb) { socket.end(); cb() },
      destroy (err, cb) { socket.destroy(); cb(err) }
    })
    socket.on('data', (d: Buffer) => { if (!duplex.push(d)) socket.pause() })
    socket.once('end', () => duplex.push(null))
    socket.once('close', () => duplex.destroy())
    duplex.push(first)
    const tlsSocket = new tls.TLSSocket(duplex as unknown as Socket, { isServer: true, secureContext: context as tls.SecureContext, ALPNProtocols: ['http/1.1'] })
    tlsSocket.on('error', () => { tlsSocket.destroy() })
    secure.emit('connection', tlsSocket)
  }

  // One port for both: a TLS ClientHello starts with 0x16, an HTTP request with a letter.
  const listener = net.createServer((socket) => {
    connections++
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
    socket.on('error', () => { socket.destroy() })
    socket.once('data', (first: Buffer) => {
      socket.pause()
      if (first[0] === 0x16 && context !== undefined) return serveTls(socket, first)
      socket.unshift(first)
      plain.emit('connection', socket)
      socket.resume()
    })
  })
  await new Promise<void>((resolve, reject) => {
    listener.once('error', reject)
    listener.listen({ host: '127.0.0.1', port: 0 }, () => {
      listener.off('error', reject)
      resolve()
    })
  })
  const address = listener.address()
  if (address === null || typeof address !== 'object') throw new Error('fake registry has no address')
  const port = address.port
  const host = `127.0.0.1:${port}`
  return {
    url: `http://${host}`,
    httpsUrl: context === undefined ? undefined : `https://${host}`,
    host,
    port,
    requests,
    connections: () => connections,
    setBlob (digest, blob) { blobs.set(digest, blob) },
    setManifest (reference, manifest) { manifests.set(reference, manifest) },
    reset () {
      requests.length = 0
      connections = 0
    },
    async close () {
      for (const s of sockets) s.destroy()
      sockets.clear()
      plain.closeAllConnections()
      secure.closeAllConnections()
      await new Promise<void>((resolve) => listener.close(() => resolve()))
    }
  }
}
