import type { Stream } from '@libp2p/interface'
import type { Static, TSchema } from '@sinclair/typebox'
import { deadline, raceSignal, type AbortOptions } from '../abort.ts'
import { ClosedError, DamselflyError, ProtocolError, QueueFullError, TimeoutError } from '../errors.ts'
import { MAX_MESSAGE_BYTES, check } from '../protocol/messages.ts'

/**
 * A long-lived request channel over one libp2p stream: many requests and
 * answers, each a frame, instead of a stream (and a protocol negotiation,
 * and its close) per request. A peer's session with its scheduler is one.
 *
 * A frame is a 4-byte big-endian length and that many bytes of JSON:
 * `{"t":"req","id":7,"b":…}` a request, `{"t":"res","id":7,"b":…}` its
 * answer, `{"t":"err","id":7,"code":…,"message":…}` a request its handler
 * failed, `{"t":"ping"}` and `{"t":"pong"}` liveness. Anything else — a
 * frame past the size bound, not JSON, an unknown type, an answer to a
 * request never made — is a ProtocolError that ends the channel.
 *
 * Bounds: a side has at most `maxOutgoing` requests out (more callers wait
 * for a slot, at most `maxWaiting` of them, each under its own deadline);
 * at most `maxIncoming` of the other side's requests are handled at once,
 * and past that the channel stops reading (the other side's writes wait on
 * the stream's window); frames are at most `maxMessageBytes` either way.
 * A slot is freed when its answer arrives, not when its caller gives up:
 * the other side is still working on it. An answer a caller gave up on that
 * has not come `abandonedGraceMs` past the request's deadline means the
 * other side is stuck: the channel ends.
 *
 * Liveness: a side with `heartbeatMs` sends a ping after that long without
 * a frame from the other side, and ends the channel when nothing comes back
 * within `heartbeatTimeoutMs`; a side with `idleTimeoutMs` ends it after that
 * long without a frame. Timers only: nothing runs per frame but a clock read.
 */

export interface ChannelInit {
  /** What the channel is, for errors. Default 'channel'. */
  name?: string
  /** Largest frame either way, in bytes. Default MAX_MESSAGE_BYTES. */
  maxMessageBytes?: number
  /** Requests this side has out at once. Default 64. */
  maxOutgoing?: number
  /** Callers waiting for one of those slots; more are refused at once (QueueFullError). Default 1,024. */
  maxWaiting?: number
  /** The other side's requests handled at once; past it the channel stops reading. Default 128. */
  maxIncoming?: number
  /** Send a ping after this long without a frame from the other side. 0: never. Default 0. */
  heartbeatMs?: number
  /** A ping unanswered (no frame at all) this long ends the channel. Default 10 s. */
  heartbeatTimeoutMs?: number
  /** No frame from the other side for this long ends the channel. 0: never. Default 0. */
  idleTimeoutMs?: number
  /** How long past its deadline an answer nobody waits for any more may still come. Default 30 s. */
  abandonedGraceMs?: number
  /**
   * Answers the other side's requests; absent, a request is a ProtocolError.
   * Its signal aborts when the channel ends. What it throws goes back as an
   * `err` frame with the error's `code` (DF_ERR_INTERNAL when it has none).
   */
  onRequest?: (body: unknown, options: { signal: AbortSignal }) => Promise<unknown>
}

export interface RequestOptions extends AbortOptions {
  /** Deadline of this request, waiting for a slot included. */
  timeoutMs: number
}

export interface Channel {
  /** Sends one request and waits for its answer, checked against `schema`. */
  request: <T extends TSchema>(body: unknown, schema: T, what: string, options: RequestOptions) => Promise<Static<T>>
  /** Ends the channel: waiting callers and the other side's handlers are aborted with `err`, the stream is reset. */
  abort: (err: Error) => void
  /** Ends the channel gracefully: the stream is closed once what was written went out. */
  close: (options?: AbortOptions) => Promise<void>
  /** Resolves when the channel has ended, with why (undefined: closed by this side or the other). */
  readonly ended: Promise<Error | undefined>
  readonly open: boolean
  /** Requests out now (for tests and metrics). */
  readonly outgoing: number
}

