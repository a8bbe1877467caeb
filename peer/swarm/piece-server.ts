import { QueueFullError, isAbort } from '../../src/errors.ts'
import { Limiter } from '../../src/limiter.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, type Registry } from '../../src/metrics.ts'
import { messages, sig, type P2PNode } from '../../src/p2p/index.ts'
import { PIECE_PROTOCOL, PieceRequest, type PieceHeader } from '../../src/protocol/messages.ts'
import type { BlobService } from '../blobs/index.ts'
import { TokenBucket } from './rate.ts'

export interface PieceServerComponents {
  logger: Logger
  node: P2PNode
  blobs: BlobService
  metrics?: Registry | undefined
  /** Whether this node is the first fetcher of a piece (so it should fetch it on demand). */
  firstFetcherOf: (digest: string, index: number) => boolean
}

export interface PieceServerInit {
  /** Pieces sent at once. Default 32. */
  concurrency?: number
  /** Requests waiting for an upload slot before more are answered "busy". Default 4 × concurrency. */
  maxQueue?: number
  /** Bytes per second across all uploads; 0 for no limit. */
  rateLimit?: number
  /**
   * Test-only fault: flip a byte of every piece sent. Set only by the test
   * suite (through DAMSELFLY_TEST_FAULTS); it is how the tests prove bad bytes
   * never reach a client.
   */
  corruptPieces?: boolean
}

export interface PieceServer {
  start: () => Promise<void>
  stop: () => void
  readonly activeUploads: number
}

const SEND_CHUNK = 256 * 1024
/** Longest any upload may take, waiting included. */
const UPLOAD_DEADLINE_MS = 180_000

export function createPieceServer (components: PieceServerComponents, init: PieceServerInit = {}): PieceServer {
  const logger = components.logger.child({ component: 'peer:piece-server' })
  const concurrency = init.concurrency ?? 32
  const uploads = new Limiter('upload', concurrency, init.maxQueue ?? concurrency * 4)
  const bucket = new TokenBucket(init.rateLimit ?? 0)
  const shutdown = new AbortController()
  const registers = components.metrics === undefined ? undefined : [components.metrics]
  const sent = registers === undefined ? undefined : new Counter({ name: 'damselfly_uploaded_bytes_total', help: 'Piece bytes sent to other peers', registers })
  const requests = registers === undefined ? undefined : new Counter({ name: 'damselfly_piece_requests_total', help: 'Piece requests from other peers, by answer', labelNames: ['status'], registers })
  if (init.corruptPieces === true) logger.warn('TEST FAULT ACTIVE: every piece this peer uploads is corrupted')

  async function serve (stream: Parameters<Parameters<P2PNode['handle']>[1]>[0], remotePeer: string): Promise<void> {
    const signal = AbortSignal.any([shutdown.signal, AbortSignal.timeout(UPLOAD_DEADLINE_MS)])
    const io = messages(stream, 4096)
    const request = await io.read(PieceRequest, 'piece request', { signal: AbortSignal.any([signal, AbortSignal.timeout(10_000)]) })
    const answer = async (header: PieceHeader): Promise<void> => {
      requests?.inc({ status: header.status })
      await io.write(header, { signal })
    }
    let release: (() => void) | undefined
    try {
      release = await uploads.acquire({ signal })
    } catch (err) {
      if (err instanceof QueueFullError) {
        await answer({ status: 'busy' })
        await stream.close(sig({ signal })).catch(() => {})
        return
      }
      throw err
    }
    try {
      let data: Buffer | undefined
      try {
        data = await components.blobs.servePiece(request.digest, request.index, {
          waitMs: request.waitMs,
          fetch: () => components.firstFetcherOf(request.digest, request.index),
          signal
        })
      } catch (err) {
        if (isAbort(err) && shutdown.signal.aborted) throw err
        logger.debug({ err: (err as Error).message, digest: request.digest, piece: request.index, peer: remotePeer }, 'could not produce a piece')
        await answer({ status: 'error', message: String((err as { code?: string }).code ?? 'error') })
        await stream.close(sig({ signal })).catch(() => {})
        return
      }
      if (data === undefined) {
        await answer({ status: 'not-found' })
        await stream.close(sig({ signal })).catch(() => {})
        return
      }
      if (init.corruptPieces === true) {
        data = Buffer.from(data)
        data[Math.floor(data.length / 2)] = (data[Math.floor(data.length / 2)] as number) ^ 0x5a
      }
      await answer({ status: 'ok', length: data.length })
      const raw = io.unwrap()
      for (let off = 0; off < data.length; off += SEND_CHUNK) {
        const chunk = data.subarray(off, Math.min(data.length, off + SEND_CHUNK))
        await bucket.take(chunk.length, { signal })
        if (!raw.send(chunk)) await raw.onDrain({ signal })
      }
      sent?.inc(data.length)
      await raw.close({ signal })
    } finally {
      release()
    }
  }

  return {
    get activeUploads () { return uploads.active },
    async start () {
      await components.node.handle(PIECE_PROTOCOL, serve, { maxInboundStreams: concurrency * 8, maxOutboundStreams: 256 })
    },
    stop () {
      shutdown.abort()
    }
  }
}
