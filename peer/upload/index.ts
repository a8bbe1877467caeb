import { once } from 'node:events'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { LRUCache } from 'lru-cache'
import { deadline, raceSignal, withDeadline } from '../../src/abort.ts'
import { BufferPool, type Lease } from '../../src/buffer-pool.ts'
import { DEFAULTS } from '../../src/config/defaults.ts'
import { QueueFullError, StorageError, isAbort } from '../../src/errors.ts'
import { Limiter } from '../../src/limiter.ts'
import { TokenBucket } from '../../src/rate.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, Gauge, type Registry } from '../../src/metrics.ts'
import { messages, sig, type P2PNode } from '../../src/p2p/index.ts'
import { MIN_PIECE_SIZE, choosePieceSize, pieceCount } from '../../src/pieces.ts'
import { PIECE_HTTP_PEER_HEADER, PIECE_HTTP_PIECES_HEADER, PIECE_PROTOCOL, PieceRequest, type PieceHint } from '../../src/protocol/messages.ts'
import type { LentPiece, PieceSupply } from '../blobs/index.ts'
import { pieceKey, readChildHint, readPieceRequest, uploadUrls } from '../swarm/piece-http.ts'
import { createConnectionGuard, type ConnectionGuard } from './connection-guard.ts'
import { UploadPace } from './pace.ts'
import { Recipients } from './recipients.ts'
import type { TaskRegistry } from './tasks.ts'

export interface UploadServerComponents {
  logger: Logger
  /** The libp2p node: pieces are served on its piece protocol too. */
  node: P2PNode
  supply: PieceSupply
  tasks: TaskRegistry
  metrics?: Registry | undefined
  /** Whether the scheduler sent this node to the origin for a piece (so it fetches it when asked). */
  sentFor: (digest: string, index: number) => boolean
  /** The node's upload limit, shared by both transports; none when absent. */
  rate?: TokenBucket | undefined
}

export interface UploadServerInit {
  /**
   * Pieces sent at once at most. Default `DEFAULTS.uploadConcurrency`. Fewer
   * run while the uplink's measured rate could not send them all within a
   * quarter second (./pace.ts); `minConcurrency` always may.
   */
  concurrency?: number
  /** Pieces that may be sent at once whatever the measured rate. Default 2. */
  minConcurrency?: number
  /** Requests waiting at once for a piece this node is still getting; more are answered busy. Default 256. */
  maxWaits?: number
  /** Longest a request may wait for a piece this node is still getting, whatever it asks. Default 15 s. */
  maxWaitMs?: number
  /** Upload-port connections one address may hold open. Default `DEFAULTS.uploadConnectionsPerAddress`. */
  connectionsPerAddress?: number
  /** Upload-port connections in all. Default `DEFAULTS.uploadConnections`. */
  maxConnections?: number
  /** A connection that sends no complete request for this long is closed. Default 5 s. */
  idleTimeoutMs?: number
  /**
   * Requests waiting for an upload slot before more are answered "busy".
   * Default 0: a child told busy asks another holder at once, or a peer this
   * one sent the piece to; queued behind a parent everyone picked, it waits
   * while other holders idle (fleet simulation, N = 200: p50 2.98× T* with a
   * queue of 128 and 32 slots, 1.51× with none and 8).
   */
  maxQueue?: number
  /**
   * Test-only fault: flip a byte of every piece sent. Set only by the test
   * suite (through DAMSELFLY_TEST_FAULTS); it is how the tests prove bad bytes
   * never reach a client.
   */
  corruptPieces?: boolean
  /** Where the HTTP upload port listens; absent for libp2p streams only. */
  http?: { host: string, port: number } | undefined
  /** The cluster secret children prove on the upload port. */
  clusterSecret?: string | undefined
  /**
   * Send each piece once (a seed): a second child asking for a piece this
   * node is still sending (for up to `SAME_PIECE_MS`), or finished sending
   * less than `resendMs` ago, is answered busy and pointed at the child that
   * got it. A seed sending every piece to every child at once is the centre
   * of a star: its uplink is shared by all of them, the pieces reach all
   * children together, and none has one to pass on until the seed is nearly
   * done (BitTorrent calls the remedy super-seeding). Sending a piece again
   * to whoever asks once the first send is over spent half a seed's upload
   * on copies the swarm already had (fleet simulation: 168 of the blob's
   * 256 pieces had reached a peer after 1 s instead of 196).
   */
  onePerPiece?: boolean
  /** With `onePerPiece`: how long after a send arrived the piece is not sent again. Default 3 s. */
  resendMs?: number
}

