import { IndexedHeap } from './heap.ts'

/**
 * Links as fair shares: every node has an uplink and a downlink, each split
 * evenly among the transfers using it, and a transfer moves at the smaller
 * of its two shares (what is left over by a transfer held back at its other
 * end is not handed to the others: a little pessimistic against max-min
 * fairness, and far cheaper). A rate changes only when a transfer starts or
 * ends at one of its two ends, so each start or end re-rates the transfers of
 * two nodes and moves their finish times in an indexed heap.
 */
export class Network {
  /** Bytes per millisecond. */
  readonly up: Float64Array
  readonly down: Float64Array
  /** Flows each node is sending and receiving. */
  readonly ups: number[][]
  readonly downs: number[][]
  /** Bytes each node has sent (finished and cut-off transfers both count). */
  readonly sent: Float64Array
  now = 0

  #capacity = 0
  #src = new Int32Array(0)
  #dst = new Int32Array(0)
  #remaining = new Float64Array(0)
  #bytes = new Float64Array(0)
  #rate = new Float64Array(0)
  #last = new Float64Array(0)
  #done: Array<((flow: number) => void) | undefined> = []
  readonly #free: number[] = []
  #next = 0
  readonly #heap = new IndexedHeap(0)
  /** Flows started, and rate changes made (for the report of what the simulation cost). */
  started = 0
  rerates = 0

  constructor (nodes: number, up: Float64Array, down: Float64Array) {
    this.up = up
    this.down = down
    this.ups = Array.from({ length: nodes }, () => [])
    this.downs = Array.from({ length: nodes }, () => [])
    this.sent = new Float64Array(nodes)
    this.#grow(1 << 16)
  }

  #grow (capacity: number): void {
    const copy = <T extends Int32Array | Float64Array>(old: T, make: (n: number) => T): T => {
      const a = make(capacity)
      a.set(old)
      return a
    }
    this.#src = copy(this.#src, n => new Int32Array(n))
    this.#dst = copy(this.#dst, n => new Int32Array(n))
    this.#remaining = copy(this.#remaining, n => new Float64Array(n))
    this.#bytes = copy(this.#bytes, n => new Float64Array(n))
    this.#rate = copy(this.#rate, n => new Float64Array(n))
    this.#last = copy(this.#last, n => new Float64Array(n))
    this.#heap.grow(capacity)
    this.#capacity = capacity
  }

  /** Starts moving `bytes` from `src` to `dst`; `done` runs when the last byte has left `src`. */
  start (src: number, dst: number, bytes: number, done: (flow: number) => void): number {
    let f = this.#free.pop()
    if (f === undefined) {
      if (this.#next === this.#capacity) this.#grow(this.#capacity * 2)
      f = this.#next++
    }
    this.#src[f] = src
    this.#dst[f] = dst
    this.#remaining[f] = bytes
    this.#bytes[f] = bytes
    this.#rate[f] = 0
    this.#last[f] = this.now
    this.#done[f] = done
    this.started++
    ;(this.ups[src] as number[]).push(f)
    ;(this.downs[dst] as number[]).push(f)
    this.#rerate(this.ups[src] as number[])
    this.#rerate(this.downs[dst] as number[])
    return f
  }

  /** Stops a flow before its end; returns the bytes it had moved. */
  cancel (f: number): number {
    if (this.#done[f] === undefined) return 0
    this.#settle(f)
    const moved = (this.#bytes[f] as number) - Math.max(0, this.#remaining[f] as number)
    const src = this.#src[f] as number
    this.sent[src] = (this.sent[src] as number) + moved
    this.#heap.remove(f)
    this.#detach(f)
    return moved
  }

  /** When the next flow finishes (Infinity when none is moving). */
  nextAt (): number {
    return this.#heap.peekKey()
  }

  /** Finishes the flow due first; `now` must already be its time. */
  finishNext (): void {
    const f = this.#heap.peekId()
    if (f < 0) return
    this.#heap.remove(f)
    const src = this.#src[f] as number
    this.sent[src] = (this.sent[src] as number) + (this.#bytes[f] as number)
    const done = this.#done[f] as (flow: number) => void
    this.#detach(f)
    done(f)
  }

  /** Bytes per millisecond the flow moves now. */
  rateOf (f: number): number {
    return this.#rate[f] as number
  }

  #detach (f: number): void {
    const src = this.#src[f] as number
    const dst = this.#dst[f] as number
    remove(this.ups[src] as number[], f)
    remove(this.downs[dst] as number[], f)
    this.#done[f] = undefined
    this.#free.push(f)
    this.#rerate(this.ups[src] as number[])
    this.#rerate(this.downs[dst] as number[])
  }

  #settle (f: number): void {
    const now = this.now
    this.#remaining[f] = (this.#remaining[f] as number) - (this.#rate[f] as number) * (now - (this.#last[f] as number))
    this.#last[f] = now
  }

  #rerate (flows: number[]): void {
    for (const f of flows) {
      const src = this.#src[f] as number
      const dst = this.#dst[f] as number
      const rate = Math.min((this.up[src] as number) / (this.ups[src] as number[]).length, (this.down[dst] as number) / (this.downs[dst] as number[]).length)
      if (rate === this.#rate[f]) continue
      this.#settle(f)
      this.#rate[f] = rate
      this.rerates++
      this.#heap.set(f, this.now + Math.max(0, this.#remaining[f] as number) / rate)
    }
  }
}

function remove (list: number[], f: number): void {
  const i = list.indexOf(f)
  if (i === -1) return
  list[i] = list[list.length - 1] as number
  list.pop()
}
