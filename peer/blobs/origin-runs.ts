import { Readable } from 'node:stream'
import type { BufferPool, Lease } from '../../src/buffer-pool.ts'
import { OriginProtocolError, isAbort } from '../../src/errors.ts'
import { Limiter } from '../../src/limiter.ts'
import type { Logger } from '../../src/logger.ts'
import { sha256Hex } from '../../src/oci/digest.ts'
import { DEFAULT_MANIFEST_ACCEPT } from '../../src/oci/media-types.ts'
import { choosePieceSize, pieceBounds } from '../../src/pieces.ts'
import { throttled, type RateLimits } from '../../src/rate.ts'
import type { OriginClient } from '../origin/index.ts'
import { Priority, type BlobTask } from './index.ts'

export interface OriginRunsComponents {
  logger: Logger
  origin: OriginClient
  /** Origin bytes wait for the origin and download limits, and prefetch runs for the prefetch limit too. */
  rates?: Pick<RateLimits, 'origin' | 'download' | 'prefetch'> | undefined
  /** Where pieces are cut into; each landed piece's lease is then the `land` callback's to release. */
  buffers?: BufferPool | undefined
}

export interface OriginRunsInit {
  /** Most pieces one origin request covers. Default 64. */
  maxRunPieces?: number
  /** Origin requests in flight at once, across all blobs. Default 16. */
  maxOriginRuns?: number
  /** Origin requests waiting for a slot before new ones are refused. Default 1024. */
  maxQueuedRuns?: number
}

/** A piece cut from an origin body: its bytes and their SHA-256, in order; `lease`, when the bytes sit in a pooled buffer, is the callee's. */
export type Land = (index: number, data: Buffer, sha256: string, lease?: Lease) => Promise<void>

/** Longest origin run for work below on-demand priority: an on-demand read waits on at most this many of its pieces. */
const LOW_PRIORITY_RUN = 4

/**
 * Reads from the origin in runs: one ranged GET covering consecutive pieces
 * (a manifest, which has no ranges, whole), cut into pieces as bytes arrive.
 * Origin requests are bounded and queued by priority; a low-priority run is
 * kept short so it never holds an on-demand read up for long. Pieces are
 * handed on in order with their SHA-256; what is done with them (checking
 * them against the swarm's table, keeping them) is the caller's.
 */
export class OriginRuns {
  readonly #logger: Logger
  readonly #origin: OriginClient
  readonly #maxRun: number
  readonly #runs: Limiter
  readonly #rates: OriginRunsComponents['rates']
  readonly #buffers: BufferPool | undefined

  constructor (components: OriginRunsComponents, init: OriginRunsInit = {}) {
    this.#logger = components.logger
    this.#origin = components.origin
    this.#rates = components.rates
    this.#buffers = components.buffers
    this.#maxRun = Math.max(1, init.maxRunPieces ?? 64)
    this.#runs = new Limiter('origin requests', init.maxOriginRuns ?? 16, init.maxQueuedRuns ?? 1024)
  }

  /** Most pieces a run at this priority covers. */
  runLength (priority: number): number {
    return priority < Priority.ON_DEMAND ? Math.min(this.#maxRun, LOW_PRIORITY_RUN) : this.#maxRun
  }

  /**
   * Pieces `first..last` of a task from one origin request, each handed to
   * `land` as it completes. Resolves once all are landed; rejects (with the
   * index reached in the log) when the body breaks or ends early.
   */
  async run (task: BlobTask, first: number, last: number, priority: number, land: Land, signal: AbortSignal, pooled = true): Promise<void> {
    const release = await this.#runs.acquire({ signal, priority })
    let body: Readable | undefined
    try {
      if (task.kind === 'manifest') {
        const res = await this.#origin.getManifest(task.upstream, task.repo, task.digest, DEFAULT_MANIFEST_ACCEPT, task.credentials, { signal })
        if (res.body.length !== task.size) throw new OriginProtocolError(`manifest ${task.digest} is ${res.body.length} bytes, expected ${task.size}`)
        body = Readable.from([res.body])
      } else {
        const pieceSize = choosePieceSize(task.size)
        const start = first * pieceSize
        const end = Math.min(task.size, (last + 1) * pieceSize) - 1
        body = (await this.#origin.getBlob(task.upstream, task.repo, task.digest, { start, end }, task.credentials, { signal })).body
      }
      const rates = this.#rates
      // Limits slow the reading, so the origin's TCP window closes rather than bytes piling up here.
      const limited = rates === undefined ? body as AsyncIterable<Buffer> : throttled(body as AsyncIterable<Buffer>, priority < Priority.ON_DEMAND ? [rates.origin, rates.download, rates.prefetch] : [rates.origin, rates.download], { signal })
      await cutPieces(task, first, last, limited, land, pooled ? this.#buffers : undefined)
    } catch (err) {
      if (!isAbort(err)) this.#logger.debug({ err, digest: task.digest, first, last }, 'origin request ended early')
      throw err
    } finally {
      body?.destroy()
      release()
    }
  }

  /** Exactly one piece from the origin (a range read checking an entry nobody has confirmed). */
  async piece (task: BlobTask, index: number, priority: number, signal: AbortSignal): Promise<Buffer> {
    let got: Buffer | undefined
    // The caller keeps these bytes: not a pooled buffer.
    await this.run(task, index, index, priority, async (_i, data) => { got = data }, signal, false)
    return got as Buffer
  }
}

/**
 * Cuts a body holding pieces `first..last` of a blob into pieces, in order.
 * Every piece has its exact size: the piece size follows from the blob's
 * size alone, never from what a cache may have dropped meanwhile.
 */
export async function cutPieces (task: { digest: string, size: number }, first: number, last: number, body: AsyncIterable<Buffer> | Iterable<Buffer>, land: Land, buffers?: BufferPool): Promise<void> {
  const pieceSize = choosePieceSize(task.size)
  let i = first
  const next = (): { buf: Buffer, lease: Lease | undefined } => {
    const length = pieceBounds(i, task.size, pieceSize).length
    const lease = buffers?.take(length)
    return { buf: lease?.data ?? Buffer.allocUnsafe(length), lease }
  }
  let { buf, lease } = next()
  let filled = 0
  for await (const chunk of body) {
    let off = 0
    while (off < chunk.length && i <= last) {
      const n = Math.min(chunk.length - off, buf.length - filled)
      chunk.copy(buf, filled, off, off + n)
      filled += n
      off += n
      if (filled < buf.length) continue
      await land(i, buf, sha256Hex(buf), lease)
      i++
      if (i <= last) {
        ({ buf, lease } = next())
        filled = 0
      }
    }
    if (i > last) return
  }
  if (i <= last) throw new OriginProtocolError(`origin body for ${task.digest} ended at piece ${i} of ${last}`)
}