export interface UploadServer {
  start: () => Promise<void>
  stop: () => void
  readonly activeUploads: number
  /** Piece bytes sent to other peers since start, over either transport. */
  readonly uploadedBytes: number
  /** Base URLs of the upload port, best first; empty when it is off. */
  readonly uploadUrls: string[]
}

const SEND_CHUNK = 256 * 1024
/**
 * How long a piece on its way to one child is refused to another: past it a
 * slow child holds nobody up. Shorter than a child's patience with busy
 * parents (20 s), so nobody is sent to the origin for it; 30 s did that in
 * the emulated cluster (origin 1.25× the image), 2 s let the star return
 * behind a slow uplink, where one piece takes seconds.
 */
const SAME_PIECE_MS = 12_000
/**
 * After a send arrived, how long a seed points other children at the child
 * that got a piece instead of sending it again: long enough for that child to
 * have passed it on (a piece takes about 10 ms at 100 MiB/s, half a second
 * at 2 MiB/s), short enough that a child that got it and vanished costs the
 * others little.
 */
const RESEND_MS = 3_000
/** Piece buffers kept for reuse between HTTP uploads; more at once are allocated and left to the collector. */
const POOLED_BUFFERS = 8

/** Longest any upload may take, waiting included. */
const UPLOAD_DEADLINE_MS = 180_000

/**
 * What other peers ask of this one: pieces, over the HTTP upload port and the
 * libp2p piece protocol. A piece held here is sent; one still on its way is
 * waited for (without holding an upload slot; waits are bounded); one this
 * node was sent to the origin for is fetched; anything else is a "not here"
 * at once, whatever the request was willing to wait.
 */
