import { createHash, type Hash } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { mkdir, open, readdir, readFile, rename, rm, writeFile, type FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import { LRUCache } from 'lru-cache'
import type { AbortOptions } from '../../src/abort.ts'
import { BlobDigestMismatchError, PieceDigestMismatchError, StorageError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, Gauge } from '../../src/metrics.ts'
import { parseDigest, sha256Hex, type Digest } from '../../src/oci/digest.ts'
import { PieceSet, choosePieceSize, pieceBounds, pieceCount } from '../../src/pieces.ts'
import type { BlobInfo, PieceStore, PieceStoreComponents, PieceStoreInit, StoreEvents, WritePieceOptions } from './index.ts'

const GIB = 1024 ** 3
const DEFAULT_QUOTA = 10 * GIB
const DEFAULT_MEMORY_CACHE = 32 * 1024 * 1024
const DEFAULT_FLUSH_DELAY_MS = 250
const META_VERSION = 1
const SHA256_BYTES = 32
/** A blob's data file stays open this long after its last read or write. */
const HANDLE_IDLE_MS = 5_000
/** Beyond this many open data files, reads and writes open and close their own. */
const MAX_OPEN_HANDLES = 256

/** One open descriptor of a blob's data file, shared by the reads and writes under way. */
interface SharedHandle {
  readonly fh: Promise<FileHandle>
  users: number
  idle: NodeJS.Timeout | undefined
}

interface MetaFile {
  v: number
  digest: string
  size: number
  pieceSize: number
  mediaType?: string
  held: string
  known: string
  /** Held pieces known genuine; absent in metadata written before the field existed. */
  trusted?: string
  digests: string
  verified: boolean
  lastAccess: number
}

interface Entry {
  readonly digest: Digest
  readonly dir: string
  readonly size: number
  readonly pieceSize: number
  readonly count: number
  mediaType: string | undefined
  readonly held: PieceSet
  /** Held pieces known genuine: from the origin, matched to a confirmed entry, or in a verified blob. */
  readonly trusted: PieceSet
  /** Pieces whose SHA-256 we know (held ones, and ones the swarm's piece table told us). */
  readonly known: PieceSet
  /** count × 32 bytes of piece SHA-256s; meaningful where `known` is set. */
  readonly digests: Buffer
  verified: boolean
  pins: number
  removed: boolean
  fileReady: Promise<void> | undefined
  handle: SharedHandle | undefined
  flushTimer: NodeJS.Timeout | undefined
  flushing: Promise<void>
  dirty: boolean
  /** Whole-blob hash over the contiguous prefix of pieces [0, hashedUpTo). */
  hasher: Hash | undefined
  hashedUpTo: number
  hashChain: Promise<void>
  mismatch: string | undefined
}

/**
 * Pieces live in one sparse file per blob, written at their offsets, beside a
 * JSON metadata file: `<dataDir>/blobs/<algorithm>/<hex>/{data,meta.json}`.
 * Paths are built only from validated digests, never from request input.
 *
 * Integrity: a piece's SHA-256 is recorded when it is written and checked
 * again on every read from disk, so bit rot or a tampered file is caught and
 * re-fetched rather than served. The whole blob is hashed incrementally over
 * its contiguous prefix as pieces land, so an in-order download learns whether
 * the blob matches its digest the moment the last piece is written, before
 * that piece is handed to anyone.
 */
export class DiskPieceStore implements PieceStore {
  readonly #logger: Logger
  readonly #root: string
  readonly #quota: number
  readonly #flushDelay: number
  /** Insertion order is recency order: the first entry is the least recently used. */
  readonly #entries = new Map<string, Entry>()
  readonly #hot: LRUCache<string, Buffer>
  readonly #writes = new Set<Promise<void>>()
  readonly #closing = new Set<Promise<void>>()
  #openHandles = 0
  readonly #events = new EventEmitter()
  /** Directories being deleted; a blob tracked again under the same digest waits for them. */
  readonly #removing = new Map<string, Promise<void>>()
  #used = 0
  #started = false

  readonly #metrics: {
    bytes: Gauge
    blobs: Gauge
    evictions: Counter
    verifyFailures: Counter
  } | undefined

  constructor (components: PieceStoreComponents, init: PieceStoreInit) {
    this.#logger = components.logger.child({ component: 'peer:piece-store' })
    this.#root = join(init.dataDir, 'blobs')
    this.#quota = init.quotaBytes ?? DEFAULT_QUOTA
    this.#flushDelay = init.flushDelayMs ?? DEFAULT_FLUSH_DELAY_MS
    this.#hot = new LRUCache<string, Buffer>({
      maxSize: Math.max(1, init.memoryCacheBytes ?? DEFAULT_MEMORY_CACHE),
      sizeCalculation: (b) => Math.max(1, b.length)
    })
    this.#events.setMaxListeners(64)
    const registers = components.metrics === undefined ? undefined : [components.metrics]
    if (registers !== undefined) {
      const used = (): number => this.#used
      const count = (): number => this.#entries.size
      this.#metrics = {
        bytes: new Gauge({ name: 'damselfly_store_bytes', help: 'Bytes of verified piece data held in the cache', registers, collect () { this.set(used()) } }),
        blobs: new Gauge({ name: 'damselfly_store_blobs', help: 'Blobs tracked by the piece store', registers, collect () { this.set(count()) } }),
        evictions: new Counter({ name: 'damselfly_store_evictions_total', help: 'Blobs evicted to stay under the cache quota', registers }),
        verifyFailures: new Counter({ name: 'damselfly_piece_verification_failures_total', help: 'Pieces that failed SHA-256 verification, by where the bytes came from', labelNames: ['source'], registers })
      }
    }
  }

  async start (): Promise<void> {
    if (this.#started) return
    await mkdir(this.#root, { recursive: true })
    const loaded: Array<{ entry: Entry, lastAccess: number }> = []
    for (const algorithm of await readdir(this.#root).catch(() => [])) {
      const algDir = join(this.#root, algorithm)
      for (const hex of await readdir(algDir).catch(() => [])) {
        const entry = await this.#load(algorithm, hex)
        if (entry !== undefined) loaded.push(entry)
      }
    }
    loaded.sort((a, b) => a.lastAccess - b.lastAccess)
    for (const { entry } of loaded) {
      this.#entries.set(entry.digest.value, entry)
      this.#used += this.#heldBytes(entry)
    }
    this.#started = true
    this.#logger.info({ blobs: this.#entries.size, bytes: this.#used }, 'piece store loaded')
    if (this.#used > this.#quota) this.#makeRoom(0, undefined)
  }

  async stop (): Promise<void> {
    await Promise.all(this.#writes)
    const flushes: Array<Promise<void>> = []
    for (const entry of this.#entries.values()) {
      if (entry.flushTimer !== undefined) clearTimeout(entry.flushTimer)
      entry.flushTimer = undefined
      if (entry.dirty) flushes.push(this.#flush(entry))
      else flushes.push(entry.flushing)
    }
    await Promise.all(flushes)
    this.#hot.clear()
    this.#started = false
    for (const entry of this.#entries.values()) if (entry.handle !== undefined) this.#release(entry, entry.handle, true)
    await Promise.all(this.#closing)
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
          this.#markDirty(existing)
        }
        return snapshot(existing)
      }
      this.#logger.warn({ digest, recorded: existing.size, size }, 'blob size contradicts the cache; dropping the cached copy')
      void this.#drop(existing, 'size-conflict')
    }
    if (!Number.isSafeInteger(size) || size < 0) throw new StorageError(`invalid size ${size} for ${digest}`)
    const parsed = parseDigest(digest)
    const pieceSize = choosePieceSize(size)
    const count = pieceCount(size, pieceSize)
    const entry = newEntry(parsed, join(this.#root, parsed.algorithm, parsed.hex), size, pieceSize, count, options.mediaType)
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
    if (entry === undefined || !entry.known.has(index)) return undefined
    return entry.digests.subarray(index * SHA256_BYTES, (index + 1) * SHA256_BYTES).toString('hex')
  }

  tableHash (digest: string): string | undefined {
    const entry = this.#entries.get(digest)
    if (entry === undefined || !entry.known.complete) return undefined
    return createHash('sha256').update(entry.digests).digest('hex')
  }

  setPieceDigests (digest: string, digests: ReadonlyArray<[number, string]>): void {
    const entry = this.#entries.get(digest)
    if (entry === undefined) return
    for (const [index, hex] of digests) {
      if (index < 0 || index >= entry.count || !/^[0-9a-f]{64}$/.test(hex)) continue
      if (entry.known.has(index)) {
        if (this.pieceDigest(digest, index) === hex) continue
        // The swarm's table disagrees with ours; the table wins (it is checked
        // against the whole digest), and our copy of the piece cannot be trusted.
        if (entry.held.has(index)) this.#dropPiece(entry, index, 'piece-table-conflict')
      }
      Buffer.from(hex, 'hex').copy(entry.digests, index * SHA256_BYTES)
      entry.known.add(index)
      this.#markDirty(entry)
    }
  }

  async readPiece (digest: string, index: number, options: AbortOptions = {}): Promise<Buffer | undefined> {
    options.signal?.throwIfAborted()
    const entry = this.#entries.get(digest)
    if (entry === undefined || !entry.held.has(index)) return undefined
    this.#touch(entry)
    return this.#readVerified(entry, index)
  }

  async writePiece (digest: string, index: number, data: Buffer, options: WritePieceOptions = {}): Promise<boolean> {
    // stop() waits for writes under way, so nothing touches the data dir after it returns.
    const write = this.#writePiece(digest, index, data, options)
    const settled = write.then(() => {}, () => {})
    this.#writes.add(settled)
    void settled.then(() => this.#writes.delete(settled))
    return write
  }

  async #writePiece (digest: string, index: number, data: Buffer, options: WritePieceOptions): Promise<boolean> {
    options.signal?.throwIfAborted()
    const entry = this.#entries.get(digest)
    if (entry === undefined) throw new StorageError(`blob ${digest} is not tracked`)
    if (!Number.isInteger(index) || index < 0 || index >= entry.count) throw new StorageError(`piece ${index} out of range for ${digest}`)
    const { offset, length } = pieceBounds(index, entry.size, entry.pieceSize)
    if (data.length !== length) throw new StorageError(`piece ${index} of ${digest} is ${data.length} bytes, expected ${length}`)
    const hex = options.sha256 ?? sha256Hex(data)
    if (entry.known.has(index) && this.pieceDigest(digest, index) !== hex) {
      this.#metrics?.verifyFailures.inc({ source: options.source ?? 'origin' })
      throw new PieceDigestMismatchError(digest, index, options.source ?? 'origin')
    }
    const trusted = options.trusted === true || options.source === 'origin'
    if (entry.held.has(index)) {
      // Held already: bytes from the origin that match it confirm it.
      if (trusted && entry.trusted.add(index)) {
        this.#markDirty(entry)
        this.#events.emit('piece', digest, index, hex, options.source ?? 'origin')
      }
      return true
    }
    if (!this.#makeRoom(length, entry)) return false

    // Reserve the bytes now so concurrent writers see them in the quota.
    this.#used += length
    try {
      entry.fileReady ??= this.#createDataFile(entry)
      await entry.fileReady
      await this.#withFile(entry, async fh => fh.write(data, 0, length, offset))
    } catch (err) {
      this.#used -= length
      if (entry.removed) return false
      entry.fileReady = undefined
      throw new StorageError(`writing piece ${index} of ${digest}`, { cause: err })
    }
    if (entry.removed || entry.held.has(index)) {
      this.#used -= length
      return !entry.removed
    }
    entry.held.add(index)
    if (trusted) entry.trusted.add(index)
    Buffer.from(hex, 'hex').copy(entry.digests, index * SHA256_BYTES)
    entry.known.add(index)
    this.#hot.set(hotKey(entry, index), data)
    this.#touch(entry)
    this.#markDirty(entry)
    this.#events.emit('piece', digest, index, hex, options.source ?? 'origin')

    await this.#advanceHash(entry, index, data)
    if (entry.mismatch !== undefined) throw new BlobDigestMismatchError(digest, entry.mismatch)
    return true
  }

  async verifyBlob (digest: string): Promise<boolean> {
    const entry = this.#entries.get(digest)
    if (entry === undefined) return false
    if (entry.verified) return true
    if (!entry.held.complete) return false
    await this.#advanceHash(entry, -1, undefined)
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
    for (const i of [...entry.known]) {
      if (entry.held.has(i)) continue
      entry.known.delete(i)
      entry.digests.fill(0, i * SHA256_BYTES, (i + 1) * SHA256_BYTES)
    }
    this.#markDirty(entry)
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
    }
  }

  usage (): { bytes: number, quotaBytes: number, blobs: number } {
    return { bytes: this.#used, quotaBytes: this.#quota, blobs: this.#entries.size }
  }

  on<E extends keyof StoreEvents>(event: E, listener: StoreEvents[E]): void {
    this.#events.on(event, listener)
  }

  off<E extends keyof StoreEvents>(event: E, listener: StoreEvents[E]): void {
    this.#events.off(event, listener)
  }

  /* internals */

  async #readVerified (entry: Entry, index: number): Promise<Buffer | undefined> {
    const cached = this.#hot.get(hotKey(entry, index))
    if (cached !== undefined) return cached
    const { offset, length } = pieceBounds(index, entry.size, entry.pieceSize)
    const buf = Buffer.allocUnsafe(length)
    try {
      await this.#withFile(entry, async (fh) => {
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
    if (sha256Hex(buf) !== this.pieceDigest(entry.digest.value, index)) {
      this.#metrics?.verifyFailures.inc({ source: 'local' })
      this.#logger.warn({ digest: entry.digest.value, piece: index }, 'piece on disk failed verification; it will be fetched again')
      this.#dropPiece(entry, index, 'corrupt')
      return undefined
    }
    this.#hot.set(hotKey(entry, index), buf)
    return buf
  }

  /**
   * Runs `fn` with the blob's data file open. Opening and closing it around
   * every piece cost two trips through libuv's thread pool each time, which
   * is what range reads queued behind; the descriptor is kept while reads and
   * writes continue and closed when idle, on removal, or on any error (the
   * next use opens the file afresh).
   */
  async #withFile<T> (entry: Entry, fn: (fh: FileHandle) => Promise<T>): Promise<T> {
    let h = entry.handle
    if (h === undefined && this.#openHandles >= MAX_OPEN_HANDLES) {
      const fh = await open(join(entry.dir, 'data'), 'r+')
      try {
        return await fn(fh)
      } finally {
        await fh.close()
      }
    }
    if (h === undefined) {
      const fh = open(join(entry.dir, 'data'), 'r+')
      const opened: SharedHandle = { fh, users: 0, idle: undefined }
      h = opened
      entry.handle = h
      this.#openHandles++
      fh.catch(() => { this.#release(entry, opened, true) })
    }
    if (h.idle !== undefined) clearTimeout(h.idle)
    h.idle = undefined
    h.users++
    let failed = false
    try {
      return await fn(await h.fh)
    } catch (err) {
      failed = true
      throw err
    } finally {
      h.users--
      this.#release(entry, h, failed)
    }
  }

  /**
   * Called as each use of a handle ends, and to retire one. A handle is
   * detached from its blob (the next use opens the file afresh) when `detach`
   * says so, the blob is gone or the store stopped; it is closed once its
   * last user is done, or after HANDLE_IDLE_MS if it stays attached.
   */
  #release (entry: Entry, h: SharedHandle, detach: boolean): void {
    if (entry.handle === h && (detach || entry.removed || !this.#started)) {
      entry.handle = undefined
      this.#openHandles--
    }
    if (h.users > 0) return
    if (entry.handle === h) {
      h.idle ??= setTimeout(() => { this.#release(entry, h, true) }, HANDLE_IDLE_MS).unref()
      return
    }
    if (h.idle !== undefined) clearTimeout(h.idle)
    h.idle = undefined
    const closing = h.fh.then(async fh => fh.close()).catch(() => {})
    this.#closing.add(closing)
    void closing.then(() => this.#closing.delete(closing))
  }

  /**
   * Feeds the whole-blob hash with every piece of the contiguous prefix that is
   * now held. Steps run one at a time per blob; `justWritten` saves a disk read
   * for the piece that was just written.
   */
  async #advanceHash (entry: Entry, justIndex: number, justWritten: Buffer | undefined): Promise<void> {
    const step = async (): Promise<void> => {
      while (!entry.removed && !entry.verified && entry.hashedUpTo < entry.count && entry.held.has(entry.hashedUpTo)) {
        const i = entry.hashedUpTo
        const buf = i === justIndex && justWritten !== undefined ? justWritten : await this.#readVerified(entry, i)
        if (buf === undefined || entry.hashedUpTo !== i) return
        entry.hasher ??= createHash(entry.digest.algorithm)
        entry.hasher.update(buf)
        entry.hashedUpTo++
      }
      if (entry.removed || entry.verified || entry.hashedUpTo < entry.count || entry.hasher === undefined) {
        if (entry.count === 0 && !entry.verified) this.#finishHash(entry, createHash(entry.digest.algorithm).digest('hex'))
        return
      }
      this.#finishHash(entry, entry.hasher.digest('hex'))
    }
    entry.hashChain = entry.hashChain.then(step, step)
    await entry.hashChain
  }

  #finishHash (entry: Entry, actualHex: string): void {
    entry.hasher = undefined
    if (actualHex === entry.digest.hex) {
      entry.verified = true
      for (const i of entry.held) entry.trusted.add(i)
      this.#markDirty(entry)
      this.#events.emit('verified', entry.digest.value)
      return
    }
    const actual = `${entry.digest.algorithm}:${actualHex}`
    entry.mismatch = actual
    this.#events.emit('mismatch', entry.digest.value, createHash('sha256').update(entry.digests).digest('hex'))
    this.#metrics?.verifyFailures.inc({ source: 'blob' })
    this.#logger.error({ digest: entry.digest.value, actual }, 'blob does not match its digest; removing it')
    void this.#drop(entry, 'digest-mismatch')
  }

  #dropPiece (entry: Entry, index: number, reason: string): void {
    if (!entry.held.delete(index)) return
    entry.trusted.delete(index)
    this.#used -= pieceBounds(index, entry.size, entry.pieceSize).length
    this.#hot.delete(hotKey(entry, index))
    entry.verified = false
    entry.hasher = undefined
    entry.hashedUpTo = 0
    this.#markDirty(entry)
    this.#events.emit('removed', entry.digest.value, reason, index)
  }

  async #drop (entry: Entry, reason: string): Promise<void> {
    if (entry.removed) return
    entry.removed = true
    if (this.#entries.get(entry.digest.value) === entry) this.#entries.delete(entry.digest.value)
    if (entry.flushTimer !== undefined) clearTimeout(entry.flushTimer)
    this.#used -= this.#heldBytes(entry)
    for (const i of entry.held) this.#hot.delete(hotKey(entry, i))
    if (entry.handle !== undefined) this.#release(entry, entry.handle, true)
    this.#events.emit('removed', entry.digest.value, reason)
    const previous = this.#removing.get(entry.dir) ?? Promise.resolve()
    const removal = (async () => {
      await previous
      // Let an in-flight metadata write finish first, or it could recreate the directory.
      await entry.flushing.catch(() => {})
      await Promise.all(this.#closing)
      await rm(entry.dir, { recursive: true, force: true }).catch((err: unknown) => {
        this.#logger.warn({ err, digest: entry.digest.value }, 'could not remove blob directory')
      })
    })()
    this.#removing.set(entry.dir, removal)
    await removal
    if (this.#removing.get(entry.dir) === removal) this.#removing.delete(entry.dir)
  }

  /** Evicts least recently used, unpinned blobs until `bytes` more fit. */
  #makeRoom (bytes: number, forEntry: Entry | undefined): boolean {
    if (this.#used + bytes <= this.#quota) return true
    for (const entry of [...this.#entries.values()]) {
      if (this.#used + bytes <= this.#quota) break
      if (entry === forEntry || entry.pins > 0 || entry.held.size === 0) continue
      this.#metrics?.evictions.inc()
      this.#logger.info({ digest: entry.digest.value, bytes: this.#heldBytes(entry) }, 'evicting blob to stay under the cache quota')
      void this.#drop(entry, 'evicted')
    }
    return this.#used + bytes <= this.#quota
  }

  #touch (entry: Entry): void {
    // Re-inserting moves the entry to the most recently used end.
    this.#entries.delete(entry.digest.value)
    this.#entries.set(entry.digest.value, entry)
  }

  #heldBytes (entry: Entry): number {
    if (entry.held.complete) return entry.size
    let bytes = 0
    for (const i of entry.held) bytes += pieceBounds(i, entry.size, entry.pieceSize).length
    return bytes
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

  #markDirty (entry: Entry): void {
    if (entry.removed) return
    entry.dirty = true
    if (entry.flushTimer !== undefined || !this.#started) return
    entry.flushTimer = setTimeout(() => {
      entry.flushTimer = undefined
      this.#flush(entry).catch((err: unknown) => {
        this.#logger.warn({ err, digest: entry.digest.value }, 'could not write blob metadata')
      })
    }, this.#flushDelay)
    entry.flushTimer.unref()
  }

  async #flush (entry: Entry): Promise<void> {
    const write = async (): Promise<void> => {
      if (entry.removed || !entry.dirty) return
      entry.dirty = false
      if (entry.held.size === 0 && entry.known.size === 0) return
      await this.#removing.get(entry.dir)
      if (entry.removed) return
      const meta: MetaFile = {
        v: META_VERSION,
        digest: entry.digest.value,
        size: entry.size,
        pieceSize: entry.pieceSize,
        ...(entry.mediaType === undefined ? {} : { mediaType: entry.mediaType }),
        held: entry.held.toBase64(),
        trusted: entry.trusted.toBase64(),
        known: entry.known.toBase64(),
        digests: entry.digests.toString('base64'),
        verified: entry.verified,
        lastAccess: Date.now()
      }
      await mkdir(entry.dir, { recursive: true })
      const tmp = join(entry.dir, 'meta.json.tmp')
      await writeFile(tmp, JSON.stringify(meta))
      if (entry.removed) return
      await rename(tmp, join(entry.dir, 'meta.json'))
    }
    entry.flushing = entry.flushing.then(write, write)
    await entry.flushing
  }

  async #load (algorithm: string, hex: string): Promise<{ entry: Entry, lastAccess: number } | undefined> {
    const dir = join(this.#root, algorithm, hex)
    let digest: Digest
    try {
      digest = parseDigest(`${algorithm}:${hex}`)
    } catch {
      this.#logger.warn({ dir }, 'ignoring a directory that is not a digest')
      return undefined
    }
    try {
      const meta = JSON.parse(await readFile(join(dir, 'meta.json'), 'utf8')) as MetaFile
      if (meta.v !== META_VERSION || meta.digest !== digest.value || !Number.isSafeInteger(meta.size) || meta.size < 0) throw new Error('metadata does not describe this blob')
      const pieceSize = choosePieceSize(meta.size)
      if (meta.pieceSize !== pieceSize) throw new Error('piece size rule changed')
      const count = pieceCount(meta.size, pieceSize)
      const entry = newEntry(digest, dir, meta.size, pieceSize, count, meta.mediaType)
      const held = PieceSet.fromBase64(count, meta.held)
      const known = PieceSet.fromBase64(count, meta.known)
      const digests = Buffer.from(meta.digests, 'base64')
      if (digests.length !== count * SHA256_BYTES) throw new Error('piece table has the wrong length')
      digests.copy(entry.digests)
      for (const i of known) entry.known.add(i)
      // A piece counts as held only if its digest is known, so it can be verified on read.
      for (const i of held) if (entry.known.has(i)) entry.held.add(i)
      entry.verified = meta.verified && entry.held.complete
      const trusted = meta.trusted === undefined ? new PieceSet(count) : PieceSet.fromBase64(count, meta.trusted)
      for (const i of entry.held) if (entry.verified || trusted.has(i)) entry.trusted.add(i)
      entry.fileReady = entry.held.size > 0 ? Promise.resolve() : undefined
      return { entry, lastAccess: Number(meta.lastAccess) || 0 }
    } catch (err) {
      this.#logger.warn({ dir, err }, 'dropping a cached blob with unreadable metadata')
      await rm(dir, { recursive: true, force: true }).catch(() => {})
      return undefined
    }
  }
}

function newEntry (digest: Digest, dir: string, size: number, pieceSize: number, count: number, mediaType: string | undefined): Entry {
  return {
    digest,
    dir,
    size,
    pieceSize,
    count,
    mediaType,
    held: new PieceSet(count),
    trusted: new PieceSet(count),
    known: new PieceSet(count),
    digests: Buffer.alloc(count * SHA256_BYTES),
    verified: false,
    pins: 0,
    removed: false,
    fileReady: undefined,
    handle: undefined,
    flushTimer: undefined,
    flushing: Promise.resolve(),
    dirty: false,
    hasher: undefined,
    hashedUpTo: 0,
    hashChain: Promise.resolve(),
    mismatch: undefined
  }
}

function snapshot (entry: Entry): BlobInfo {
  return {
    digest: entry.digest.value,
    size: entry.size,
    pieceSize: entry.pieceSize,
    pieceCount: entry.count,
    mediaType: entry.mediaType,
    heldCount: entry.held.size,
    complete: entry.held.complete,
    verified: entry.verified
  }
}

function hotKey (entry: Entry, index: number): string {
  return `${entry.digest.hex}:${index}`
}
