import assert from 'node:assert/strict'
import { test, type TestContext } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { Type } from '@sinclair/typebox'
import { streamPair } from '@libp2p/utils'
import type { Stream } from '@libp2p/interface'
import { createChannel, encodeFrame, type Channel, type ChannelInit } from '../../src/p2p/channel.ts'

// The session channel between a peer and its scheduler: many requests on one
// stream, answers matched by id, bounded every way, and a heartbeat that ends
// a channel whose other side went quiet.

const Echo = Type.Object({ echo: Type.Number() })

async function pair (t: TestContext, client: ChannelInit, server: ChannelInit): Promise<{ client: Channel, server: Channel, streams: [Stream, Stream] }> {
  const [a, b] = await streamPair({ delay: 0 })
  const c = createChannel(a, { name: 'client', ...client })
  const s = createChannel(b, { name: 'server', ...server })
  t.after(() => {
    c.abort(new Error('test over'))
    s.abort(new Error('test over'))
  })
  return { client: c, server: s, streams: [a, b] }
}

/** The far end of a stream, speaking raw frames (a hostile or broken peer). */
async function rawPair (t: TestContext, init: ChannelInit): Promise<{ channel: Channel, raw: Stream, received: unknown[] }> {
  const [a, b] = await streamPair({ delay: 0 })
  const channel = createChannel(a, { name: 'client', ...init })
  const received: unknown[] = []
  b.addEventListener('message', (evt) => {
    const bytes = evt.data.subarray()
    // Small frames, each in one message here.
    for (let at = 0; at + 4 <= bytes.byteLength;) {
      const n = Buffer.from(bytes.buffer, bytes.byteOffset + at).readUInt32BE(0)
      received.push(JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset + at + 4, n).toString('utf8')))
      at += 4 + n
    }
  })
  t.after(() => {
    channel.abort(new Error('test over'))
    b.abort(new Error('test over'))
  })
  return { channel, raw: b, received }
}

test('many requests at once on one stream, answered out of order, each to its own caller', async (t) => {
  const { client } = await pair(t, {}, {
    onRequest: async (body) => {
      const n = (body as { n: number }).n
      await sleep((50 - n) % 7)
      return { echo: n * 2 }
    }
  })
  const answers = await Promise.all(Array.from({ length: 50 }, async (_, n) => client.request({ n }, Echo, 'echo', { timeoutMs: 5_000 })))
  assert.deepEqual(answers.map(a => a.echo), Array.from({ length: 50 }, (_, n) => n * 2))
  assert.equal(client.outgoing, 0)
})

test('a handler that throws sends its code back; an answer that does not fit the schema is a ProtocolError for that request only', async (t) => {
  const { client } = await pair(t, {}, {
    onRequest: async (body) => {
      if ((body as { n: number }).n === 1) throw Object.assign(new Error('not registered'), { code: 'DF_ERR_NOT_REGISTERED' })
      if ((body as { n: number }).n === 2) return { echo: 'two' }
      return { echo: 3 }
    }
  })
  await assert.rejects(client.request({ n: 1 }, Echo, 'echo', { timeoutMs: 5_000 }), { code: 'DF_ERR_NOT_REGISTERED', message: 'not registered' })
  await assert.rejects(client.request({ n: 2 }, Echo, 'echo', { timeoutMs: 5_000 }), { code: 'DF_ERR_PROTOCOL' })
  assert.deepEqual(await client.request({ n: 3 }, Echo, 'echo', { timeoutMs: 5_000 }), { echo: 3 })
  assert.equal(client.open, true)
})

for (const [what, bytes] of [
  ['not JSON', Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from('{{{')])],
  ['an unknown frame type', encodeFrame({ t: 'gossip' })],
  ['an answer to a request never made', encodeFrame({ t: 'res', id: 99, b: {} })],
  ['an answer without an id', encodeFrame({ t: 'res', b: {} })],
  ['a request to a side that takes none', encodeFrame({ t: 'req', id: 1, b: {} })],
  ['a frame longer than the bound', Buffer.from([0, 1, 0, 0])]
] as const) {
  test(`${what}: a ProtocolError that ends the channel and fails what was waiting`, async (t) => {
    const { channel, raw } = await rawPair(t, { maxMessageBytes: 1024 })
    const waiting = channel.request({ n: 1 }, Echo, 'echo', { timeoutMs: 5_000 })
    raw.send(bytes)
    await assert.rejects(waiting, { code: 'DF_ERR_PROTOCOL' })
    assert.equal((await channel.ended as { code?: string }).code, 'DF_ERR_PROTOCOL')
    assert.equal(channel.open, false)
    await assert.rejects(channel.request({ n: 2 }, Echo, 'echo', { timeoutMs: 5_000 }), { code: 'DF_ERR_PROTOCOL' })
  })
}