export function createUploadServer (components: UploadServerComponents, init: UploadServerInit = {}): UploadServer {
  const logger = components.logger.child({ component: 'peer:upload' })
  const { supply, tasks } = components
  const concurrency = init.concurrency ?? DEFAULTS.uploadConcurrency
  const maxWaitMs = init.maxWaitMs ?? 15_000
  const maxWaits = init.maxWaits ?? 256
  let waits = 0
  const bucket = components.rate ?? new TokenBucket(0)
  const pace = new UploadPace({ max: concurrency, min: init.minConcurrency, rate: bucket.rate })
  /** The size of the latest piece asked for: slots (and the gauge) are counted in pieces like it. */
  let pieceBytes = MIN_PIECE_SIZE
  // The pace is the limiter's own bound, so a queue (maxQueue) waits for a paced slot, as the fleet simulation models it.
  const uploads = new Limiter('upload', () => pace.limit(pieceBytes, Date.now()), init.maxQueue ?? 0)
  const shutdown = new AbortController()
  const registers = components.metrics === undefined ? undefined : [components.metrics]
  const counted = registers === undefined ? undefined : new Counter({ name: 'damselfly_uploaded_bytes_total', help: 'Piece bytes sent to other peers, by transport (http: the upload port; libp2p: streams)', labelNames: ['transport'], registers })
  const requests = registers === undefined ? undefined : new Counter({ name: 'damselfly_piece_requests_total', help: 'Piece requests from other peers, by answer', labelNames: ['status'], registers })
  if (registers !== undefined) {
    void new Gauge({ name: 'damselfly_upload_slots', help: 'Pieces this peer may send at once now, from its uplink\'s measured rate (at most uploadConcurrency)', registers, collect () { this.set(uploads.max) } })
    void new Gauge({ name: 'damselfly_upload_rate_bytes', help: 'The upload rate, bytes per second, the slots are worked out from: the best this peer\'s sends reached in the last 30 s, or the upload limit; 0 before any', registers, collect () { this.set(pace.rate(Date.now()) ?? 0) } })
  }
  const refused = registers === undefined ? undefined : new Counter({ name: 'damselfly_upload_connections_refused_total', help: 'Upload-port connections refused or dropped to stay within the per-address and total limits', registers })
  const key = pieceKey(init.clusterSecret)
  let http: Server | undefined
  let guard: ConnectionGuard | undefined
  let uploaded = 0
  const buffers = new BufferPool(MIN_PIECE_SIZE, POOLED_BUFFERS)
  /** Pieces being sent, with when the first send began (only with `onePerPiece`). */
  const sending = new Map<string, number>()
  /** When a piece's latest send began, or arrived, within `RESEND_MS` (only with `onePerPiece`). */
  const began = new LRUCache<string, number>({ max: 16_384, ttl: init.resendMs ?? RESEND_MS })
  const recipients = new Recipients()
  if (init.corruptPieces === true) logger.warn('TEST FAULT ACTIVE: every piece this peer uploads is corrupted')

  type Produced = { status: 'ok', data: Buffer, release: (delivered: boolean) => void, giveBack: () => void } | { status: 'not-found' | 'error', message?: string } | { status: 'busy', try?: PieceHint[] }
  const busy = (request: PieceRequest, asker: string): Produced => {
    const hints = recipients.hints(request.digest, request.index, asker)
    return hints.length === 0 ? { status: 'busy' } : { status: 'busy', try: hints }
  }

  /** The piece, or undefined when this node has nothing to give (yet). Throws QueueFullError when too many wait already. */
  async function piece (request: PieceRequest, signal: AbortSignal, lease?: Lease): Promise<LentPiece | undefined> {
    const { digest, index } = request
    const held = await supply.held(digest, index, lease?.data)
    // Kept only when the piece was read into it: a wait or a piece from memory holds no pooled buffer.
    if (lease !== undefined && held?.buffer !== lease.data.buffer) lease.release()
    if (held !== undefined) return { data: held, release: () => {} }
    const landing = supply.whenLanded(digest, index)
    const mine = (): boolean => components.sentFor(digest, index) || tasks.claimed(digest)
    if (request.waitMs === 0 || (landing === undefined && !mine())) return undefined
    if (waits >= maxWaits) throw new QueueFullError('piece waits')
    waits++
    const deadline = withDeadline(signal, Math.min(request.waitMs, maxWaitMs), 'waiting for a piece')
    try {
      if (landing !== undefined) {
        // Given up on, the piece still lands: what it lends goes back. Once it is ours, the sender gives it back.
        const giveUp = (): void => { landing.then(lent => { lent.release() }, () => {}) }
        if (deadline.aborted) giveUp()
        else deadline.addEventListener('abort', giveUp, { once: true })
        try {
          return await raceSignal(landing, deadline)
        } finally {
          deadline.removeEventListener('abort', giveUp)
        }
      }
      const task = tasks.get(digest) ?? supply.task(digest) ?? await tasks.adopted(digest, deadline)
      if (task === undefined || !mine() || index >= pieceCount(task.size, choosePieceSize(task.size))) return undefined
      return { data: await supply.fetch(task, index, deadline), release: () => {} }
    } catch (err) {
      // The wait ran out (not the asker leaving): nothing to give yet.
      if (!signal.aborted && deadline.aborted) return undefined
      throw err
    } finally {
      waits--
    }
  }

  /**
   * One request, whichever transport brought it: get the piece, then take an
   * upload slot (or say busy). An ok answer holds its slot until the caller
   * has sent the bytes and calls release, saying whether every byte went out;
   * `giveBack` returns lent bytes once the transport holds no reference to
   * them. `reach`: how other children may reach this one (HTTP requests that
   * said so), remembered once a send begins.
   */
  async function produce (request: PieceRequest, remotePeer: string, signal: AbortSignal, lease?: Lease, reach?: PieceHint): Promise<Produced> {
    // Waiting for a piece still on its way holds no upload slot; only sending one does.
    let lent: LentPiece | undefined
    try {
      lent = await piece(request, signal, lease)
    } catch (err) {
      if (err instanceof QueueFullError) return busy(request, remotePeer)
      if (isAbort(err) && shutdown.signal.aborted) throw err
      logger.debug({ err: (err as Error).message, digest: request.digest, piece: request.index, peer: remotePeer }, 'could not produce a piece')
      return { status: 'error', message: String((err as { code?: string }).code ?? 'error') }
    }
    if (lent === undefined) return { status: 'not-found' }
    let produced: Produced
    try {
      produced = await answer(request, remotePeer, signal, lent, reach)
    } catch (err) {
      lent.release()
      throw err
    }
    // Not sent after all: the bytes go back now.
    if (produced.status !== 'ok') lent.release()
    return produced
  }

  async function answer (request: PieceRequest, remotePeer: string, signal: AbortSignal, lent: LentPiece, reach?: PieceHint): Promise<Produced> {
    let data = lent.data
    const key = `${request.digest}#${request.index}`
    const sentElsewhere = (): boolean => {
      const since = sending.get(key)
      return (since !== undefined && Date.now() - since < SAME_PIECE_MS) || began.has(key)
    }
    if (init.onePerPiece === true && sentElsewhere()) return busy(request, remotePeer)
    pieceBytes = data.length
    let freeSlot: () => void
    try {
      const free = await uploads.acquire({ signal })
      pace.begin(Date.now())
      let freed = false
      freeSlot = () => {
        if (freed) return
        freed = true
        pace.end()
        free()
      }
    } catch (err) {
      if (err instanceof QueueFullError) return busy(request, remotePeer)
      throw err
    }
    // Looked at again with no await before the piece is marked: children waiting for a piece wake in one turn when it
    // lands, and all of them had passed the first look (emulated cluster: the seed sent such a piece to all six).
    if (init.onePerPiece === true && sentElsewhere()) {
      freeSlot()
      return busy(request, remotePeer)
    }
    let release = (_delivered: boolean): void => { freeSlot() }
    if (init.onePerPiece === true && !sending.has(key)) {
      const started = Date.now()
      sending.set(key, started)
      began.set(key, started)
      release = (delivered) => {
        if (sending.get(key) === started) sending.delete(key)
        // The window runs from the end of a send that arrived: behind a slow uplink a send takes seconds, and
        // counted from its start the window was over before the child had the piece to pass on (emulated
        // cluster: every piece sent twice). A send that broke off leaves nobody to point at: send again at once.
        if (delivered) began.set(key, Date.now())
        else if (began.get(key) === started) began.delete(key)
        freeSlot()
      }
    }
    if (reach !== undefined) recipients.record(request.digest, request.index, reach)
    if (init.corruptPieces === true) data = corrupt(data)
    return { status: 'ok', data, release, giveBack: lent.release }
  }

  /** The libp2p transport: a JSON request, a JSON header, then the bytes. */
  async function serveStream (stream: Parameters<Parameters<P2PNode['handle']>[1]>[0], remotePeer: string): Promise<void> {
    const signal = AbortSignal.any([shutdown.signal, AbortSignal.timeout(UPLOAD_DEADLINE_MS)])
    const io = messages(stream, 4096)
    const request = await io.read(PieceRequest, 'piece request', { signal: AbortSignal.any([signal, AbortSignal.timeout(10_000)]) })
    const produced = await produce(request, remotePeer, signal)
    requests?.inc({ status: produced.status })
    if (produced.status !== 'ok') {
      await io.write(produced, { signal })
      await stream.close(sig({ signal })).catch(() => {})
      return
    }
    let delivered = false
    try {
      const { data } = produced
      await io.write({ status: 'ok', length: data.length }, { signal })
      const raw = io.unwrap()
      for (let off = 0; off < data.length; off += SEND_CHUNK) {
        const chunk = data.subarray(off, Math.min(data.length, off + SEND_CHUNK))
        await bucket.take(chunk.length, { signal })
        const flowing = raw.send(chunk)
        pace.sent(chunk.length, Date.now())
        if (!flowing) await raw.onDrain({ signal })
      }
      counted?.inc({ transport: 'libp2p' }, data.length)
      uploaded += data.length
      await raw.close({ signal })
      delivered = true
    } finally {
      produced.release(delivered)
      // Chunks of a stream cut off may still wait in the muxer's queue: their buffer is left to the collector.
      if (delivered) produced.giveBack()
    }
  }

  /** The HTTP transport (the upload port): `GET /damselfly/v1/pieces/<digest>/<index>?wait=<ms>[&count=<k>]`. */
  async function serveHttp (req: IncomingMessage, res: ServerResponse): Promise<void> {
    res.setHeader(PIECE_HTTP_PEER_HEADER, components.node.peerId)
    const asked = readPieceRequest(req, components.node.peerId, key)
    if ('status' in asked) {
      sendJson(res, asked.status, { status: 'refused', message: asked.message })
      return
    }
    guard?.vouch(req.socket)
    const gone = new AbortController()
    res.once('close', () => { if (!res.writableFinished) gone.abort() })
    // Cleared when the response closes: a timer per upload left to run out (three minutes) piled up at line rate.
    const limit = deadline([shutdown.signal, gone.signal], UPLOAD_DEADLINE_MS, 'an upload')
    res.once('close', limit.clear)
    const signal = limit.signal
    // A piece read from disk lands in a pooled buffer, free again once the response is done with it ('close' comes after the last write).
    const lease = buffers.take()
    res.once('close', lease.release)
    const reach = readChildHint(req, asked.child, key !== undefined)
    const produced = await produce(asked.request, reach?.peerId ?? asked.child, signal, lease, reach)
    requests?.inc({ status: produced.status })
    if (produced.status !== 'ok') {
      const code = produced.status === 'not-found' ? 404 : produced.status === 'busy' ? 503 : 502
      sendJson(res, code, produced)
      return
    }
    // The response is closed once its last write is done, or the socket is gone: nothing refers to the bytes then.
    if (res.closed) produced.giveBack()
    else res.once('close', produced.giveBack)
    let delivered = false
    try {
      const { data } = produced
      const more = runLengths(asked.request)
      res.writeHead(200, {
        'content-type': 'application/octet-stream',
        'content-length': more.reduce((a, b) => a + b, data.length),
        ...(more.length > 0 ? { [PIECE_HTTP_PIECES_HEADER]: 1 + more.length } : {})
      })
      await sendBytes(res, data, signal)
      for (let j = 1; j <= more.length; j++) await sendHeld(res, asked.request.digest, asked.request.index + j, more[j - 1] as number, signal)
      res.end()
      delivered = true
    } finally {
      produced.release(delivered)
    }
  }

  /**
   * The lengths of the pieces after the first that a run asks for and this
   * node holds on disk now, up to the first it does not. A seed sends each
   * piece once (`onePerPiece`) and answers for one piece at a time.
   */
  function runLengths (request: PieceRequest): number[] {
    const out: number[] = []
    if (init.onePerPiece === true) return out
    for (let j = 1; j < (request.count ?? 1); j++) {
      const length = supply.heldLength(request.digest, request.index + j)
      if (length === undefined) break
      out.push(length)
    }
    return out
  }

  /** A held piece of a run, read into a pooled buffer that goes back once its last byte is with the socket. */
  async function sendHeld (res: ServerResponse, digest: string, index: number, length: number, signal: AbortSignal): Promise<void> {
    const lease = buffers.take()
    let data: Buffer | undefined
    try {
      data = await supply.held(digest, index, lease.data)
    } catch (err) {
      lease.release()
      throw err
    }
    if (data?.buffer !== lease.data.buffer) lease.release()
    // Gone since the head promised it (evicted meanwhile): the child sees a short body and asks again.
    if (data?.length !== length) throw new StorageError(`piece ${index} of ${digest} went before it was sent`)
    if (init.corruptPieces === true) data = corrupt(data)
    await sendBytes(res, data, signal, data.buffer === lease.data.buffer ? () => { lease.release() } : undefined)
  }

  /** Writes bytes in chunks at the upload limit's pace, waiting for the socket to drain; `sent` runs once the last chunk is with it. */
  async function sendBytes (res: ServerResponse, data: Buffer, signal: AbortSignal, sent?: () => void): Promise<void> {
    for (let off = 0; off < data.length; off += SEND_CHUNK) {
      const end = Math.min(data.length, off + SEND_CHUNK)
      const chunk = data.subarray(off, end)
      await bucket.take(chunk.length, { signal })
      // A response cut off may never call back: its buffer is then left to the collector, not reused (see BufferPool).
      const flowing = end === data.length && sent !== undefined ? res.write(chunk, sent) : res.write(chunk)
      pace.sent(chunk.length, Date.now())
      if (!flowing) await once(res, 'drain', { signal })
    }
    counted?.inc({ transport: 'http' }, data.length)
    uploaded += data.length
  }

  return {
    get activeUploads () { return uploads.active },
    get uploadedBytes () { return uploaded },
    get uploadUrls () {
      const address = http?.address()
      return address === undefined || address === null || typeof address === 'string' ? [] : uploadUrls(components.node.addrs(), address.port)
    },
    async start () {
      await components.node.handle(PIECE_PROTOCOL, serveStream, { maxInboundStreams: concurrency * 8, maxOutboundStreams: 256 })
      if (init.http === undefined) return
      const idleMs = init.idleTimeoutMs ?? 5_000
      // Idle and half-sent connections are swept every second: a socket that
      // never sends a whole request is gone within `idleMs` or so.
      const server = createServer({ keepAliveTimeout: idleMs, headersTimeout: idleMs, requestTimeout: idleMs * 2, connectionsCheckingInterval: 1_000 }, (req, res) => {
        connections.busy(req.socket, true)
        res.once('close', () => { connections.busy(req.socket, false) })
        serveHttp(req, res).catch((err: unknown) => {
          if (!isAbort(err)) logger.debug({ err: (err as Error).message }, 'upload failed')
          res.destroy()
        })
      })
      const connections = createConnectionGuard({
        perAddress: init.connectionsPerAddress ?? DEFAULTS.uploadConnectionsPerAddress,
        total: init.maxConnections ?? DEFAULTS.uploadConnections,
        onRefused: () => { refused?.inc() }
      })
      server.on('connection', (socket: Socket) => { connections.admit(socket) })
      guard = connections
      http = server
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(init.http?.port, init.http?.host, () => {
          server.off('error', reject)
          resolve()
        })
      })
    },
    stop () {
      shutdown.abort()
      http?.close()
      http?.closeAllConnections()
    }
  }
}

/** The test fault's copy of a piece with one byte flipped. */
function corrupt (data: Buffer): Buffer {
  const copy = Buffer.from(data)
  copy[Math.floor(copy.length / 2)] = (copy[Math.floor(copy.length / 2)] as number) ^ 0x5a
  return copy
}

/** A refusal with its length declared: children read bodies by Content-Length, never chunked. */
function sendJson (res: ServerResponse, status: number, body: unknown): void {
  const text = Buffer.from(JSON.stringify(body))
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': text.length }).end(text)
}
