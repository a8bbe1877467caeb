import { connect, type Socket } from 'node:net'
import type { BufferPool, Lease } from '../../src/buffer-pool.ts'
import { PeerBusyError, PeerUnavailableError, PieceNotHeldError, ProtocolError } from '../../src/errors.ts'
import { PIECE_HTTP_PEER_HEADER, PIECE_HTTP_PIECES_HEADER, PieceHeader, decode, type PieceHint } from '../../src/protocol/messages.ts'

/**
 * The child's end of the HTTP data plane: GET one piece over a keep-alive
 * connection and read its body straight into the piece's own buffer.
 *
 * A general HTTP client hands a body over in the socket's chunks (64 KiB, a
 * fresh allocation each) that are then copied into the piece: measured on
 * one core, 3.8 ms of CPU per MiB, against 1.6 for this client. It speaks
 * only what the upload server sends — a status line, headers, a body of
 * Content-Length bytes — and reads no byte past the body it asked for, so a
 * connection goes back to the pool clean or is closed.
 */

/** One piece's bytes as read, and the claim on their pooled buffer when they came from the pool. */
export interface ReadPiece {
  data: Buffer
  lease?: Lease | undefined
}

export interface PieceResponse {
  status: number
  /** The peer id the answering server names (`x-damselfly-peer`). */
  peer: string | undefined
  /** For status 200: exactly `length` bytes (the first piece's, for a run). */
  body: Buffer | undefined
  /** The claim on `body`'s pooled buffer, when it came from the pool: the caller's to release. */
  lease?: Lease | undefined
  /** For status 200 to a run: the pieces after the first that the parent sent, each in a buffer of its own. */
  rest?: ReadPiece[]
  /** For any other status: the first bytes of its body, as text. */
  text: string
}

export interface PieceConnectionPoolInit {
  /** Connections to one address at once; more requests wait their turn. Default 16. */
  perAddress?: number
  /** Requests waiting for a connection to one address before more are refused (busy). Default 256. */
  maxWaiting?: number
  /** An idle connection is closed after this long (the server's own idle limit is 5 s). Default 4 s. */
  idleMs?: number
  /** Largest header block accepted. Default 16 KiB. */
  maxHeaderBytes?: number
  /** A connection not made within this long fails with ETIMEDOUT (the next address is tried). Default 5 s. */
  connectTimeoutMs?: number
  /**
   * Where 200 bodies are read into. A body whose response failed is never
   * given back (the socket it was read from is gone, but nothing is
   * gained by betting on it). Without it each body is a fresh buffer.
   */
  buffers?: BufferPool | undefined
}

const ERROR_BODY_MAX = 4096

/**
 * How long a response may go quiet: before its first bytes, and between any
 * two reads after them. A parent sending slowly (its upload shared by many
 * children) is not a parent that stopped.
 */
export interface Stall {
  firstByteMs: number
  idleMs: number
}

interface Pool {
  host: string
  port: number
  active: number
  idle: Connection[]
  waiting: Array<() => void>
}

/**
 * One keep-alive connection. Reads go into whatever `#target` is: the header
 * scratch until the headers end, then the rest of the body buffer, then the
 * scratch again (nothing should arrive between responses; if anything does,
 * the connection is not reused).
 */
class Connection {
  readonly socket: Socket
  readonly connected: Promise<void>
  /** Set when the connection must not be reused. */
  spoiled = false
  idleTimer: NodeJS.Timeout | undefined
  readonly #scratch: Buffer
  #target: Buffer
  #onRead: ((n: number) => void) | undefined
  #onEnd: ((err: Error) => void) | undefined