test('a frame split across many messages, and several frames in one, are read whole', async (t) => {
  const { channel, raw, received } = await rawPair(t, {})
  const first = channel.request({ n: 1 }, Echo, 'echo', { timeoutMs: 5_000 })
  const second = channel.request({ n: 2 }, Echo, 'echo', { timeoutMs: 5_000 })
  while (received.length < 2) await sleep(1)
  const both = Buffer.concat([encodeFrame({ t: 'res', id: 2, b: { echo: 2 } }), encodeFrame({ t: 'res', id: 1, b: { echo: 1, pad: 'x'.repeat(300) } })])
  for (let at = 0; at < both.length; at += 7) raw.send(both.subarray(at, at + 7))
  assert.deepEqual(await second, { echo: 2 })
  assert.equal((await first).echo, 1)
})

test('a request past the size bound fails at once, before it is sent, and frees its slot', async (t) => {
  const { client } = await pair(t, { maxMessageBytes: 256, maxOutgoing: 1 }, { onRequest: async () => ({ echo: 1 }) })
  await assert.rejects(client.request({ pad: 'x'.repeat(300) }, Echo, 'echo', { timeoutMs: 5_000 }), { code: 'DF_ERR_PROTOCOL' })
  assert.equal(client.outgoing, 0)
  assert.deepEqual(await client.request({ n: 1 }, Echo, 'echo', { timeoutMs: 5_000 }), { echo: 1 })
})

test('an answer past the size bound goes back as an error, and the channel stays up', async (t) => {
  const { client } = await pair(t, {}, { maxMessageBytes: 256, onRequest: async (body) => (body as { big?: boolean }).big === true ? { echo: 1, pad: 'x'.repeat(300) } : { echo: 2 } })
  await assert.rejects(client.request({ big: true }, Echo, 'echo', { timeoutMs: 5_000 }), { code: 'DF_ERR_PROTOCOL' })
  assert.deepEqual(await client.request({}, Echo, 'echo', { timeoutMs: 5_000 }), { echo: 2 })
})

test('at most maxOutgoing requests are out; the next wait for a slot, and past maxWaiting callers are refused', async (t) => {
  const release = Promise.withResolvers<void>()
  let handling = 0
  let most = 0
  const { client } = await pair(t, { maxOutgoing: 3, maxWaiting: 2 }, {
    onRequest: async () => {
      most = Math.max(most, ++handling)
      await release.promise
      handling--
      return { echo: 0 }
    }
  })
  const calls = Array.from({ length: 5 }, async () => client.request({}, Echo, 'echo', { timeoutMs: 5_000 }))
  await sleep(20)
  assert.equal(client.outgoing, 3)
  assert.equal(handling, 3)
  await assert.rejects(client.request({}, Echo, 'echo', { timeoutMs: 5_000 }), { code: 'DF_ERR_QUEUE_FULL' })
  release.resolve()
  assert.equal((await Promise.all(calls)).length, 5)
  assert.equal(most, 3)
})

test('the other side past maxIncoming: the channel stops reading until a handler is done', async (t) => {
  const release = Promise.withResolvers<void>()
  let handling = 0
  let most = 0
  const { client } = await pair(t, { maxOutgoing: 10 }, {
    maxIncoming: 2,
    onRequest: async () => {
      most = Math.max(most, ++handling)
      await release.promise
      handling--
      return { echo: 0 }
    }
  })
  const calls = Array.from({ length: 6 }, async () => client.request({}, Echo, 'echo', { timeoutMs: 5_000 }))
  await sleep(30)
  assert.equal(handling, 2, 'two handled, the rest unread')
  release.resolve()
  await Promise.all(calls)
  assert.equal(most, 2)
})

test('a peer that never answers: the request fails at its deadline, and the channel ends once the answer is overdue', async (t) => {
  const { channel, received } = await rawPair(t, { abandonedGraceMs: 100 })
  const started = Date.now()
  await assert.rejects(channel.request({ n: 1 }, Echo, 'echo', { timeoutMs: 100 }), { code: 'DF_ERR_TIMEOUT' })
  const took = Date.now() - started
  assert.ok(took >= 90 && took < 1_000, `failed after ${took} ms`)
  assert.equal(received.length, 1, 'the request went out')
  assert.equal(channel.outgoing, 1, 'its slot stays taken: the other side may still be working on it')
  assert.equal((await channel.ended as { code?: string }).code, 'DF_ERR_TIMEOUT')
  const ended = Date.now() - started
  assert.ok(ended >= 190 && ended < 2_000, `ended after ${ended} ms`)
})

