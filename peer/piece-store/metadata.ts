import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Logger } from '../../src/logger.ts'
import { parseDigest, type Digest } from '../../src/oci/digest.ts'
import { PieceSet, choosePieceSize, pieceCount } from '../../src/pieces.ts'
import { SHA256_BYTES, newEntry, type Entry } from './entry.ts'

const META_VERSION = 1

/** `meta.json` beside a blob's data file. */
interface MetaFile {
  v: number
  digest: string
  size: number
  pieceSize: number
  mediaType?: string
  held: string
  /** Pieces whose SHA-256 is recorded; written as `held` now, kept for files written before. */
  known: string
  /** Held pieces known genuine; absent in metadata written before the field existed. */
  trusted?: string
  digests: string
  verified: boolean
  lastAccess: number
}

export interface MetadataInit {
  /** A changing blob's metadata is written at most this often. */
  flushDelayMs: number
  /** Directories being deleted: a write waits for the removal of the same directory. */
  removing: (dir: string) => Promise<void> | undefined
}

/**
 * What survives a restart about each blob: its size, piece table, held and
 * trusted pieces, whether it was verified whole. Written through a
 * temporary file and a rename, batched per blob; a file that cannot be read
 * back drops its blob.
 */
export class MetadataFiles {
  readonly #logger: Logger
  readonly #init: MetadataInit
  #started = false

  constructor (logger: Logger, init: MetadataInit) {
    this.#logger = logger
    this.#init = init
  }

  start (): void {
    this.#started = true
  }

  markDirty (entry: Entry): void {
    if (entry.removed) return
    entry.dirty = true
    if (entry.flushTimer !== undefined || !this.#started) return
    entry.flushTimer = setTimeout(() => {
      entry.flushTimer = undefined
      this.flush(entry).catch((err: unknown) => {
        this.#logger.warn({ err, digest: entry.digest.value }, 'could not write blob metadata')
      })
    }, this.#init.flushDelayMs)
    entry.flushTimer.unref()
  }

  /** Stops the timer of a blob being removed. */
  forget (entry: Entry): void {
    if (entry.flushTimer !== undefined) clearTimeout(entry.flushTimer)
    entry.flushTimer = undefined
  }

  async flush (entry: Entry): Promise<void> {
    const write = async (): Promise<void> => {
      if (entry.removed || !entry.dirty) return
      entry.dirty = false
      if (entry.held.size === 0) return
      await this.#init.removing(entry.dir)
      if (entry.removed) return
      const meta: MetaFile = {
        v: META_VERSION,
        digest: entry.digest.value,
        size: entry.size,
        pieceSize: entry.pieceSize,
        ...(entry.mediaType === undefined ? {} : { mediaType: entry.mediaType }),
        held: entry.held.toBase64(),
        known: entry.held.toBase64(),
        trusted: entry.trusted.toBase64(),
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

  /** Writes every dirty blob now and waits for writes under way. */
  async stop (entries: Iterable<Entry>): Promise<void> {
    const flushes: Array<Promise<void>> = []
    for (const entry of entries) {
      this.forget(entry)
      flushes.push(entry.dirty ? this.flush(entry) : entry.flushing)
    }
    await Promise.all(flushes)
    this.#started = false
  }

  /** Every blob under `root` (`<root>/<algorithm>/<hex>/meta.json`), least recently used first. */
  async loadAll (root: string): Promise<Entry[]> {
    const loaded: Array<{ entry: Entry, lastAccess: number }> = []
    for (const algorithm of await readdir(root).catch(() => [])) {
      for (const hex of await readdir(join(root, algorithm)).catch(() => [])) {
        const one = await this.#load(root, algorithm, hex)
        if (one !== undefined) loaded.push(one)
      }
    }
    return loaded.sort((a, b) => a.lastAccess - b.lastAccess).map(l => l.entry)
  }

  async #load (root: string, algorithm: string, hex: string): Promise<{ entry: Entry, lastAccess: number } | undefined> {
    const dir = join(root, algorithm, hex)
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
      const digests = Buffer.from(meta.digests, 'base64')
      if (digests.length !== count * SHA256_BYTES) throw new Error('piece table has the wrong length')
      const known = PieceSet.fromBase64(count, meta.known)
      const held = PieceSet.fromBase64(count, meta.held)
      // A piece counts as held only if its digest is recorded, so it can be verified on read.
      for (const i of held) {
        if (!known.has(i)) continue
        entry.held.add(i)
        digests.copy(entry.digests, i * SHA256_BYTES, i * SHA256_BYTES, (i + 1) * SHA256_BYTES)
      }
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