  constructor (host: string, port: number, maxHeaderBytes: number, connectTimeoutMs: number) {
    this.#scratch = Buffer.allocUnsafe(maxHeaderBytes)
    this.#target = this.#scratch
    this.socket = connect({
      host,
      port,
      noDelay: true,
      onread: {
        buffer: () => this.#target,
        callback: (n: number) => {
          if (this.#onRead === undefined) {
            this.spoiled = true
            this.socket.destroy()
            return false
          }
          this.#onRead(n)
          return true
        }
      }
    })
    this.connected = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.socket.destroy(Object.assign(new Error(`no connection to ${host}:${port} within ${connectTimeoutMs} ms`), { code: 'ETIMEDOUT' }))
      }, connectTimeoutMs)
      this.socket.once('connect', () => {
        clearTimeout(timer)
        resolve()
      })
      this.socket.once('error', (err) => {
        clearTimeout(timer)
        reject(err)
      })
    })
    this.connected.catch(() => {})
    const ended = (err?: Error): void => {
      this.spoiled = true
      this.#onEnd?.(err ?? new PeerUnavailableError('the connection closed'))
    }
    this.socket.on('error', ended)
    this.socket.on('end', () => { ended() })
    this.socket.on('close', () => { ended() })
  }

  /**
   * Sends one request and reads its response. A 200 must carry exactly
   * `lengths[0]` bytes, or for a run (more than one length) the first n of
   * `lengths` back to back, n as the parent declares it in
   * `PIECE_HTTP_PIECES_HEADER`; each piece is read into a buffer of its own.
   */
  async exchange (head: string, lengths: readonly number[], maxHeaderBytes: number, signal: AbortSignal, stall?: Stall, buffers?: BufferPool): Promise<PieceResponse> {
    signal.throwIfAborted()
    if (this.spoiled || this.socket.destroyed) throw new PeerUnavailableError('no response: the connection closed')
    const { promise, resolve, reject } = Promise.withResolvers<PieceResponse>()
    let filled = 0
    /** Body buffers (one per piece of a 200; one for any other answer) and their leases. */
    const parts: ReadPiece[] = []
    let part = 0
    let partFilled = 0
    let status = 0
    let peer: string | undefined
    let keep = true
    let started = false
    let stallTimer: NodeJS.Timeout | undefined
    const fail = (err: Error): void => {
      clearTimeout(stallTimer)
      this.spoiled = true
      this.socket.destroy()
      reject(err)
    }
    /** A response that stops coming fails; one that keeps coming, however slowly, is not cut. */
    const arm = (ms: number | undefined, what: string): void => {
      if (ms === undefined) return
      clearTimeout(stallTimer)
      stallTimer = setTimeout(() => { fail(new PeerUnavailableError(`${what} for ${ms} ms`)) }, ms)
    }
    const done = (response: PieceResponse): void => {
      clearTimeout(stallTimer)
      this.#target = this.#scratch
      this.#onRead = undefined
      if (!keep) this.spoiled = true
      resolve(response)
    }
    const finishBody = (): void => {
      const [first, ...rest] = parts as [ReadPiece, ...ReadPiece[]]
      if (status === 200) done({ status, peer, body: first.data, lease: first.lease, text: '', ...(rest.length > 0 ? { rest } : {}) })
      else done({ status, peer, body: undefined, text: first.data.toString('utf8') })
    }
    /** Takes `n` body bytes just read into the current part; moves on to the next part or finishes. */
    const advance = (n: number): void => {
      partFilled += n
      let current = parts[part] as ReadPiece
      while (partFilled === current.data.length) {
        part++
        partFilled = 0
        if (part === parts.length) {
          finishBody()
          return
        }
        current = parts[part] as ReadPiece
      }
      this.#target = current.data.subarray(partFilled)
    }
    this.#onRead = (n: number) => {
      arm(stall?.idleMs, 'no bytes')
      if (started) {
        advance(n)
        return
      }
      filled += n
      const end = this.#scratch.subarray(0, filled).indexOf('\r\n\r\n')
      if (end < 0) {
        if (filled >= maxHeaderBytes) fail(new ProtocolError(`response headers longer than ${maxHeaderBytes} bytes`))
        else this.#target = this.#scratch.subarray(filled)
        return
      }
      const parsed = parseHead(this.#scratch.toString('latin1', 0, end))
      if (typeof parsed === 'string') {
        fail(new ProtocolError(parsed))
        return
      }
      status = parsed.status
      peer = parsed.peer
      keep = parsed.keepAlive
      const declared = parsed.contentLength
      if (status !== 200 && (declared === undefined || parsed.chunked)) {
        // A refusal whose body is not worth decoding (older peers send them chunked): the status says enough.
        this.spoiled = true
        this.socket.destroy()
        done({ status, peer, body: undefined, text: '' })
        return
      }
      if (parsed.chunked) {
        fail(new ProtocolError('a Transfer-Encoding the piece protocol does not use'))
        return
      }
      if (declared === undefined) {
        fail(new ProtocolError(`a ${status} response without Content-Length`))
        return
      }
      if (status === 200) {
        const count = parsed.pieces ?? 1
        if (count < 1 || count > lengths.length) {
          fail(new ProtocolError(`sent ${count} pieces for a request of ${lengths.length}`))
          return
        }
        const sent = lengths.slice(0, count)
        const expected = sent.reduce((a, b) => a + b, 0)
        if (declared !== expected) {
          fail(new ProtocolError(`offered ${declared} bytes for ${count === 1 ? `a ${expected}-byte piece` : `${count} pieces of ${expected} bytes`}`))
          return
        }
        for (const length of sent) {
          const lease = buffers?.take(length)
          parts.push({ data: lease?.data ?? Buffer.allocUnsafe(length), lease })
        }
      } else {
        if (declared > ERROR_BODY_MAX) {
          fail(new ProtocolError(`a ${status} response with a ${declared}-byte body`))
          return
        }
        parts.push({ data: Buffer.allocUnsafe(declared) })
      }
      const early = filled - (end + 4)
      if (early > declared) {
        fail(new ProtocolError('more bytes than the response declared'))
        return
      }
      started = true
      // What came with the headers is copied into the parts it belongs to (a short last piece may end within it).
      let from = end + 4
      while (from < filled) {
        const target = parts[part] as ReadPiece
        const n = Math.min(filled - from, target.data.length - partFilled)
        this.#scratch.copy(target.data, partFilled, from, from + n)
        from += n
        advance(n)
      }
      if (declared === 0) {
        finishBody()
        return
      }
      if (from === end + 4) this.#target = (parts[0] as ReadPiece).data
    }
    this.#onEnd = (err) => {
      const got = parts.slice(0, part).reduce((a, p) => a + p.data.length, 0) + partFilled
      reject(new PeerUnavailableError(!started ? `no response: ${err.message}` : `stopped after ${got} bytes of the response`, { cause: err }))
    }
    const abort = (): void => { fail(signal.reason as Error) }
    signal.addEventListener('abort', abort, { once: true })
    try {
      this.#target = this.#scratch
      this.socket.write(head)
      // The parent may hold the request while the piece is on its way to it: the first bytes get that long too.
      if (stall !== undefined) arm(stall.firstByteMs, 'no answer')
      return await promise
    } finally {
      clearTimeout(stallTimer)
      signal.removeEventListener('abort', abort)
      this.#onEnd = undefined
      if (this.#onRead !== undefined) {
        this.#onRead = undefined
        this.spoiled = true
      }
    }
  }

  close (): void {
    clearTimeout(this.idleTimer)
    this.spoiled = true
    this.socket.destroy()
  }
}

