import { open, type FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import type { Entry, SharedHandle } from './entry.ts'

/** A blob's data file stays open this long after its last read or write. */
const HANDLE_IDLE_MS = 5_000
/** Beyond this many open data files, reads and writes open and close their own. */
const MAX_OPEN_HANDLES = 256

/**
 * Shared descriptors of blobs' data files. Opening and closing a file around
 * every piece cost two trips through libuv's thread pool each time, which is
 * what range reads queued behind; a descriptor is kept while reads and writes
 * continue and closed when idle, on removal, or on any error (the next use
 * opens the file afresh).
 */
export class FileHandles {
  readonly #closing = new Set<Promise<void>>()
  #open = 0
  #stopped = false

  /** Runs `fn` with the blob's data file open. */
  async withFile<T> (entry: Entry, fn: (fh: FileHandle) => Promise<T>): Promise<T> {
    let h = entry.handle
    if (h === undefined && this.#open >= MAX_OPEN_HANDLES) {
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
      this.#open++
      fh.catch(() => { this.release(entry, opened, true) })
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
      this.release(entry, h, failed)
    }
  }

  /**
   * Called as each use of a handle ends, and to retire one. A handle is
   * detached from its blob (the next use opens the file afresh) when `detach`
   * says so, the blob is gone or the store stopped; it is closed once its
   * last user is done, or after HANDLE_IDLE_MS if it stays attached.
   */
  release (entry: Entry, h: SharedHandle, detach: boolean): void {
    if (entry.handle === h && (detach || entry.removed || this.#stopped)) {
      entry.handle = undefined
      this.#open--
    }
    if (h.users > 0) return
    if (entry.handle === h) {
      h.idle ??= setTimeout(() => { this.release(entry, h, true) }, HANDLE_IDLE_MS).unref()
      return
    }
    if (h.idle !== undefined) clearTimeout(h.idle)
    h.idle = undefined
    const closing = h.fh.then(async fh => fh.close()).catch(() => {})
    this.#closing.add(closing)
    void closing.then(() => this.#closing.delete(closing))
  }

  /** Retires a blob's handle (it is being removed). */
  detach (entry: Entry): void {
    if (entry.handle !== undefined) this.release(entry, entry.handle, true)
  }

  /** Resolves once every handle being closed is closed. */
  async closed (): Promise<void> {
    await Promise.all(this.#closing)
  }

  /** Retires every handle of `entries` and waits for them to close. */
  async stop (entries: Iterable<Entry>): Promise<void> {
    this.#stopped = true
    for (const entry of entries) this.detach(entry)
    await this.closed()
  }

  start (): void {
    this.#stopped = false
  }
}
