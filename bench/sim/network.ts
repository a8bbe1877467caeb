import { IndexedHeap } from './heap.ts'

/**
 * Links as fair shares: every node has an uplink and a downlink, each split
 * evenly among the transfers using it, and a transfer moves at the smaller
 * of its two shares (what is left over by a transfer held back at its other
 * end is not handed to the others: a little pessimistic against max-min
 * fairness, and far cheaper). A rate changes only when a transfer starts or
 * ends at one of its two ends, so each start or end re-rates the transfers of
 * two nodes and moves their finish times in an indexed heap. With `maxMin`,
 * rates are max-min fair instead (see `#waterFill`), recomputed over the
 * whole network once per instant at which any transfer started or ended: the
 * check that a figure is not an artefact of the cheaper model.
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
  readonly #maxMin: boolean
  #dirty = false
  #fixed = new Uint8Array(0)
  #filled = new Float64Array(0)
  /** Per link (uplinks, then downlinks): capacity not yet handed out, flows without a rate, and the links by even share. */
  readonly #cap: Float64Array
  readonly #left: Int32Array
  readonly #shares: IndexedHeap

  /** `maxMin`: rates by progressive filling over all links (exact; about 2.5× the simulation time at N = 200) instead of even shares. */
  constructor (nodes: number, up: Float64Array, down: Float64Array, maxMin = false) {
    this.#maxMin = maxMin
    this.#cap = new Float64Array(maxMin ? 2 * nodes : 0)
    this.#left = new Int32Array(maxMin ? 2 * nodes : 0)
    this.#shares = new IndexedHeap(maxMin ? 2 * nodes : 0)
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
    if (this.#dirty) this.#waterFill()
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

  /**
   * Max-min fair rates over every link (progressive filling): the link whose
   * even share is smallest fixes its flows at that share, which is taken off
   * their other ends, until every flow has a rate. What TCP flows sharing
   * links tend to, and what the simpler model leaves unused.
   */
  #waterFill (): void {
    this.#dirty = false
    const n = this.ups.length
    const cap = this.#cap
    const left = this.#left
    const heap = this.#shares
    for (let i = 0; i < n; i++) {
      cap[i] = this.up[i] as number
      left[i] = (this.ups[i] as number[]).length
      cap[n + i] = this.down[i] as number
      left[n + i] = (this.downs[i] as number[]).length
    }
    for (let r = 0; r < 2 * n; r++) if ((left[r] as number) > 0) heap.set(r, (cap[r] as number) / (left[r] as number))
    if (this.#fixed.length < this.#capacity) {
      this.#fixed = new Uint8Array(this.#capacity)
      this.#filled = new Float64Array(this.#capacity)
    }
    const fixed = this.#fixed
    const rates = this.#filled
    while (heap.size > 0) {
      const share = heap.peekKey()
      const r = heap.peekId()
      heap.remove(r)
      const flows = r < n ? this.ups[r] as number[] : this.downs[r - n] as number[]
      for (const f of flows) {
        if (fixed[f] === 1) continue
        fixed[f] = 1
        rates[f] = share
        const other = r < n ? n + (this.#dst[f] as number) : this.#src[f] as number
        cap[other] = Math.max(0, (cap[other] as number) - share)
        left[other] = (left[other] as number) - 1
        if ((left[other] as number) > 0) heap.set(other, (cap[other] as number) / (left[other] as number))
        else heap.remove(other)
      }
    }
    for (let i = 0; i < n; i++) {
      for (const f of this.ups[i] as number[]) {
        fixed[f] = 0
        const rate = rates[f] as number
        if (rate === this.#rate[f]) continue
        this.#settle(f)
        this.#rate[f] = rate
        this.rerates++
        this.#heap.set(f, this.now + Math.max(0, this.#remaining[f] as number) / rate)
      }
    }
  }

  #settle (f: number): void {
    const now = this.now
    this.#remaining[f] = (this.#remaining[f] as number) - (this.#rate[f] as number) * (now - (this.#last[f] as number))
    this.#last[f] = now
  }

  #rerate (flows: number[]): void {
    if (this.#maxMin) {
      this.#dirty = true
      return
    }
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
