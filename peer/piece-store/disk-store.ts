import { EventEmitter } from 'node:events'
import { mkdir, open, rm, type FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import { LRUCache } from 'lru-cache'
import type { AbortOptions } from '../../src/abort.ts'
import { BufferPool } from '../../src/buffer-pool.ts'
import { DEFAULTS, bytes } from '../../src/config/defaults.ts'
import { PieceDigestMismatchError, StorageError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, Gauge } from '../../src/metrics.ts'
import { parseDigest, sha256Hex } from '../../src/oci/digest.ts'
import { choosePieceSize, pieceBounds, pieceCount, piecesCovering } from '../../src/pieces.ts'
import { SHA256_BYTES, newEntry, pieceDigestOf, snapshot, type Entry } from './entry.ts'
import { PooledFileStream } from './file-stream.ts'
import { FileHandles } from './handles.ts'
import type { BlobInfo, PieceStore, PieceStoreComponents, PieceStoreInit, StoreEvents, WritePieceOptions } from './index.ts'
import { MetadataFiles } from './metadata.ts'
import { Quota, heldBytes } from './quota.ts'
import { chooseEvictions, diskUsage, type DiskGcInit } from './disk-gc.ts'
import { WholeHasher, tableOf } from './whole-hash.ts'

/** Chunks of a verified blob streamed from its file, in buffers reused once the consumer gives them back. */
const STREAM_CHUNK = 256 * 1024
/** Free stream buffers kept (each stream has one or two out at a time). */
const STREAM_BUFFERS = 16

/**
 * Pieces live in one sparse file per blob, written at their offsets, beside a
 * JSON metadata file: `<dataDir>/blobs/<algorithm>/<hex>/{data,meta.json}`.
 * Paths are built only from validated digests, never from request input.
 *
 * Integrity: a piece's SHA-256 is recorded when it is written, and bytes
 * read from disk are checked against it the first time this process reads
 * them (after a restart, every piece once more), so bit rot or a tampered
 * file found then is dropped and re-fetched rather than served. Within one
 * run the store trusts the bytes it wrote or checked itself: hashing them
 * again on every read cost an uploading peer a pass over every byte it sent.
 * The whole blob is checked once it is complete (whole-hash.ts). The store
 * itself keeps the blobs in recency order, the
 * hot-piece memory and the events; file handles, metadata and the quota are
 * modules of their own.
 */
export class DiskPieceStore implements PieceStore {
  readonly #logger: Logger
  readonly #root: string
  /** Insertion order is recency order: the first entry is the least recently used. */
  readonly #entries = new Map<string, Entry>()
  readonly #hot: LRUCache<string, Buffer>
  readonly #streamBuffers = new BufferPool(STREAM_CHUNK, STREAM_BUFFERS)
  readonly #writes = new Set<Promise<void>>()
  readonly #events = new EventEmitter()
  /** Directories being deleted; a blob tracked again under the same digest waits for them. */
  readonly #removing = new Map<string, Promise<void>>()
  readonly #handles = new FileHandles()
  readonly #meta: MetadataFiles
  readonly #quota: Quota
  readonly #hash: WholeHasher
  /** Complete blobs waiting for their background whole-blob check, and the chain that runs them. */
  readonly #queued = new Set<Entry>()
  #background: Promise<void> = Promise.resolve()
  #started = false
  readonly #gc: DiskGcInit
  readonly #gcIntervalMs: number
  #gcTimer: NodeJS.Timeout | undefined
  #sweeping: Promise<void> | undefined

  readonly #metrics: { bytes: Gauge, blobs: Gauge, evictions: Counter, verifyFailures: Counter } | undefined

  constructor (components: PieceStoreComponents, init: PieceStoreInit) {
    this.#logger = components.logger.child({ component: 'peer:piece-store' })
    this.#root = join(init.dataDir, 'blobs')
    this.#quota = new Quota(init.quotaBytes ?? bytes(DEFAULTS.cacheSize))
    this.#gc = { high: init.diskHighWatermark ?? 0.9, low: init.diskLowWatermark ?? 0.8, ttlMs: init.ttlMs ?? 0 }
    this.#gcIntervalMs = init.gcIntervalMs ?? 10_000
    this.#meta = new MetadataFiles(this.#logger, { flushDelayMs: init.flushDelayMs ?? 250, removing: (dir) => this.#removing.get(dir) })
    this.#hash = new WholeHasher({
      verified: (entry) => {
        this.#meta.markDirty(entry)
        this.#events.emit('verified', entry.digest.value)
      },
      mismatch: (entry, actual) => {
        this.#metrics?.verifyFailures.inc({ source: 'blob' })
        this.#logger.error({ digest: entry.digest.value, actual }, 'blob does not match its digest; removing it')
        this.#events.emit('mismatch', entry.digest.value, tableOf(entry))
        void this.#drop(entry, 'digest-mismatch')
      }
    }, async (entry, index, into) => this.#started ? this.#readVerified(entry, index, into) : undefined)
    this.#hot = new LRUCache<string, Buffer>({
      maxSize: Math.max(1, init.memoryCacheBytes ?? bytes(DEFAULTS.memoryCacheSize)),
      sizeCalculation: (b) => Math.max(1, b.length)
    })
    this.#events.setMaxListeners(64)
    const registers = components.metrics === undefined ? undefined : [components.metrics]
    if (registers !== undefined) {
      const quota = this.#quota
      const entries = this.#entries
      this.#metrics = {
        bytes: new Gauge({ name: 'damselfly_store_bytes', help: 'Bytes of verified piece data held in the cache', registers, collect () { this.set(quota.used) } }),
        blobs: new Gauge({ name: 'damselfly_store_blobs', help: 'Blobs tracked by the piece store', registers, collect () { this.set(entries.size) } }),
        evictions: new Counter({ name: 'damselfly_store_evictions_total', help: 'Blobs evicted: to stay under the cache quota (quota), the disk\'s high watermark (disk) or unused past the TTL (ttl)', labelNames: ['reason'], registers }),
        verifyFailures: new Counter({ name: 'damselfly_piece_verification_failures_total', help: 'Pieces that failed SHA-256 verification, by where the bytes came from', labelNames: ['source'], registers })
      }
    }
  }

  async start (): Promise<void> {
    if (this.#started) return
    await mkdir(this.#root, { recursive: true })
    for (const entry of await this.#meta.loadAll(this.#root)) {
      this.#entries.set(entry.digest.value, entry)
      this.#quota.reserve(heldBytes(entry))
    }
    this.#started = true
    this.#handles.start()
    this.#meta.start()
    this.#logger.info({ blobs: this.#entries.size, bytes: this.#quota.used }, 'piece store loaded')
    if (this.#quota.used > this.#quota.limit) this.#makeRoom(0, undefined)
    this.#gcTimer = setInterval(() => { void this.sweep() }, this.#gcIntervalMs).unref()
  }

  /**
   * Evicts what the disk's watermarks and the TTL call for (disk-gc.ts);
   * runs every `gcIntervalMs`, one sweep at a time.
   */
  async sweep (): Promise<void> {
    this.#sweeping ??= (async () => {
      try {
        if (!this.#started) return
        const usage = await diskUsage(this.#root)
        const { ttl, watermark } = chooseEvictions(this.#entries.values(), usage, this.#gc, Date.now())
        for (const [entries, reason, why] of [[ttl, 'ttl', 'unused past the cache TTL'], [watermark, 'disk', 'the data dir\'s file system is past its high watermark']] as const) {
          for (const entry of entries) {
            if (entry.pins > 0 || entry.removed) continue
            this.#metrics?.evictions.inc({ reason })
            this.#logger.info({ digest: entry.digest.value, bytes: heldBytes(entry), usedPercent: Math.round(100 * usage.usedBytes / usage.totalBytes) }, `evicting blob: ${why}`)
            await this.#drop(entry, 'evicted')
          }
        }
      } catch (err) {
        this.#logger.warn({ err }, 'disk check failed')
      } finally {
        this.#sweeping = undefined
      }
    })()
    await this.#sweeping
  }

  async stop (): Promise<void> {
    this.#started = false
    clearInterval(this.#gcTimer)
    await this.#sweeping
    await Promise.all(this.#writes)
    await this.#background
    await this.#meta.stop(this.#entries.values())
    this.#hot.clear()
    await this.#handles.stop(this.#entries.values())
  }

  info (digest: string): BlobInfo | undefined {
    const entry = this.#entries.get(digest)
    return entry === undefined ? undefined : snapshot(entry)
  }

  list (): BlobInfo[] {
    return [...this.#entries.values()].map(snapshot)
  }

  track (digest: string, size: number, options: { mediaType?: string | undefined } = {}): BlobInfo {
    const existing = this.#entries.get(digest)
    if (existing !== undefined) {
      if (existing.size === size) {
        if (options.mediaType !== undefined && existing.mediaType !== options.mediaType) {
          existing.mediaType = options.mediaType
          this.#meta.markDirty(existing)
        }
        return snapshot(existing)
      }
      this.#logger.warn({ digest, recorded: existing.size, size }, 'blob size contradicts the cache; dropping the cached copy')
      void this.#drop(existing, 'size-conflict')
    }
    if (!Number.isSafeInteger(size) || size < 0) throw new StorageError(`invalid size ${size} for ${digest}`)
    const parsed = parseDigest(digest)
    const pieceSize = choosePieceSize(size)
    const entry = newEntry(parsed, join(this.#root, parsed.algorithm, parsed.hex), size, pieceSize, pieceCount(size, pieceSize), options.mediaType)
    this.#entries.set(digest, entry)
    return snapshot(entry)
  }

  hasPiece (digest: string, index: number): boolean {
    return this.#entries.get(digest)?.held.has(index) ?? false
  }

  heldPieces (digest: string): number[] {
    const entry = this.#entries.get(digest)
    return entry === undefined ? [] : [...entry.held]
  }

  isTrusted (digest: string, index: number): boolean {
    const entry = this.#entries.get(digest)
    return entry !== undefined && entry.held.has(index) && (entry.verified || entry.trusted.has(index))
  }

  pieceDigest (digest: string, index: number): string | undefined {
    const entry = this.#entries.get(digest)
    return entry === undefined ? undefined : pieceDigestOf(entry, index)
  }

  async readPiece (digest: string, index: number, options: AbortOptions & { into?: Buffer } = {}): Promise<Buffer | undefined> {
    options.signal?.throwIfAborted()
    const entry = this.#entries.get(digest)
    if (entry === undefined || !entry.held.has(index)) return undefined
    this.#touch(entry)
    return this.#readVerified(entry, index, options.into)
  }

  async openVerified (digest: string, start: number, end: number): Promise<Readable | undefined> {
    const entry = this.#entries.get(digest)
    if (entry === undefined || !entry.verified || !this.#started || start > end || end >= entry.size) return undefined
    const { first, last } = piecesCovering(start, end, entry.pieceSize)
    for (let i = first; i <= last; i++) if (!entry.checked.has(i)) return undefined
    const unpin = this.pin(digest)
    let fh: FileHandle
    try {
      // A descriptor of its own: the stream closes it, and a blob removed meanwhile stays readable through it.
      fh = await open(join(entry.dir, 'data'), 'r')
    } catch (err) {
      unpin()
      this.#logger.warn({ err, digest }, 'could not open a verified blob\'s data file; reading it piece by piece')
      return undefined
    }
    this.#touch(entry)
    const stream = new PooledFileStream(fh, start, end, this.#streamBuffers)
    stream.once('close', unpin)
    return stream
  }

  async writePiece (digest: string, index: number, data: Buffer, options: WritePieceOptions = {}): Promise<boolean> {
    // stop() waits for writes under way, so nothing touches the data dir after it returns.
    const write = this.#writePiece(digest, index, data, options)
    const settled = write.then(() => {}, () => {})
    this.#writes.add(settled)
    void settled.then(() => this.#writes.delete(settled))
    return write
  }

  async verifyBlob (digest: string): Promise<boolean> {
    const entry = this.#entries.get(digest)
    if (entry === undefined) return false
    if (entry.verified) return true
    if (!entry.held.complete) return false
    await this.#hash.verify(entry)
    return entry.verified
  }

  attest (digest: string, table: string): boolean {
    const entry = this.#entries.get(digest)
    if (entry === undefined) return false
    const was = entry.verified
    if (this.#hash.attest(entry, table) && !was) this.#logger.debug({ digest }, 'a whole read vouched for the blob')
    return entry.verified
  }

  async remove (digest: string, reason: string): Promise<void> {
    const entry = this.#entries.get(digest)
    if (entry === undefined) return
    await this.#drop(entry, reason)
  }

  async keepTrusted (digest: string, reason: string): Promise<void> {
    const entry = this.#entries.get(digest)
    if (entry === undefined || entry.verified) return
    for (const i of [...entry.held]) if (!entry.trusted.has(i)) this.#dropPiece(entry, i, reason)
    if (entry.held.size === 0) await this.#drop(entry, reason)
  }

  pin (digest: string): () => void {
    const entry = this.#entries.get(digest)
    if (entry === undefined) return () => {}
    entry.pins++
    let released = false
    return () => {
      if (released) return
      released = true
      entry.pins--
      this.#verifyWhenIdle(entry)
    }
  }

  usage (): { bytes: number, quotaBytes: number, blobs: number } {
    return { bytes: this.#quota.used, quotaBytes: this.#quota.limit, blobs: this.#entries.size }
  }

  on<E extends keyof StoreEvents>(event: E, listener: StoreEvents[E]): void {
    this.#events.on(event, listener)
  }

  off<E extends keyof StoreEvents>(event: E, listener: StoreEvents[E]): void {
    this.#events.off(event, listener)
  }

  /* internals */

  async #writePiece (digest: string, index: number, data: Buffer, options: WritePieceOptions): Promise<boolean> {
    options.signal?.throwIfAborted()
    const entry = this.#entries.get(digest)
    if (entry === undefined) throw new StorageError(`blob ${digest} is not tracked`)
    if (!Number.isInteger(index) || index < 0 || index >= entry.count) throw new StorageError(`piece ${index} out of range for ${digest}`)
    const { offset, length } = pieceBounds(index, entry.size, entry.pieceSize)
    if (data.length !== length) throw new StorageError(`piece ${index} of ${digest} is ${data.length} bytes, expected ${length}`)
    const hex = options.sha256 ?? sha256Hex(data)
    const trusted = options.trusted === true || options.source === 'origin'
    if (entry.held.has(index)) {
      if (pieceDigestOf(entry, index) !== hex) {
        this.#metrics?.verifyFailures.inc({ source: options.source ?? 'origin' })
        throw new PieceDigestMismatchError(digest, index, options.source ?? 'origin')
      }
      // Held already: bytes from the origin that match it confirm it.
      if (trusted && entry.trusted.add(index)) {
        this.#meta.markDirty(entry)
        this.#events.emit('piece', digest, index, hex, options.source ?? 'origin')
      }
      return true
    }
    if (!this.#makeRoom(length, entry)) return false

    // Reserve the bytes now so concurrent writers see them in the quota.
    this.#quota.reserve(length)
    try {
      entry.fileReady ??= this.#createDataFile(entry)
      await entry.fileReady
      await this.#handles.withFile(entry, async fh => fh.write(data, 0, length, offset))
    } catch (err) {
      this.#quota.release(length)
      if (entry.removed) return false
      entry.fileReady = undefined
      throw new StorageError(`writing piece ${index} of ${digest}`, { cause: err })
    }
    if (entry.removed || entry.held.has(index)) {
      this.#quota.release(length)
      return !entry.removed
    }
    entry.held.add(index)
    entry.checked.add(index)
    if (trusted) entry.trusted.add(index)
    Buffer.from(hex, 'hex').copy(entry.digests, index * SHA256_BYTES)
    if (options.keep !== false) this.#hot.set(hotKey(entry, index), data)
    this.#touch(entry)
    this.#meta.markDirty(entry)
    this.#events.emit('piece', digest, index, hex, options.source ?? 'origin')
    this.#verifyWhenIdle(entry)
    return true
  }

  /**
   * A complete blob nobody is reading is hashed in the background, one at a
   * time: a whole read under way hashes it as it sends and vouches for it
   * (`attest`), which saves the pass.
   */
  #verifyWhenIdle (entry: Entry): void {
    if (entry.pins > 0 || entry.verified || entry.removed || !entry.held.complete || this.#queued.has(entry)) return
    this.#queued.add(entry)
    this.#background = this.#background.then(async () => {
      this.#queued.delete(entry)
      if (entry.pins > 0 || !this.#started) return
      await this.#hash.verify(entry)
    }).catch((err: unknown) => {
      this.#logger.warn({ err, digest: entry.digest.value }, 'could not check a blob\'s digest')
    })
  }

  /**
   * A held piece from memory or disk, checked once per run. Read into `into`
   * (when it is large enough) the bytes are the caller's to reuse, so they
   * are not kept in the hot-piece memory: streaming uploads and the
   * background check read through buffers of their own, and a fresh
   * megabyte per piece was garbage the collector chased at line rate.
   */
  async #readVerified (entry: Entry, index: number, into?: Buffer): Promise<Buffer | undefined> {
    const cached = this.#hot.get(hotKey(entry, index))
    if (cached !== undefined) return cached
    const { offset, length } = pieceBounds(index, entry.size, entry.pieceSize)
    const borrowed = into !== undefined && into.length >= length
    const buf = borrowed ? into.subarray(0, length) : Buffer.allocUnsafe(length)
    try {
      await this.#handles.withFile(entry, async (fh) => {
        let done = 0
        while (done < length) {
          const { bytesRead } = await fh.read(buf, done, length - done, offset + done)
          if (bytesRead === 0) break
          done += bytesRead
        }
        if (done !== length) throw new StorageError(`short read of piece ${index}`)
      })
    } catch (err) {
      if (entry.removed) return undefined
      this.#logger.warn({ digest: entry.digest.value, piece: index, err }, 'piece unreadable on disk; it will be fetched again')
      this.#dropPiece(entry, index, 'unreadable')
      return undefined
    }
    if (!entry.held.has(index)) return undefined
    if (!entry.checked.has(index)) {
      if (sha256Hex(buf) !== pieceDigestOf(entry, index)) {
        this.#metrics?.verifyFailures.inc({ source: 'local' })
        this.#logger.warn({ digest: entry.digest.value, piece: index }, 'piece on disk failed verification; it will be fetched again')
        this.#dropPiece(entry, index, 'corrupt')
        return undefined
      }
      entry.checked.add(index)
    }
    if (!borrowed) this.#hot.set(hotKey(entry, index), buf)
    return buf
  }

  #dropPiece (entry: Entry, index: number, reason: string): void {
    if (!entry.held.delete(index)) return
    entry.trusted.delete(index)
    entry.checked.delete(index)
    this.#quota.release(pieceBounds(index, entry.size, entry.pieceSize).length)
    this.#hot.delete(hotKey(entry, index))
    this.#hash.reset(entry)
    this.#meta.markDirty(entry)
    this.#events.emit('removed', entry.digest.value, reason, index)
  }

  async #drop (entry: Entry, reason: string): Promise<void> {
    if (entry.removed) return
    entry.removed = true
    if (this.#entries.get(entry.digest.value) === entry) this.#entries.delete(entry.digest.value)
    this.#meta.forget(entry)
    this.#quota.release(heldBytes(entry))
    for (const i of entry.held) this.#hot.delete(hotKey(entry, i))
    this.#handles.detach(entry)
    this.#events.emit('removed', entry.digest.value, reason)
    const previous = this.#removing.get(entry.dir) ?? Promise.resolve()
    const removal = (async () => {
      await previous
      // Let an in-flight metadata write finish first, or it could recreate the directory.
      await entry.flushing.catch(() => {})
      await this.#handles.closed()
      await rm(entry.dir, { recursive: true, force: true }).catch((err: unknown) => {
        this.#logger.warn({ err, digest: entry.digest.value }, 'could not remove blob directory')
      })
    })()
    this.#removing.set(entry.dir, removal)
    await removal
    if (this.#removing.get(entry.dir) === removal) this.#removing.delete(entry.dir)
  }

  #makeRoom (bytes: number, forEntry: Entry | undefined): boolean {
    return this.#quota.makeRoom(bytes, forEntry, this.#entries.values(), (entry) => {
      this.#metrics?.evictions.inc({ reason: 'quota' })
      this.#logger.info({ digest: entry.digest.value, bytes: heldBytes(entry) }, 'evicting blob to stay under the cache quota')
      void this.#drop(entry, 'evicted')
    })
  }

  #touch (entry: Entry): void {
    entry.usedAt = Date.now()
    // Re-inserting moves the entry to the most recently used end.
    this.#entries.delete(entry.digest.value)
    this.#entries.set(entry.digest.value, entry)
  }

  async #createDataFile (entry: Entry): Promise<void> {
    await this.#removing.get(entry.dir)
    await mkdir(entry.dir, { recursive: true })
    const fh = await open(join(entry.dir, 'data'), 'a')
    try {
      // Sparse: pieces land at their offsets in any order.
      const { size } = await fh.stat()
      if (size !== entry.size) await fh.truncate(entry.size)
    } finally {
      await fh.close()
    }
  }
}

function hotKey (entry: Entry, index: number): string {
  return `${entry.digest.hex}:${index}`
}
