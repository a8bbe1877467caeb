import http, { type IncomingHttpHeaders } from 'node:http'
import net from 'node:net'

/**
 * What an attacker's HTTP client saw: every body byte that arrived, even when
 * the connection was cut, and whether the response was complete.
 */
export interface Seen {
  /** 0 when no response came (connection refused or cut before the headers). */
  status: number
  headers: IncomingHttpHeaders
  body: Buffer
  /** The whole message arrived (Content-Length or chunked end), not cut. */
  complete: boolean
  /** Why there was no (complete) response, if there was none. */
  error: string | undefined
}

/**
 * A raw request with node:http (no retries, no pooling), e.g. an absolute-form
 * proxy request: `send({ port: peer.port, path: 'http://host/v2/...' })`.
 */
export async function send (opts: { port: number, host?: string, method?: string, path: string, headers?: Record<string, string>, body?: string, timeoutMs?: number }): Promise<Seen> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = []
    let settled = false
    const done = (seen: Omit<Seen, 'body'>): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      resolve({ ...seen, body: Buffer.concat(chunks) })
    }
    const req = http.request({
      host: opts.host ?? '127.0.0.1',
      port: opts.port,
      method: opts.method ?? 'GET',
      path: opts.path,
      headers: { connection: 'close', ...opts.headers },
      agent: false
    }, (res) => {
      res.on('data', (c: Buffer) => chunks.push(c))
      res.once('error', (err) => done({ status: res.statusCode ?? 0, headers: res.headers, complete: false, error: err.message }))
      res.once('close', () => done({ status: res.statusCode ?? 0, headers: res.headers, complete: res.complete, error: res.complete ? undefined : 'response cut' }))
    })
    const timer = setTimeout(() => {
      req.destroy(new Error(`no complete answer within ${opts.timeoutMs ?? 20_000} ms`))
    }, opts.timeoutMs ?? 20_000)
    req.once('error', (err) => done({ status: 0, headers: {}, complete: false, error: err.message }))
    req.end(opts.body)
  })
}

/**
 * `CONNECT authority` to a proxy; reads the status line only. When the tunnel
 * is established and `then` is given, sends it through the tunnel and returns
 * the first bytes that come back.
 */
export async function connectThrough (proxy: { port: number, host?: string }, authority: string, then?: string, timeoutMs = 10_000): Promise<{ status: number, head: string, tunnelled: string | undefined, error: string | undefined }> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: proxy.host ?? '127.0.0.1', port: proxy.port })
    let buffer = Buffer.alloc(0)
    let status = 0
    let head = ''
    let settled = false
    const done = (tunnelled: string | undefined, error: string | undefined): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      socket.destroy()
      resolve({ status, head, tunnelled, error })
    }
    const timer = setTimeout(() => done(undefined, 'timed out'), timeoutMs)
    socket.once('connect', () => {
      socket.write(`CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n\r\n`)
    })
    socket.on('data', (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk])
      if (status === 0) {
        const end = buffer.indexOf('\r\n\r\n')
        if (end === -1) return
        head = buffer.subarray(0, end).toString('latin1')
        status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(head)?.[1] ?? -1)
        buffer = buffer.subarray(end + 4)
        if (status !== 200 || then === undefined) return done(undefined, undefined)
        socket.write(then)
      }
      if (then !== undefined && status === 200 && buffer.includes('\r\n\r\n')) setTimeout(() => done(buffer.toString('latin1'), undefined), 100)
    })
    socket.once('error', (err) => done(status === 200 ? buffer.toString('latin1') : undefined, err.message))
    socket.once('close', () => done(status === 200 ? buffer.toString('latin1') : undefined, undefined))
  })
}

/**
 * Bytes of `body` equal to `secret` at the same offset, in aligned 4 KiB
 * chunks, zero-filled chunks not counted (so a body of zeros never "matches"
 * the zero padding of a tar). A body taken from `offset` of the secret counts in full.
 */
export function leakedBytes (body: Buffer, secret: Buffer, offset = 0): number {
  const CHUNK = 4096
  let leaked = 0
  for (let i = 0; i < body.length; i += CHUNK) {
    const got = body.subarray(i, i + CHUNK)
    const want = secret.subarray(offset + i, offset + i + got.length)
    if (want.length === got.length && got.equals(want) && got.some((b) => b !== 0)) leaked += got.length
  }
  return leaked
}

/** The OCI error code of a JSON error body, if it is one. */
export function errorCode (body: Buffer): string | undefined {
  try {
    const parsed = JSON.parse(body.toString('utf8')) as { errors?: Array<{ code?: string }> }
    return parsed.errors?.[0]?.code
  } catch {
    return undefined
  }
}
