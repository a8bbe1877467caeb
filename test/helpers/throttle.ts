import net from 'node:net'
import type { Socket } from 'node:net'
import { performance } from 'node:perf_hooks'

export interface ThrottleProxy {
  port: number
  /** http://127.0.0.1:PORT, or https:// when the origin speaks TLS (the relay is plain TCP). */
  url: string
  /** 127.0.0.1:PORT */
  host: string
  /** Bytes forwarded from the upstream (registry) to clients since start/reset. */
  bytesDown(): number
  /** Bytes forwarded from clients to the upstream since start/reset. */
  bytesUp(): number
  /** Connections accepted and relayed since start/reset (refused ones while down are not counted). */
  connections(): number
  reset(): void
  /** Shared downstream bandwidth in bytes per second; undefined = unlimited. */
  setRate(bytesPerSecond: number | undefined): void
  /** While down, new connections are destroyed at once; going down destroys the open ones. */
  setDown(down: boolean): void
  /** Closes the server and every socket; leaves no handle open. */
  close(): Promise<void>
}

interface Pair {
  client: Socket
  upstream: Socket
  /** Downstream bytes waiting for tokens. */
  pending: Buffer[]
  pendingBytes: number
  /** The client's write buffer is full: wait for 'drain'. */
  clientBlocked: boolean
  upstreamEnded: boolean
  closed: boolean
}

const TICK_MS = 10

/**
 * A TCP relay in front of an origin that counts bytes and connections and can
 * throttle the downstream direction (origin → clients) with one token bucket
 * shared by every connection, the way a slow origin link looks to N clients.
 * Throttling works by backpressure: an upstream socket is paused while the
 * bucket is empty and resumed by a timer as tokens come back.
 */
