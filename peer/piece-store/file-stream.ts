import type { FileHandle } from 'node:fs/promises'
import { Readable } from 'node:stream'
import { lend, type BufferPool } from '../../src/buffer-pool.ts'
import { StorageError } from '../../src/errors.ts'

/**
 * Bytes `start..end` (inclusive) of an open file, read into pooled buffers
 * that are lent down the stream: a consumer that gives a chunk back (the
 * mirror, once its socket took it) lets the next read use the same buffer.
 * A fresh chunk per read, as `createReadStream` makes, was external memory
 * the collector chased while a warm peer served a blob. The stream closes
 * the file when it ends or is destroyed.
 */
export class PooledFileStream extends Readable {
  readonly #fh: FileHandle
  readonly #pool: BufferPool
  readonly #end: number
  #position: number

  constructor (fh: FileHandle, start: number, end: number, pool: BufferPool) {
    // One chunk buffered ahead of the consumer at most.
    super({ highWaterMark: pool.size })
    this.#fh = fh
    this.#pool = pool
    this.#position = start
    this.#end = end
  }

  override _read (): void {
    const length = Math.min(this.#pool.size, this.#end - this.#position + 1)
    if (length <= 0) {
      this.push(null)
      return
    }
    const lease = this.#pool.take(length)
    this.#fh.read(lease.data, 0, length, this.#position).then(({ bytesRead }) => {
      if (bytesRead === 0) {
        lease.release()
        this.destroy(new StorageError(`the blob's file ended ${this.#end - this.#position + 1} bytes early`))
        return
      }
      this.#position += bytesRead
      const chunk = bytesRead === length ? lease.data : lease.data.subarray(0, bytesRead)
      lend(chunk, lease.release)
      this.push(chunk)
    }, (err: unknown) => {
      lease.release()
      this.destroy(err as Error)
    })
  }

  override _destroy (err: Error | null, callback: (err?: Error | null) => void): void {
    this.#fh.close().then(() => { callback(err) }, (closeErr: unknown) => { callback(err ?? closeErr as Error) })
  }
}
