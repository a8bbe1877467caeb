/**
 * The simulator's two queues: timed callbacks (a binary heap ordered by time,
 * then by insertion, so equal times run in the order they were scheduled),
 * and flow completions (an indexed heap: a flow's finish time moves every
 * time its share of a link changes, in O(log n) without stale entries).
 */

export interface Timer {
  t: number
  seq: number
  fn: () => void
  /** Cancelled timers stay in the heap and are skipped when they come up. */
  dead: boolean
}

export class EventQueue {
  readonly #heap: Timer[] = []
  #seq = 0

  get size (): number { return this.#heap.length }

  at (t: number, fn: () => void): Timer {
    const timer: Timer = { t, seq: this.#seq++, fn, dead: false }
    const heap = this.#heap
    heap.push(timer)
    let i = heap.length - 1
    while (i > 0) {
      const parent = (i - 1) >> 1
      const p = heap[parent] as Timer
      if (p.t < t || (p.t === t && p.seq < timer.seq)) break
      heap[i] = p
      i = parent
    }
    heap[i] = timer
    return timer
  }

  /** Time of the earliest live timer, Infinity when none. */
  peek (): number {
    const heap = this.#heap
    while (heap.length > 0 && (heap[0] as Timer).dead) this.#pop()
    return heap.length === 0 ? Infinity : (heap[0] as Timer).t
  }

  pop (): Timer | undefined {
    this.peek()
    return this.#heap.length === 0 ? undefined : this.#pop()
  }

  #pop (): Timer {
    const heap = this.#heap
    const top = heap[0] as Timer
    const last = heap.pop() as Timer
    const n = heap.length
    if (n > 0) {
      let i = 0
      for (;;) {
        const l = 2 * i + 1
        if (l >= n) break
        const r = l + 1
        let c = l
        let child = heap[l] as Timer
        if (r < n) {
          const right = heap[r] as Timer
          if (right.t < child.t || (right.t === child.t && right.seq < child.seq)) { c = r; child = right }
        }
        if (last.t < child.t || (last.t === child.t && last.seq < child.seq)) break
        heap[i] = child
        i = c
      }
      heap[i] = last
    }
    return top
  }
}

/** A min-heap of ids 0..capacity-1 keyed by a number each; an id's key can change while it is in. */
export class IndexedHeap {
  #heap: Int32Array
  #pos: Int32Array
  #key: Float64Array
  #n = 0

  constructor (capacity: number) {
    this.#heap = new Int32Array(capacity)
    this.#pos = new Int32Array(capacity).fill(-1)
    this.#key = new Float64Array(capacity)
  }

  get size (): number { return this.#n }

  grow (capacity: number): void {
    if (capacity <= this.#pos.length) return
    const heap = new Int32Array(capacity)
    heap.set(this.#heap)
    const pos = new Int32Array(capacity).fill(-1)
    pos.set(this.#pos)
    const key = new Float64Array(capacity)
    key.set(this.#key)
    this.#heap = heap
    this.#pos = pos
    this.#key = key
  }

  peekId (): number { return this.#n === 0 ? -1 : this.#heap[0] as number }
  peekKey (): number { return this.#n === 0 ? Infinity : this.#key[this.#heap[0] as number] as number }

  /** Inserts `id` or moves it to its new key. */
  set (id: number, key: number): void {
    const at = this.#pos[id] as number
    const old = this.#key[id] as number
    this.#key[id] = key
    if (at === -1) {
      const i = this.#n++
      this.#heap[i] = id
      this.#pos[id] = i
      this.#up(i)
    } else if (key < old) {
      this.#up(at)
    } else {
      this.#down(at)
    }
  }

  remove (id: number): void {
    const at = this.#pos[id] as number
    if (at === -1) return
    const last = this.#heap[--this.#n] as number
    this.#pos[id] = -1
    if (last === id) return
    this.#heap[at] = last
    this.#pos[last] = at
    this.#up(at)
    this.#down(this.#pos[last] as number)
  }

  #up (i: number): void {
    const heap = this.#heap
    const key = this.#key
    const id = heap[i] as number
    const k = key[id] as number
    while (i > 0) {
      const parent = (i - 1) >> 1
      const p = heap[parent] as number
      if ((key[p] as number) <= k) break
      heap[i] = p
      this.#pos[p] = i
      i = parent
    }
    heap[i] = id
    this.#pos[id] = i
  }

  #down (i: number): void {
    const heap = this.#heap
    const key = this.#key
    const n = this.#n
    const id = heap[i] as number
    const k = key[id] as number
    for (;;) {
      const l = 2 * i + 1
      if (l >= n) break
      const r = l + 1
      let c = l
      if (r < n && (key[heap[r] as number] as number) < (key[heap[l] as number] as number)) c = r
      const child = heap[c] as number
      if (k <= (key[child] as number)) break
      heap[i] = child
      this.#pos[child] = i
      i = c
    }
    heap[i] = id
    this.#pos[id] = i
  }
}
