import { createHmac, createSecretKey, timingSafeEqual, type KeyObject } from 'node:crypto'
import type { IncomingMessage } from 'node:http'
import type { AbortOptions } from '../../src/abort.ts'
import { PeerUnavailableError, isAbort } from '../../src/errors.ts'
import { answerError, PieceConnectionPool, type PieceConnectionPoolInit, type ReadPiece, type Stall } from './piece-client.ts'
import { MAX_PIECE_RUN, PIECE_HTTP_CHILD_HEADER, PIECE_HTTP_PATH, type PieceHint, type PieceRequest } from '../../src/protocol/messages.ts'

/**
 * The HTTP data plane between peers. libp2p carries the control plane
 * (scheduler sessions, commands, membership); piece bytes go over plain
 * keep-alive HTTP to the parent's upload port, as Dragonfly's upload server
 * does, because every byte through libp2p crosses three JavaScript stream
 * layers (TCP wrapper, encryption, yamux) and that capped a peer at a fraction
 * of what the same process serves over HTTP. Bytes need no channel
 * integrity: each piece is checked against the swarm's piece table. Who may
 * ask is: with a cluster secret, every request carries an HMAC of the
 * request, the child's id and a timestamp under that secret.
 */

const AUTH_SCHEME = 'Damselfly-Piece'
/** How far a request's timestamp may be from the parent's clock. */
const MAX_SKEW_MS = 5 * 60_000

export function pieceUrlPath (digest: string, index: number, waitMs: number, count = 1): string {
  return `${PIECE_HTTP_PATH}/${digest}/${index}?wait=${waitMs}${count > 1 ? `&count=${count}` : ''}`
}