export async function startThrottleProxy (opts: { targetPort: number, targetHost?: string, bytesPerSecond?: number, scheme?: 'http' | 'https' }): Promise<ThrottleProxy> {
  const targetHost = opts.targetHost ?? '127.0.0.1'
  let rate: number | undefined
  let burst = 0
  let tokens = 0
  let lastRefill = performance.now()
  let down = false
  let closing = false
  let bytesDown = 0
  let bytesUp = 0
  let connections = 0
  const pairs = new Set<Pair>()
  /** Pairs with pending bytes, served round-robin by the timer. */
  let waiting: Pair[] = []
  let timer: NodeJS.Timeout | undefined

  const setRate = (bytesPerSecond: number | undefined): void => {
    if (bytesPerSecond !== undefined && !(bytesPerSecond > 0)) throw new RangeError(`bad rate ${bytesPerSecond}`)
    rate = bytesPerSecond
    if (rate === undefined) {
      // Unlimited: flush whatever waits.
      for (const pair of waiting) flush(pair, Infinity)
      waiting = waiting.filter((p) => p.pendingBytes > 0 && !p.closed)
      stopTimerIfIdle()
      return
    }
    burst = Math.max(64 * 1024, Math.floor(rate / 20))
    tokens = Math.min(tokens, burst)
    if (waiting.length === 0) tokens = burst
    lastRefill = performance.now()
  }

  const refill = (): void => {
    const now = performance.now()
    if (rate !== undefined) tokens = Math.min(burst, tokens + rate * (now - lastRefill) / 1000)
    lastRefill = now
  }

  const destroyPair = (pair: Pair): void => {
    if (pair.closed) return
    pair.closed = true
    pair.pending = []
    pair.pendingBytes = 0
    pair.client.destroy()
    pair.upstream.destroy()
    pairs.delete(pair)
    waiting = waiting.filter((p) => p !== pair)
    stopTimerIfIdle()
  }

  const maybeResume = (pair: Pair): void => {
    if (pair.closed) return
    if (pair.pendingBytes === 0 && pair.upstreamEnded) {
      pair.client.end()
      return
    }
    if (pair.pendingBytes === 0 && !pair.clientBlocked && pair.upstream.isPaused()) pair.upstream.resume()
  }

  const write = (pair: Pair, chunk: Buffer): void => {
    bytesDown += chunk.length
    if (!pair.client.write(chunk)) {
      pair.clientBlocked = true
      pair.upstream.pause()
    }
  }

  /** Writes up to `budget` pending bytes of `pair`; returns how many it wrote. */
  const flush = (pair: Pair, budget: number): number => {
    let sent = 0
    while (pair.pending.length > 0 && sent < budget && !pair.closed) {
      const head = pair.pending[0] as Buffer
      const n = Math.min(head.length, budget - sent)
      if (n === head.length) pair.pending.shift()
      else pair.pending[0] = head.subarray(n)
      pair.pendingBytes -= n
      sent += n
      write(pair, n === head.length ? head : head.subarray(0, n))
    }
    maybeResume(pair)
    return sent
  }

  const stopTimerIfIdle = (): void => {
    if (waiting.length === 0 && timer !== undefined) {
      clearInterval(timer)
      timer = undefined
    }
  }

  const tick = (): void => {
    refill()
    if (waiting.length === 0) return stopTimerIfIdle()
    // Rotate so that no connection is always served first.
    const order = waiting
    waiting = []
    const start = order.length > 1 ? Math.floor(Math.random() * order.length) : 0
    const rotated = [...order.slice(start), ...order.slice(0, start)]
    // Give each waiting pair an equal share; what one cannot use goes to the next.
    let remaining = rotated.filter((p) => !p.closed)
    while (tokens >= 1 && remaining.length > 0) {
      const share = Math.max(1, Math.floor(tokens / remaining.length))
      for (const pair of remaining) {
        if (tokens < 1) break
        tokens -= flush(pair, Math.min(share, Math.floor(tokens)))
      }
      remaining = remaining.filter((p) => !p.closed && p.pendingBytes > 0)
    }
    waiting = [...waiting, ...rotated.filter((p) => !p.closed && p.pendingBytes > 0 && !waiting.includes(p))]
    stopTimerIfIdle()
  }

  const onUpstreamData = (pair: Pair, chunk: Buffer): void => {
    if (pair.closed) return
    if (rate === undefined) return write(pair, chunk)
    refill()
    if (pair.pendingBytes === 0) {
      const now = Math.min(chunk.length, Math.max(0, Math.floor(tokens)))
      if (now > 0) {
        tokens -= now
        write(pair, now === chunk.length ? chunk : chunk.subarray(0, now))
      }
      if (now === chunk.length) return
      chunk = chunk.subarray(now)
    }
    pair.pending.push(chunk)
    pair.pendingBytes += chunk.length
    pair.upstream.pause()
    if (!waiting.includes(pair)) waiting.push(pair)
    timer ??= setInterval(tick, TICK_MS)
  }

  const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (client) => {
    if (down || closing) {
      client.destroy()
      return
    }
    connections++
    const upstream = net.connect({ host: targetHost, port: opts.targetPort, allowHalfOpen: true, noDelay: true })
    const pair: Pair = { client, upstream, pending: [], pendingBytes: 0, clientBlocked: false, upstreamEnded: false, closed: false }
    pairs.add(pair)
    const kill = (): void => destroyPair(pair)
    client.on('error', kill)
    upstream.on('error', kill)
    client.on('close', kill)
    upstream.on('close', () => {
      // Let throttled bytes drain before the client goes too.
      if (pair.pendingBytes === 0 || !pair.upstreamEnded) kill()
    })
    upstream.on('data', (chunk: Buffer) => onUpstreamData(pair, chunk))
    upstream.on('end', () => {
      pair.upstreamEnded = true
      maybeResume(pair)
    })
    client.on('drain', () => {
      pair.clientBlocked = false
      maybeResume(pair)
    })
    client.on('data', (chunk: Buffer) => {
      bytesUp += chunk.length
      if (!upstream.write(chunk)) client.pause()
    })
    upstream.on('drain', () => client.resume())
    client.on('end', () => upstream.end())
  })

  setRate(opts.bytesPerSecond)
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen({ host: '127.0.0.1', port: 0 }, () => {
      server.off('error', reject)
      resolve()
    })
  })
  const address = server.address()
  if (address === null || typeof address !== 'object') throw new Error('throttle proxy has no address')
  const port = address.port
  const host = `127.0.0.1:${port}`
  return {
    port,
    host,
    url: `${opts.scheme ?? 'http'}://${host}`,
    bytesDown: () => bytesDown,
    bytesUp: () => bytesUp,
    connections: () => connections,
    reset () {
      bytesDown = 0
      bytesUp = 0
      connections = 0
    },
    setRate,
    setDown (value: boolean) {
      down = value
      if (down) for (const pair of [...pairs]) destroyPair(pair)
    },
    async close () {
      closing = true
      for (const pair of [...pairs]) destroyPair(pair)
      if (timer !== undefined) clearInterval(timer)
      timer = undefined
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}