test('a caller that gives up gets its own reason at once; a late answer is taken quietly and frees the slot', async (t) => {
  const release = Promise.withResolvers<void>()
  const { client } = await pair(t, { maxOutgoing: 1 }, {
    onRequest: async () => {
      await release.promise
      return { echo: 1 }
    }
  })
  const controller = new AbortController()
  const call = client.request({}, Echo, 'echo', { timeoutMs: 5_000, signal: controller.signal })
  await sleep(10)
  controller.abort(new Error('the reader went away'))
  await assert.rejects(call, { message: 'the reader went away' })
  assert.equal(client.outgoing, 1)
  const next = client.request({}, Echo, 'echo', { timeoutMs: 5_000 })
  release.resolve()
  assert.deepEqual(await next, { echo: 1 })
  assert.equal(client.open, true)
  assert.equal(client.outgoing, 0)
})

test('an already aborted signal fails before anything is sent', async (t) => {
  const { channel, received } = await rawPair(t, {})
  await assert.rejects(channel.request({}, Echo, 'echo', { timeoutMs: 5_000, signal: AbortSignal.abort(new Error('no')) }), { message: 'no' })
  await sleep(10)
  assert.equal(received.length, 0)
})

test('heartbeat: an idle channel whose other side answers stays up; one whose other side went quiet ends within heartbeat + timeout', async (t) => {
  const { client } = await pair(t, { heartbeatMs: 40, heartbeatTimeoutMs: 60 }, { idleTimeoutMs: 150, onRequest: async () => ({ echo: 1 }) })
  await sleep(400)
  assert.equal(client.open, true, 'pings answered keep it up, and keep the other side from timing it out')
  assert.deepEqual(await client.request({}, Echo, 'echo', { timeoutMs: 5_000 }), { echo: 1 })

  const { channel, raw, received } = await rawPair(t, { heartbeatMs: 40, heartbeatTimeoutMs: 60 })
  raw.pause()
  const started = Date.now()
  const why = await channel.ended
  const took = Date.now() - started
  assert.equal((why as { code?: string }).code, 'DF_ERR_TIMEOUT')
  assert.ok(took >= 90 && took < 1_000, `ended after ${took} ms`)
  raw.resume()
  await sleep(10)
  assert.deepEqual(received, [{ t: 'ping' }])
})

test('idle deadline: a side that hears nothing for idleTimeoutMs ends the channel', async (t) => {
  const { channel } = await rawPair(t, { idleTimeoutMs: 80 })
  const started = Date.now()
  assert.equal((await channel.ended as { code?: string }).code, 'DF_ERR_TIMEOUT')
  assert.ok(Date.now() - started >= 70)
})

test('closing: waiting callers fail with a ClosedError, the other side sees the channel end', async (t) => {
  const { client, server } = await pair(t, {}, { onRequest: async () => { await new Promise(() => {}) } })
  const call = client.request({}, Echo, 'echo', { timeoutMs: 5_000 })
  await sleep(10)
  await client.close()
  await assert.rejects(call, { code: 'DF_ERR_CLOSED' })
  assert.equal(await server.ended, undefined)
})

/** A stream whose far side never reads: every send fills the buffer, and only `abort` ends it. */
class StuckStream extends EventTarget {
  maxReadBufferLength = 0
  maxWriteBufferLength = 0
  writableNeedsDrain = false
  sent = 0
  send (): boolean {
    this.sent++
    this.writableNeedsDrain = true
    return false
  }

  pause (): void {}
  resume (): void {}
  async close (): Promise<void> {}
  abort (err: Error): void {
    this.dispatchEvent(Object.assign(new Event('close'), { error: err }))
  }
}

test('the stream closing under requests still waiting to be written: each fails, none leaves an unhandled rejection', async (t) => {
  const stream = new StuckStream()
  const channel = createChannel(stream as unknown as Stream, { name: 'client' })
  t.after(() => { channel.abort(new Error('test over')) })
  const unhandled: unknown[] = []
  const onUnhandled = (reason: unknown): void => { unhandled.push(reason) }
  process.on('unhandledRejection', onUnhandled)
  t.after(() => { process.off('unhandledRejection', onUnhandled) })
  const calls = Array.from({ length: 4 }, async (_, n) => channel.request({ n }, Echo, 'echo', { timeoutMs: 5_000 }))
  await sleep(10)
  assert.equal(stream.sent, 1, 'one request written; the others wait for the buffer to drain')
  stream.abort(new Error('the scheduler went away'))
  const settled = await Promise.allSettled(calls)
  assert.deepEqual(settled.map(s => s.status), Array(4).fill('rejected'))
  await sleep(20)
  // Such a rejection ends a peer's process (the scheduler session closing under a burst of announcements did).
  assert.deepEqual(unhandled, [])
})