/** The request a path names, or undefined for anything else. */
export function parsePiecePath (url: string): PieceRequest | undefined {
  const m = /^\/damselfly\/v1\/pieces\/(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\/(\d{1,8})(?:\?wait=(\d{1,6})(?:&count=(\d{1,2}))?)?$/.exec(url)
  if (m === null) return undefined
  const waitMs = Number(m[3] ?? 0)
  const count = Number(m[4] ?? 1)
  if (waitMs > 120_000 || count < 1 || count > MAX_PIECE_RUN) return undefined
  return { digest: m[1] as string, index: Number(m[2]), waitMs, ...(count > 1 ? { count } : {}) }
}

/**
 * The cluster secret as the key piece requests are signed and checked with;
 * undefined without one. Made once, where the secret is configured:
 * `createHmac` given the secret as a Buffer imports it as a new key on every
 * call, 10 µs against 1.5 with a key object (Node 24, this VM), and every
 * piece request, busy answers included, is signed by the child and checked by
 * the parent (emulated cluster: about 14 requests per MiB delivered).
 */
export function pieceKey (clusterSecret: string | undefined): KeyObject | undefined {
  return clusterSecret === undefined || clusterSecret === '' ? undefined : createSecretKey(Buffer.from(clusterSecret, 'utf8'))
}

function mac (key: KeyObject, child: string, parent: string, request: PieceRequest, at: number): string {
  return createHmac('sha256', key)
    .update(`damselfly-piece/1 ${child} ${parent} ${request.digest} ${request.index} ${request.waitMs}${(request.count ?? 1) > 1 ? ` count=${request.count}` : ''} ${at}`)
    .digest('hex')
}

export function authorizationFor (key: KeyObject, child: string, parent: string, request: PieceRequest, now = Date.now()): string {
  return `${AUTH_SCHEME} ${child} ${now} ${mac(key, child, parent, request, now)}`
}

/** The child's peer id when the request proves the secret; undefined otherwise. */
export function checkAuthorization (key: KeyObject, self: string, request: PieceRequest, header: string | undefined, now = Date.now()): string | undefined {
  const parts = header?.split(' ')
  if (parts?.length !== 4 || parts[0] !== AUTH_SCHEME) return undefined
  const [, child, atText, given] = parts as [string, string, string, string]
  const at = Number(atText)
  if (!Number.isSafeInteger(at) || Math.abs(now - at) > MAX_SKEW_MS || !/^[0-9a-f]{64}$/.test(given)) return undefined
  const expected = Buffer.from(mac(key, child, self, request, at), 'hex')
  return timingSafeEqual(expected, Buffer.from(given, 'hex')) ? child : undefined
}

/** Base URLs of an upload port, from the multiaddrs a node listens on or announces; loopback last. */
export function uploadUrls (addrs: string[], port: number): string[] {
  const out: string[] = []
  for (const a of addrs) {
    const m = /^\/(ip4|ip6|dns4|dns6|dns)\/([^/]+)\/tcp\/\d+/.exec(a)
    if (m === null) continue
    const host = m[1] === 'ip6' ? `[${m[2] as string}]` : m[2] as string
    if (host === '0.0.0.0' || host === '[::]') continue
    const url = `http://${host}:${port}`
    if (!out.includes(url)) out.push(url)
  }
  const loopback = (u: string): boolean => /^http:\/\/(127\.|\[::1\]|localhost)/.test(u)
  return [...out.filter(u => !loopback(u)), ...out.filter(loopback)].slice(0, 16)
}

/**
 * Client side: one keep-alive pool per parent address, bounded. `fetch`
 * gives the piece asked for first, then, for a run (`request.count` > 1,
 * with a length per piece), the following pieces the parent sent: unverified
 * bytes, each in a buffer of its own.
 */
export interface PieceHttpClient {
  fetch: (parent: { peerId: string, upload: string[] }, request: PieceRequest, length: number | readonly number[], options: AbortOptions & { signal: AbortSignal, stall?: Stall | undefined }) => Promise<ReadPiece[]>
  close: () => Promise<void>
}

export interface PieceHttpClientInit {
  self: string
  /** The cluster secret's key (`pieceKey`). */
  key?: KeyObject | undefined
  pool?: PieceConnectionPoolInit
  /** This node's upload port, told to parents so that they can send other children here (`PIECE_HTTP_CHILD_HEADER`). */
  uploadPort?: () => number | undefined
}

export function createPieceHttpClient (init: PieceHttpClientInit): PieceHttpClient {
  const pool = new PieceConnectionPool(init.pool)
  /** The address that answered as the right peer last time, per peer. */
  const working = new Map<string, string>()
  /**
   * Parents that refused a run as no piece path at all: peers from before runs
   * (a DaemonSet mid-upgrade). They are asked for one piece at a time.
   */
  const single = new Set<string>()

  async function attempt (base: string, parentId: string, request: PieceRequest, length: number | readonly number[], signal: AbortSignal, stall: Stall | undefined): Promise<ReadPiece[] | 'wrong-peer' | 'no-runs'> {
    const headers: Record<string, string> = {}
    if (init.key !== undefined) headers.authorization = authorizationFor(init.key, init.self, parentId, request)
    const port = init.uploadPort?.()
    if (port !== undefined) headers[PIECE_HTTP_CHILD_HEADER] = `${init.self} ${port}`
    const res = await pool.get(base, pieceUrlPath(request.digest, request.index, request.waitMs, request.count), headers, length, signal, stall)
    if (res.peer !== parentId) {
      // The response is complete: nothing reads into its buffers any more.
      res.lease?.release()
      for (const p of res.rest ?? []) p.lease?.release()
      return 'wrong-peer'
    }
    if (res.status === 404 && (request.count ?? 1) > 1 && res.text.includes(NOT_A_PIECE_PATH)) return 'no-runs'
    if (res.status !== 200 || res.body === undefined) throw answerError(res, parentId, request.index)
    return [{ data: res.body, lease: res.lease }, ...(res.rest ?? [])]
  }

  return {
    async fetch (parent, asked, askedLength, options) {
      let request = asked
      let length = askedLength
      const one = (): void => {
        const { count: _, ...rest } = request
        request = rest
        length = typeof length === 'number' ? length : length[0] as number
      }
      if (single.has(parent.peerId)) one()
      const known = working.get(parent.peerId)
      const order = known !== undefined && parent.upload.includes(known) ? [known, ...parent.upload.filter(u => u !== known)] : parent.upload
      let lastError: unknown
      for (const base of order) {
        try {
          let got = await attempt(base, parent.peerId, request, length, options.signal, options.stall)
          if (got === 'no-runs') {
            single.add(parent.peerId)
            if (single.size > 4096) single.delete(single.values().next().value as string)
            one()
            got = await attempt(base, parent.peerId, request, length, options.signal, options.stall)
          }
          if (got === 'wrong-peer' || got === 'no-runs') {
            lastError = new PeerUnavailableError(`${base} is not ${parent.peerId}`)
            continue
          }
          working.set(parent.peerId, base)
          if (working.size > 4096) working.delete(working.keys().next().value as string)
          return got
        } catch (err) {
          if (isAbort(err) || options.signal.aborted) throw err
          // Only an address that cannot be reached is worth trying the next one for.
          const code = (err as { code?: string }).code
          if (code !== 'ECONNREFUSED' && code !== 'EHOSTUNREACH' && code !== 'ENETUNREACH' && code !== 'ETIMEDOUT') throw err
          lastError = err
        }
      }
      throw lastError instanceof PeerUnavailableError ? lastError : new PeerUnavailableError(`cannot reach the upload port of ${parent.peerId}: ${(lastError as Error | undefined)?.message ?? 'no address'}`, { cause: lastError })
    },
    async close () {
      pool.close()
    }
  }
}

/** What the upload port answers, with 404, for a path it does not take (every version has said so). */
const NOT_A_PIECE_PATH = 'not a piece path'

/** Server side helpers: the request a child made, or the HTTP status to refuse it with. */
export function readPieceRequest (req: IncomingMessage, self: string, key: KeyObject | undefined): { request: PieceRequest, child: string } | { status: number, message: string } {
  if (req.method !== 'GET') return { status: 405, message: 'only GET' }
  const request = parsePiecePath(req.url ?? '')
  if (request === undefined) return { status: 404, message: NOT_A_PIECE_PATH }
  if (key === undefined) {
    // Without a secret nothing tells a member from a stranger: only this machine may ask.
    const from = req.socket.remoteAddress ?? ''
    if (!isLoopbackAddress(from)) return { status: 403, message: 'this peer has no cluster secret and serves pieces to loopback only' }
    return { request, child: from }
  }
  const child = checkAuthorization(key, self, request, req.headers.authorization)
  if (child === undefined) return { status: 401, message: 'prove membership of the cluster' }
  return { request, child }
}

/**
 * How other children may reach the child that sent `req`: the peer id and
 * upload port it gives in `PIECE_HTTP_CHILD_HEADER`, at the address the
 * request came from. With a cluster secret the id must be the one the request
 * proved. A child cannot name another address, so a busy answer never points
 * anyone at a host that did not itself ask.
 */
export function readChildHint (req: IncomingMessage, child: string, authenticated: boolean): PieceHint | undefined {
  const header = req.headers[PIECE_HTTP_CHILD_HEADER]
  if (typeof header !== 'string') return undefined
  const m = /^([A-Za-z0-9]{1,128}) (\d{1,5})$/.exec(header)
  if (m === null) return undefined
  const [, peerId, portText] = m as unknown as [string, string, string]
  const port = Number(portText)
  if (port < 1 || port > 65_535 || (authenticated && peerId !== child)) return undefined
  let host = req.socket.remoteAddress
  if (host === undefined) return undefined
  if (host.startsWith('::ffff:') && host.includes('.')) host = host.slice(7)
  else if (host.includes(':')) host = `[${host}]`
  return { peerId, upload: [`http://${host}:${port}`] }
}

/** 127.0.0.0/8, ::1 and their IPv4-mapped forms, as a socket reports them. */
export function isLoopbackAddress (address: string): boolean {
  return address === '::1' || /^(::ffff:)?127\./.test(address)
}
