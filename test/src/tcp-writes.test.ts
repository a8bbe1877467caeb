import assert from 'node:assert/strict'
import { once } from 'node:events'
import { Socket, createServer, type AddressInfo } from 'node:net'
import { test, type TestContext } from 'node:test'
import { silentLogger } from '../../src/logger.ts'
import { createP2PNode, type P2PNode } from '../../src/p2p/index.ts'
import { coalesceWrites } from '../../src/p2p/tcp-writes.ts'
import { freePort } from '../helpers/ports.ts'
import { tmpDir } from '../helpers/tmp.ts'

type WriteFn = (this: Socket, ...args: unknown[]) => unknown

/** Counts the writes that reach the kernel from `Socket`s (one `_write` or one `_writev` is one system call) while `work` runs. */
async function countWrites (work: () => Promise<void>): Promise<{ write: number, writev: number, chunksInWritev: number }> {
  const proto = Socket.prototype as unknown as { _write: WriteFn, _writev: WriteFn }
  const { _write: write, _writev: writev } = proto
  const counts = { write: 0, writev: 0, chunksInWritev: 0 }
  proto._write = function (...args) { counts.write++; return write.apply(this, args) }
  proto._writev = function (...args) { counts.writev++; counts.chunksInWritev += (args[0] as unknown[]).length; return writev.apply(this, args) }
  try {
    await work()
  } finally {
    proto._write = write
    proto._writev = writev
  }
  return counts
}

async function socketPair (t: TestContext): Promise<{ client: Socket, received: () => Buffer }> {
  const chunks: Buffer[] = []
  const server = createServer(socket => { socket.on('data', (c: Buffer) => chunks.push(c)) })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const client = new Socket()
  client.connect((server.address() as AddressInfo).port, '127.0.0.1')
  await once(client, 'connect')
  t.after(async () => {
    client.destroy()
    server.close()
    await once(server, 'close')
  })
  return { client, received: () => Buffer.concat(chunks) }
}

/** A stand-in for the transport's connection: like @libp2p/tcp's, it writes each chunk on its own. */
function connectionOver (socket: Socket): { socket: Socket, sendData: (data: Buffer[] & { byteLength?: number }) => { canSendMore: boolean } } {
  return {
    socket,
    sendData (data) {
      let canSendMore = true
      for (const buf of data) canSendMore = socket.write(buf)
      return { canSendMore }
    }
  }
}

test('a message handed over in pieces leaves in one writev, bytes in order; a single chunk as before', async (t) => {
  const { client, received } = await socketPair(t)
  const conn = connectionOver(client)
  coalesceWrites(conn)
  let result: unknown
  const pieces = await countWrites(async () => { result = conn.sendData([Buffer.from('\x00\x05'), Buffer.from('hello'), Buffer.from('TAG')]) })
  assert.deepEqual(pieces, { write: 0, writev: 1, chunksInWritev: 3 })
  assert.deepEqual(result, { canSendMore: true }, 'what the connection answered comes back unchanged')
  const single = await countWrites(async () => { conn.sendData([Buffer.from('!')]) })
  assert.deepEqual(single, { write: 1, writev: 0, chunksInWritev: 0 })
  for (let waited = 0; received().length < 11; waited++) {
    assert.ok(waited < 200, 'the bytes arrive')
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  assert.equal(received().toString('latin1'), '\x00\x05helloTAG!')
})

test('a connection without the socket this relies on is refused loudly, not written to as before', () => {
  assert.throws(() => { coalesceWrites({ sendData () {} }) }, /tcp-writes\.ts needs updating/)
  assert.throws(() => { coalesceWrites({ socket: new Socket() }) }, /tcp-writes\.ts needs updating/)
})

test('between two nodes each small message is one write to the socket, not one per piece of it', async (t) => {
  const PROTOCOL = '/damselfly-test/ping-pong/1'
  const logger = silentLogger()
  const start = async (name: string): Promise<{ node: P2PNode, addr: string }> => {
    const dir = await tmpDir(`df-writes-${name}-`)
    const port = await freePort()
    const node = await createP2PNode({ logger }, { dataDir: dir.path, keyName: `${name}.key`, listen: [`/ip4/127.0.0.1/tcp/${port}`], encrypters: ['noise'] })
    t.after(async () => {
      await node.stop()
      await dir.cleanup()
    })
    return { node, addr: `/ip4/127.0.0.1/tcp/${port}` }
  }
  const a = await start('a')
  const b = await start('b')
  await b.node.handle(PROTOCOL, async (stream) => {
    for await (const chunk of stream) stream.send(chunk.subarray())
    await stream.close()
  })
  const stream = await a.node.openStream({ peerId: b.node.peerId, addrs: [b.addr] }, PROTOCOL)
  const answers = stream[Symbol.asyncIterator]()
  const ROUNDS = 50
  const counts = await countWrites(async () => {
    for (let i = 0; i < ROUNDS; i++) {
      stream.send(Buffer.from(`message ${i}`))
      const r = await answers.next()
      assert.equal(Buffer.from((r.value as { subarray: () => Uint8Array }).subarray()).toString(), `message ${i}`)
    }
  })
  await stream.close()
  // Noise hands each message over as its length and its ciphertext: two writes apiece unless they are coalesced.
  const messages = 2 * ROUNDS
  assert.ok(counts.write + counts.writev <= messages * 1.2, `${counts.write} writes and ${counts.writev} writevs for ${messages} messages`)
})