/** Status, Content-Length, the answering peer and whether the connection stays open; a string says what is wrong. */
function parseHead (text: string): { status: number, contentLength: number | undefined, chunked: boolean, peer: string | undefined, pieces: number | undefined, keepAlive: boolean } | string {
  const lines = text.split('\r\n')
  const m = /^HTTP\/1\.([01]) (\d{3})/.exec(lines[0] ?? '')
  if (m === null) return `not an HTTP response: ${JSON.stringify((lines[0] ?? '').slice(0, 80))}`
  let contentLength: number | undefined
  let peer: string | undefined
  let keepAlive = m[1] === '1'
  let chunked = false
  let pieces: number | undefined
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i] as string
    const colon = line.indexOf(':')
    if (colon <= 0) return 'a malformed header line'
    const name = line.slice(0, colon).trim().toLowerCase()
    const value = line.slice(colon + 1).trim()
    if (name === 'content-length') {
      if (!/^\d{1,15}$/.test(value) || (contentLength !== undefined && contentLength !== Number(value))) return 'a malformed Content-Length'
      contentLength = Number(value)
    } else if (name === 'transfer-encoding') {
      chunked = true
    } else if (name === PIECE_HTTP_PEER_HEADER) {
      peer = value
    } else if (name === PIECE_HTTP_PIECES_HEADER) {
      if (!/^\d{1,3}$/.test(value)) return `a malformed ${PIECE_HTTP_PIECES_HEADER}`
      pieces = Number(value)
    } else if (name === 'connection') {
      keepAlive = value.toLowerCase() !== 'close'
    }
  }
  return { status: Number(m[2]), contentLength, chunked, peer, pieces, keepAlive }
}

/** Keep-alive connections to upload ports, at most `perAddress` to each. */
export class PieceConnectionPool {
  readonly #pools = new Map<string, Pool>()
  readonly #perAddress: number
  readonly #maxWaiting: number
  readonly #idleMs: number
  readonly #maxHeaderBytes: number
  readonly #connectTimeoutMs: number
  readonly #buffers: BufferPool | undefined
  #closed = false

  constructor (init: PieceConnectionPoolInit = {}) {
    this.#perAddress = init.perAddress ?? 16
    this.#maxWaiting = init.maxWaiting ?? 256
    this.#idleMs = init.idleMs ?? 4_000
    this.#maxHeaderBytes = init.maxHeaderBytes ?? 16 * 1024
    this.#connectTimeoutMs = init.connectTimeoutMs ?? 5_000
    this.#buffers = init.buffers
  }

