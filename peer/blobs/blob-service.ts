import type { Readable } from 'node:stream'
import { LRUCache } from 'lru-cache'
import type { AbortOptions } from '../../src/abort.ts'
import { RegistryNotAllowedError } from '../../src/errors.ts'
import { Limiter } from '../../src/limiter.ts'
import { pieceBounds } from '../../src/pieces.ts'
import type { Logger } from '../../src/logger.ts'
import type { ByteRange } from '../../src/oci/range.ts'
import type { OriginCredentials } from '../origin/index.ts'
import type { PieceWriter } from '../piece-store/index.ts'
import { PieceAcquisition } from './acquisition.ts'
import { ByteCounters } from './counters.ts'
import { Priority, type BlobByteCounts, type BlobService, type BlobServiceComponents, type BlobServiceInit, type BlobTask, type LentPiece, type OpenBlob, type OpenBlobRequest, type ReadOptions } from './index.ts'
import { OriginRuns, cutPieces } from './origin-runs.ts'
import { BlobReader } from './reader.ts'

/**
 * The data path's front: the local cache, then the swarm, then the origin,
 * every piece verified before a byte of it is handed on. It checks callers
 * (access), and composes the modules that do the work: piece acquisition
 * (each piece once per node), origin runs, and the reader.
 */
export class DefaultBlobService implements BlobService {
  readonly #logger: Logger
  readonly #store: PieceWriter
  readonly #components: BlobServiceComponents
  readonly #counters: ByteCounters
  readonly #acquisition: PieceAcquisition
  readonly #reader: BlobReader
  readonly #prefetches: Limiter
  readonly #prefetching = new Set<string>()
  readonly #maxPrefetchQueue: number
  /** Tasks opened lately, with the upstream and credentials to fetch more of them (for other peers too). */
  readonly #tasks = new LRUCache<string, BlobTask>({ max: 4096, ttl: 10 * 60_000 })
  readonly #shutdown = new AbortController()
  readonly #maxRun: number

  constructor (components: BlobServiceComponents, init: BlobServiceInit) {
    this.#components = components
    this.#logger = components.logger.child({ component: 'peer:blobs' })
    this.#store = components.store
    this.#counters = new ByteCounters(components.metrics)
    this.#maxRun = Math.max(1, init.maxRunPieces ?? 64)
    const runs = new OriginRuns({ logger: this.#logger, origin: components.origin, rates: components.rates, buffers: components.buffers }, init)
    this.#acquisition = new PieceAcquisition({ logger: this.#logger, store: this.#store, runs, counters: this.#counters, source: components.source, rates: components.rates, buffers: components.buffers }, { attempts: init.pieceAttempts })
    this.#reader = new BlobReader({ logger: this.#logger, store: this.#store, acquisition: this.#acquisition, runs, counters: this.#counters, source: components.source }, init)
    const maxPrefetches = Math.max(1, init.maxPrefetches ?? 2)
    this.#maxPrefetchQueue = maxPrefetches * 16
    this.#prefetches = new Limiter('prefetch', maxPrefetches, this.#maxPrefetchQueue)
  }

  async open (request: OpenBlobRequest, options: AbortOptions = {}): Promise<OpenBlob> {
    const { upstream, repo, digest, kind, credentials } = request
    // Only a configured registry may fill the cache, and only its yes opens it.
    if (!upstream.trusted) throw new RegistryNotAllowedError(upstream.origin)
    const local = this.#store.info(digest)
    const access = await this.#components.access.check(upstream, repo, kind, digest, credentials, {
      signal: options.signal,
      local: local === undefined ? undefined : { size: local.size, mediaType: local.mediaType }
    })
    const mediaType = kind === 'manifest' ? (access.mediaType ?? local?.mediaType) : undefined
    this.#store.track(digest, access.size, { mediaType })
    const task: BlobTask = { upstream, repo, digest, kind, size: access.size, mediaType, credentials }
    this.#tasks.set(digest, task)
    return {
      task,
      stale: access.stale,
      read: async (range: ByteRange | undefined, readOptions: ReadOptions = {}): Promise<Readable> => this.#reader.read(task, range, readOptions)
    }
  }

  byteCounts (): BlobByteCounts {
    return this.#counters.snapshot()
  }

  task (digest: string): BlobTask | undefined {
    return this.#tasks.get(digest)
  }

  forget (credentials: OriginCredentials): void {
    for (const [digest, task] of this.#tasks.entries()) {
      if (task.credentials === credentials) this.#tasks.delete(digest)
    }
  }

  async held (digest: string, index: number, into?: Buffer): Promise<Buffer | undefined> {
    return this.#acquisition.peek(digest, index, into)
  }

  heldLength (digest: string, index: number): number | undefined {
    const info = this.#store.info(digest)
    if (info === undefined || !this.#store.hasPiece(digest, index)) return undefined
    return pieceBounds(index, info.size, info.pieceSize).length
  }

  whenLanded (digest: string, index: number): Promise<LentPiece> | undefined {
    return this.#acquisition.whenLanded(digest, index)
  }

  async fetch (task: BlobTask, index: number, signal: AbortSignal): Promise<Buffer> {
    const info = this.#store.track(task.digest, task.size, { mediaType: task.mediaType })
    return (await this.#acquisition.acquire(task, index, Math.min(info.pieceCount - 1, index + this.#maxRun - 1), signal, Priority.ON_DEMAND, true)).data
  }

  async abandon (digest: string): Promise<void> {
    await this.#acquisition.abandon(digest)
  }

  prefetch (task: BlobTask): boolean {
    if (this.#prefetching.has(task.digest) || this.#store.info(task.digest)?.complete === true) return false
    if (this.#prefetches.queued >= this.#maxPrefetchQueue) return false
    this.#prefetching.add(task.digest)
    const signal = this.#shutdown.signal
    void (async () => {
      let release: (() => void) | undefined
      try {
        release = await this.#prefetches.acquire({ signal, priority: 0 })
        await this.complete(task, { signal, priority: Priority.BACKGROUND })
        this.#logger.debug({ digest: task.digest }, 'prefetched a whole blob')
      } catch (err) {
        if (!signal.aborted) this.#logger.info({ err, digest: task.digest }, 'background prefetch stopped')
      } finally {
        release?.()
        this.#prefetching.delete(task.digest)
      }
    })()
    return true
  }

  async complete (task: BlobTask, options: ReadOptions = {}): Promise<void> {
    this.#tasks.set(task.digest, task)
    await this.#reader.fill(task, options)
  }

  async keep (task: BlobTask, bytes: Buffer): Promise<void> {
    const info = this.#store.track(task.digest, task.size, { mediaType: task.mediaType })
    if (info.complete) return
    this.#tasks.set(task.digest, task)
    await cutPieces(task, 0, info.pieceCount - 1, [bytes], async (i, data, sha256) => {
      if (!this.#store.hasPiece(task.digest, i)) await this.#store.writePiece(task.digest, i, data, { sha256, source: 'origin' })
    })
  }

  async stop (): Promise<void> {
    this.#shutdown.abort()
    this.#acquisition.stop()
  }
}
