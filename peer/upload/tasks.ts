import { raceSignal } from '../../src/abort.ts'
import type { BlobTask } from '../blobs/index.ts'

/**
 * Tasks this node serves other peers for before it has opened them itself:
 * the scheduler may name a seed as a blob's first fetcher, and children ask
 * it for pieces, before the command to take the blob has arrived. A seed
 * claims the blob at once; requests for it then wait (bounded) until the
 * task, with what is needed to fetch it, is adopted.
 */
export class TaskRegistry {
  readonly #claims = new Map<string, number>()
  readonly #tasks = new Map<string, BlobTask>()
  readonly #waiters = new Map<string, Set<() => void>>()
  readonly #maxWaiting: number

  constructor (init: { maxWaiting?: number } = {}) {
    this.#maxWaiting = init.maxWaiting ?? 4096
  }

  /** This node will fetch the whole blob: its pieces are this node's to get. Call the result when done. */
  claim (digest: string): () => void {
    this.#claims.set(digest, (this.#claims.get(digest) ?? 0) + 1)
    let released = false
    return () => {
      if (released) return
      released = true
      const left = (this.#claims.get(digest) ?? 1) - 1
      if (left > 0) this.#claims.set(digest, left)
      else {
        this.#claims.delete(digest)
        this.#tasks.delete(digest)
      }
    }
  }

  claimed (digest: string): boolean {
    return this.#claims.has(digest)
  }

  /** The claimed task is known now: requests waiting for it go on. */
  adopt (task: BlobTask): void {
    if (!this.#claims.has(task.digest)) return
    this.#tasks.set(task.digest, task)
    const waiting = this.#waiters.get(task.digest)
    this.#waiters.delete(task.digest)
    for (const wake of waiting ?? []) wake()
  }

  get (digest: string): BlobTask | undefined {
    return this.#tasks.get(digest)
  }

  /** Waits (bounded by `signal`) for a claimed task to be adopted. */
  async adopted (digest: string, signal: AbortSignal): Promise<BlobTask | undefined> {
    const known = this.#tasks.get(digest)
    if (known !== undefined || !this.#claims.has(digest)) return known
    let set = this.#waiters.get(digest)
    if (set === undefined) {
      if (this.#waiters.size >= this.#maxWaiting) return undefined
      set = new Set()
      this.#waiters.set(digest, set)
    }
    const { promise, resolve } = Promise.withResolvers<void>()
    set.add(resolve)
    try {
      await raceSignal(promise, signal)
    } catch {
      return undefined
    } finally {
      set.delete(resolve)
      if (set.size === 0 && this.#waiters.get(digest) === set) this.#waiters.delete(digest)
    }
    return this.#tasks.get(digest)
  }
}