  /**
   * GETs `path` from `base` (`http://host:port`). A kept-alive connection the
   * server closed meanwhile fails before any response; the request is then
   * sent once more on a new one.
   */
  async get (base: string, path: string, headers: Record<string, string>, length: number | readonly number[], signal: AbortSignal, stall?: Stall): Promise<PieceResponse> {
    const lengths = typeof length === 'number' ? [length] : length
    if (this.#closed) throw new PeerUnavailableError('the piece client is closed')
    const pool = this.#pool(base)
    await this.#slot(pool, signal)
    try {
      let head = `GET ${path} HTTP/1.1\r\nhost: ${pool.host.includes(':') ? `[${pool.host}]` : pool.host}:${pool.port}\r\n`
      for (const [k, v] of Object.entries(headers)) head += `${k}: ${v}\r\n`
      head += '\r\n'
      for (let attempt = 0; ; attempt++) {
        let reused = pool.idle.pop()
        // The server closes idle connections on its own clock: those are no use.
        while (reused?.spoiled === true) {
          reused.close()
          reused = pool.idle.pop()
        }
        const conn = reused ?? new Connection(pool.host, pool.port, this.#maxHeaderBytes, this.#connectTimeoutMs)
        clearTimeout(conn.idleTimer)
        try {
          if (reused === undefined) await raceAbort(conn.connected, signal, () => { conn.close() })
          const response = await conn.exchange(head, lengths, this.#maxHeaderBytes, signal, stall, this.#buffers)
          this.#release(pool, conn)
          return response
        } catch (err) {
          conn.close()
          // Only a connection from the pool that failed before answering is worth another go.
          if (reused === undefined || attempt > 0 || signal.aborted || !(err instanceof PeerUnavailableError) || !err.message.startsWith('no response')) throw err
        }
      }
    } finally {
      this.#freeSlot(pool)
    }
  }

  close (): void {
    this.#closed = true
    for (const pool of this.#pools.values()) {
      for (const conn of pool.idle) conn.close()
      pool.idle.length = 0
    }
    this.#pools.clear()
  }

  #pool (base: string): Pool {
    let pool = this.#pools.get(base)
    if (pool === undefined) {
      const url = new URL(base)
      const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname
      pool = { host, port: Number(url.port === '' ? 80 : url.port), active: 0, idle: [], waiting: [] }
      this.#pools.set(base, pool)
    }
    return pool
  }

  async #slot (pool: Pool, signal: AbortSignal): Promise<void> {
    if (pool.active < this.#perAddress) {
      pool.active++
      return
    }
    if (pool.waiting.length >= this.#maxWaiting) throw new PeerBusyError(`${this.#maxWaiting} requests already wait for a connection to ${pool.host}:${pool.port}`)
    // A slot is handed over by the request that frees it, still counted in `active`.
    const { promise, resolve } = Promise.withResolvers<void>()
    pool.waiting.push(resolve)
    let withdrawn = false
    try {
      await raceAbort(promise, signal, () => {
        const i = pool.waiting.indexOf(resolve)
        if (i >= 0) pool.waiting.splice(i, 1)
        withdrawn = i >= 0
      })
    } catch (err) {
      // The slot came just as we gave up: pass it on.
      if (!withdrawn) void promise.then(() => { this.#freeSlot(pool) })
      throw err
    }
  }

  #freeSlot (pool: Pool): void {
    const next = pool.waiting.shift()
    if (next !== undefined) {
      next()
      return
    }
    pool.active--
    if (pool.active === 0 && pool.idle.length === 0) this.#forget(pool)
  }

  #release (pool: Pool, conn: Connection): void {
    if (conn.spoiled || this.#closed || pool.idle.length >= this.#perAddress) {
      conn.close()
      return
    }
    conn.idleTimer = setTimeout(() => {
      const i = pool.idle.indexOf(conn)
      if (i >= 0) pool.idle.splice(i, 1)
      conn.close()
      if (pool.idle.length === 0 && pool.active === 0) this.#forget(pool)
    }, this.#idleMs)
    conn.idleTimer.unref()
    pool.idle.push(conn)
  }

  #forget (pool: Pool): void {
    for (const [k, v] of this.#pools) if (v === pool) this.#pools.delete(k)
  }
}

async function raceAbort<T> (promise: Promise<T>, signal: AbortSignal, onAbort: () => void): Promise<T> {
  signal.throwIfAborted()
  const { promise: aborted, reject } = Promise.withResolvers<never>()
  const listener = (): void => {
    onAbort()
    reject(signal.reason)
  }
  signal.addEventListener('abort', listener, { once: true })
  try {
    return await Promise.race([promise, aborted])
  } finally {
    signal.removeEventListener('abort', listener)
  }
}

/** The error a non-200 piece answer stands for. */
export function answerError (response: PieceResponse, parent: string, index: number): Error {
  const why = `${parent} answered ${response.status} for piece ${index}: ${response.text.slice(0, 200)}`
  if (response.status === 503) return new PeerBusyError(why, busyHints(response.text))
  if (response.status === 404) return new PieceNotHeldError(why)
  return new PeerUnavailableError(why)
}

/** The peers a busy answer's body points at; none when it names none or is not a well-formed answer. */
export function busyHints (text: string): PieceHint[] {
  try {
    const header = decode(PieceHeader, Buffer.from(text), 'busy answer')
    return header.status === 'busy' ? header.try ?? [] : []
  } catch {
    return []
  }
}