interface Pending {
  resolve: (body: unknown) => void
  reject: (err: Error) => void
  /** When the answer is due at the latest (the request's deadline, plus the grace for an abandoned one). */
  expiresAt: number
  abandoned: boolean
}

const HEADER_BYTES = 4
const encoder = new TextEncoder()

/** One frame: the length, then the JSON. */
export function encodeFrame (frame: object): Uint8Array {
  const json = JSON.stringify(frame)
  const bytes = Buffer.allocUnsafe(HEADER_BYTES + Buffer.byteLength(json))
  bytes.writeUInt32BE(bytes.length - HEADER_BYTES, 0)
  encoder.encodeInto(json, bytes.subarray(HEADER_BYTES))
  return bytes
}

export function createChannel (stream: Stream, init: ChannelInit = {}): Channel {
  const name = init.name ?? 'channel'
  const maxMessageBytes = init.maxMessageBytes ?? MAX_MESSAGE_BYTES
  const maxOutgoing = init.maxOutgoing ?? 64
  const maxWaiting = init.maxWaiting ?? 1_024
  const maxIncoming = init.maxIncoming ?? 128
  const heartbeatMs = init.heartbeatMs ?? 0
  const heartbeatTimeoutMs = init.heartbeatTimeoutMs ?? 10_000
  const idleTimeoutMs = init.idleTimeoutMs ?? 0
  const abandonedGraceMs = init.abandonedGraceMs ?? 30_000
  const { onRequest } = init

  /** Requests out, by id: at most maxOutgoing. */
  const pending = new Map<number, Pending>()
  /** Callers waiting for a slot, first come first served: at most maxWaiting. */
  const waiting: Array<() => void> = []
  let nextId = 1
  /** Slots taken: requests out, and callers between taking a slot and sending. */
  let slots = 0
  let incoming = 0
  const ending = new AbortController()
  const ended = Promise.withResolvers<Error | undefined>()
  let open = true

  // Frames in: chunks as they came, and the length of the frame being read (-1: its header is not in yet).
  const chunks: Uint8Array[] = []
  let buffered = 0
  let need = -1
  let paused = false

  let lastHeard = Date.now()
  let pingSentAt: number | undefined
  let watchTimer: NodeJS.Timeout | undefined
  let abandonTimer: NodeJS.Timeout | undefined

  // The stream may hold a whole frame ahead of us, and a little more while reading is paused.
  stream.maxReadBufferLength = Math.max(stream.maxReadBufferLength, maxMessageBytes + 64 * 1024)
  // Answers wait for room before they are written; pongs do not, and a side that never reads gets its stream reset.
  stream.maxWriteBufferLength = 2 * maxMessageBytes + 64 * 1024

  function end (err: Error | undefined): void {
    if (!open) return
    open = false
    clearTimeout(watchTimer)
    clearTimeout(abandonTimer)
    stream.removeEventListener('message', onMessage)
    stream.removeEventListener('close', onClose)
    stream.removeEventListener('remoteCloseWrite', onRemoteCloseWrite)
    const reason = err ?? new ClosedError(name)
    ending.abort(reason)
    for (const p of pending.values()) p.reject(reason)
    pending.clear()
    for (const wake of waiting.splice(0)) wake()
    slots = 0
    chunks.length = 0
    buffered = 0
    ended.resolve(err)
  }

  /** Why the channel ended, for whoever comes after. */
  function endReason (): Error {
    return ending.signal.reason as Error
  }

  function fail (err: Error): void {
    if (!open) return
    end(err)
    stream.abort(err)
  }

  const onClose = (evt: Event): void => {
    const error = (evt as Event & { error?: Error }).error
    end(error === undefined ? undefined : new ClosedError(`${name} (${error.message})`))
  }
  // The other side stopped writing: nothing more will come, answers included.
  const onRemoteCloseWrite = (): void => {
    end(undefined)
    stream.close().catch(() => {})
  }
  const onMessage = (evt: Event): void => {
    const data = (evt as Event & { data: Uint8Array | { subarray: () => Uint8Array } }).data
    const bytes = data instanceof Uint8Array ? data : data.subarray()
    lastHeard = Date.now()
    chunks.push(bytes)
    buffered += bytes.byteLength
    if (paused && buffered > maxMessageBytes + HEADER_BYTES) {
      fail(new ProtocolError(`${name}: the other side sent past ${maxIncoming} requests in flight`))
      return
    }
    readFrames()
  }
  stream.addEventListener('message', onMessage)
  stream.addEventListener('close', onClose)
  stream.addEventListener('remoteCloseWrite', onRemoteCloseWrite)

  /** The first `n` buffered bytes, as one array (a copy only when they span chunks). */
  function take (n: number): Uint8Array {
    const first = chunks[0] as Uint8Array
    let out: Uint8Array
    if (first.byteLength >= n) {
      out = first.subarray(0, n)
      if (first.byteLength === n) chunks.shift()
      else chunks[0] = first.subarray(n)
    } else {
      const whole = Buffer.allocUnsafe(n)
      let at = 0
      while (at < n) {
        const c = chunks[0] as Uint8Array
        const part = Math.min(c.byteLength, n - at)
        whole.set(c.subarray(0, part), at)
        at += part
        if (part === c.byteLength) chunks.shift()
        else chunks[0] = c.subarray(part)
      }
      out = whole
    }
    buffered -= n
    return out
  }

  function readFrames (): void {
    for (;;) {
      if (!open || paused) return
      if (need < 0) {
        if (buffered < HEADER_BYTES) return
        const header = take(HEADER_BYTES)
        need = ((header[0] as number) * 2 ** 24) + (((header[1] as number) << 16) | ((header[2] as number) << 8) | (header[3] as number))
        if (need > maxMessageBytes) {
          fail(new ProtocolError(`${name}: a frame of ${need} bytes, past the ${maxMessageBytes}-byte bound`))
          return
        }
      }
      if (buffered < need) return
      const payload = take(need)
      need = -1
      try {
        dispatch(payload)
      } catch (err) {
        fail(err instanceof DamselflyError ? err : new ProtocolError(`${name}: ${(err as Error).message}`))
        return
      }
    }
  }

  function dispatch (payload: Uint8Array): void {
    let frame: { t?: unknown, id?: unknown, b?: unknown, code?: unknown, message?: unknown }
    try {
      frame = JSON.parse(Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).toString('utf8'))
    } catch {
      throw new ProtocolError(`${name}: a frame that is not JSON`)
    }
    if (typeof frame !== 'object' || frame === null) throw new ProtocolError(`${name}: a frame that is not an object`)
    switch (frame.t) {
      case 'req': {
        const id = frameId(frame.id)
        if (onRequest === undefined) throw new ProtocolError(`${name}: requests go the other way`)
        incoming++
        if (incoming >= maxIncoming) pause()
        void answer(id, frame.b)
        return
      }
      case 'res':
      case 'err': {
        const id = frameId(frame.id)
        const p = pending.get(id)
        if (p === undefined) {
          // An answer to a request never made; answers to requests given up on are still pending (abandoned).
          throw new ProtocolError(`${name}: an answer to request ${id}, which is not out`)
        }
        pending.delete(id)
        if (frame.t === 'res') p.resolve(frame.b)
        else p.reject(new DamselflyError(typeof frame.code === 'string' ? frame.code.slice(0, 64) : 'DF_ERR_INTERNAL', typeof frame.message === 'string' ? frame.message.slice(0, 1024) : 'request failed'))
        releaseSlot()
        return
      }
      case 'ping':
        send({ t: 'pong' })
        return
      case 'pong':
        return
      default:
        throw new ProtocolError(`${name}: a frame of unknown type ${JSON.stringify(frame.t)?.slice(0, 32) ?? 'undefined'}`)
    }
  }

  function frameId (value: unknown): number {
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) throw new ProtocolError(`${name}: a frame without a valid id`)
    return value
  }

  function pause (): void {
    if (paused) return
    paused = true
    stream.pause()
  }

  function resume (): void {
    if (!paused || !open) return
    paused = false
    stream.resume()
    readFrames()
  }

  async function answer (id: number, body: unknown): Promise<void> {
    let bytes: Uint8Array
    try {
      const result = await (onRequest as NonNullable<ChannelInit['onRequest']>)(body, { signal: ending.signal })
      bytes = frameBytes({ t: 'res', id, b: result })
    } catch (err) {
      const e = err as { code?: unknown, message?: unknown }
      bytes = encodeFrame({ t: 'err', id, code: typeof e.code === 'string' ? e.code : 'DF_ERR_INTERNAL', message: String(e.message).slice(0, 1024) })
    }
    const d = deadline([ending.signal], 30_000, `${name}: writing an answer`)
    try {
      await write(bytes, d.signal)
    } catch (err) {
      // The other side does not take its answers: it is stuck or gone.
      fail(err as Error)
    } finally {
      d.clear()
      incoming--
      if (incoming < maxIncoming) resume()
    }
  }

  /** A frame's bytes; a ProtocolError past the size bound. */
  function frameBytes (frame: object): Uint8Array {
    const bytes = encodeFrame(frame)
    if (bytes.byteLength - HEADER_BYTES > maxMessageBytes) throw new ProtocolError(`${name}: a frame of ${bytes.byteLength - HEADER_BYTES} bytes, past the ${maxMessageBytes}-byte bound`)
    return bytes
  }

  function send (frame: object): void {
    if (open) stream.send(frameBytes(frame))
  }

  /** Writes one frame once the stream has room for it (the signal bounds the wait). */
  async function write (bytes: Uint8Array, signal: AbortSignal): Promise<void> {
    if (stream.writableNeedsDrain && open) await drained(signal)
    if (!open) throw endReason()
    stream.send(bytes)
  }

  /**
   * The stream's next 'drain' (its `onDrain()` hands out a promise that
   * stays resolved after the first drain, so it cannot be waited on twice).
   */
  async function drained (signal: AbortSignal): Promise<void> {
    signal.throwIfAborted()
    const done = Promise.withResolvers<void>()
    const onDrain = (): void => { done.resolve() }
    const onEnd = (): void => { done.reject(new ClosedError(name)) }
    const onAbort = (): void => { done.reject(signal.reason) }
    stream.addEventListener('drain', onDrain)
    stream.addEventListener('close', onEnd)
    signal.addEventListener('abort', onAbort)
    try {
      await done.promise
    } finally {
      stream.removeEventListener('drain', onDrain)
      stream.removeEventListener('close', onEnd)
      signal.removeEventListener('abort', onAbort)
    }
  }

  /** A slot freed (its answer came, or its request never went out): the next caller in line takes it. */
  function releaseSlot (): void {
    if (!open) return
    slots--
    const next = waiting.shift()
    if (next !== undefined) {
      slots++
      next()
    }
    armAbandonTimer()
  }

  /** Takes a slot at once when one is free (synchronously: callers in one tick cannot all see the same free slot). */
  async function acquireSlot (signal: AbortSignal): Promise<void> {
    if (slots < maxOutgoing && waiting.length === 0) {
      slots++
      return
    }
    if (waiting.length >= maxWaiting) throw new QueueFullError(`${name} requests`)
    const slot = Promise.withResolvers<void>()
    let handed = false
    const take = (): void => {
      handed = true
      slot.resolve()
    }
    waiting.push(take)
    try {
      await raceSignal(slot.promise, signal)
    } catch (err) {
      const at = waiting.indexOf(take)
      if (at >= 0) waiting.splice(at, 1)
      // A slot handed over as we gave up goes back.
      if (handed) releaseSlot()
      throw err
    }
    // The channel ended while we waited (it dropped every slot).
    if (!open) throw endReason()
  }

  /** The earliest an abandoned answer is overdue: then the other side is stuck. */
  function armAbandonTimer (): void {
    clearTimeout(abandonTimer)
    abandonTimer = undefined
    let earliest = Infinity
    for (const p of pending.values()) if (p.abandoned && p.expiresAt < earliest) earliest = p.expiresAt
    if (earliest === Infinity || !open) return
    abandonTimer = setTimeout(() => {
      const now = Date.now()
      for (const [id, p] of pending) {
        if (p.abandoned && p.expiresAt <= now) {
          fail(new TimeoutError(`${name}: request ${id} went unanswered`))
          return
        }
      }
      armAbandonTimer()
    }, Math.max(0, earliest - Date.now()))
    abandonTimer.unref()
  }

  /** The heartbeat and the idle deadline: one timer, re-armed from when the other side was last heard. */
  function watch (): void {
    if (!open) return
    const now = Date.now()
    const awaitingPong = pingSentAt !== undefined && lastHeard < pingSentAt
    if (awaitingPong && now - (pingSentAt as number) >= heartbeatTimeoutMs) {
      fail(new TimeoutError(`${name}: a heartbeat`))
      return
    }
    if (idleTimeoutMs > 0 && now - lastHeard >= idleTimeoutMs) {
      fail(new TimeoutError(`${name}: ${idleTimeoutMs} ms without a word from the other side`))
      return
    }
    if (heartbeatMs > 0 && !awaitingPong && now - lastHeard >= heartbeatMs) {
      pingSentAt = now
      try {
        send({ t: 'ping' })
      } catch (err) {
        fail(err as Error)
        return
      }
    }
    let next = Infinity
    if (heartbeatMs > 0) next = pingSentAt !== undefined && lastHeard < pingSentAt ? pingSentAt + heartbeatTimeoutMs : lastHeard + heartbeatMs
    if (idleTimeoutMs > 0) next = Math.min(next, lastHeard + idleTimeoutMs)
    if (next === Infinity) return
    watchTimer = setTimeout(watch, Math.max(1, next - now))
    watchTimer.unref()
  }
  watch()

  return {
    get open () { return open },
    get outgoing () { return slots },
    ended: ended.promise,
    async request (body, schema, what, options) {
      options.signal?.throwIfAborted()
      if (!open) throw endReason()
      const expiresAt = Date.now() + options.timeoutMs
      const d = deadline([ending.signal, options.signal], options.timeoutMs, what)
      try {
        await acquireSlot(d.signal)
        const id = nextId++
        let bytes: Uint8Array
        try {
          bytes = frameBytes({ t: 'req', id, b: body })
        } catch (err) {
          releaseSlot()
          throw err
        }
        const answer = Promise.withResolvers<unknown>()
        // The channel may end while this request still waits to be written, rejecting an answer nobody awaits yet.
        answer.promise.catch(() => {})
        const entry: Pending = { resolve: answer.resolve, reject: answer.reject, expiresAt, abandoned: false }
        pending.set(id, entry)
        try {
          await write(bytes, d.signal)
        } catch (err) {
          // Never sent: nothing will answer it.
          if (pending.delete(id)) releaseSlot()
          throw err
        }
        let result: unknown
        try {
          result = await raceSignal(answer.promise, d.signal)
        } catch (err) {
          if (open && pending.get(id) === entry) {
            // The other side may still answer: the slot stays taken until it does, or until it is overdue.
            entry.abandoned = true
            entry.expiresAt += abandonedGraceMs
            armAbandonTimer()
          }
          throw err
        }
        return check(schema, result, what)
      } finally {
        d.clear()
      }
    },
    abort (err) {
      fail(err)
    },
    async close (options = {}) {
      if (!open) return
      end(undefined)
      try {
        await stream.close(options.signal === undefined ? {} : { signal: options.signal })
      } catch (err) {
        stream.abort(err as Error)
      }
    }
  }
}
