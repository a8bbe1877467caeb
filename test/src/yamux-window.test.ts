import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import net from 'node:net'
import { test, type TestContext } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { StreamState } from '@chainsafe/libp2p-yamux/stream'
import { silentLogger } from '../../src/logger.ts'
import { createP2PNode, type P2PNode, type Stream } from '../../src/p2p/index.ts'
import { updateCanWait } from '../../src/p2p/yamux-window.ts'
import { freePort } from '../helpers/ports.ts'
import { tmpDir } from '../helpers/tmp.ts'

// Yamux window updates wait until half the receive window is used
// (src/p2p/yamux-window.ts): small messages are not each answered by an
// update frame, and a large transfer still flows, intact.

const PROTOCOL = '/damselfly-test/sink/1'
const logger = silentLogger()

test('the rule: an update waits while more than half the window is unused, on an established stream only', () => {
  const w = 2 * 1024 * 1024
  assert.equal(updateCanWait({ state: StreamState.Established, recvWindow: w, recvWindowCapacity: w - 100 }), true)
  assert.equal(updateCanWait({ state: StreamState.Established, recvWindow: w, recvWindowCapacity: w / 2 + 1 }), true)
  assert.equal(updateCanWait({ state: StreamState.Established, recvWindow: w, recvWindowCapacity: w / 2 }), false)
  assert.equal(updateCanWait({ state: StreamState.Established, recvWindow: w, recvWindowCapacity: 0 }), false)
  // A flag still to send (the ACK of a stream the other side opened) goes at once.
  assert.equal(updateCanWait({ state: StreamState.SYNReceived, recvWindow: w, recvWindowCapacity: w - 100 }), false)
  // A paused stream is the original's business (it sends nothing and restarts the epoch).
  assert.equal(updateCanWait({ state: StreamState.Paused, recvWindow: w, recvWindowCapacity: w - 100 }), false)
})

/** Two real nodes, the dialler reaching the listener through a TCP relay that counts the bytes going back to it. */
async function nodesThroughCounter (t: TestContext): Promise<{ dialler: P2PNode, listener: P2PNode, target: { peerId: string, addrs: string[] }, backBytes: () => number }> {
  const dir = await tmpDir('df-yamux-')
  const [lport, rport] = [await freePort(), await freePort()]
  const listener = await createP2PNode({ logger }, { dataDir: dir.path, keyName: 'listener.key', listen: [`/ip4/127.0.0.1/tcp/${lport}`] })
  const dialler = await createP2PNode({ logger }, { dataDir: dir.path, keyName: 'dialler.key', listen: [] })
  let back = 0
  const sockets = new Set<net.Socket>()
  const relay = net.createServer((inbound) => {
    const outbound = net.connect(lport, '127.0.0.1')
    sockets.add(inbound).add(outbound)
    outbound.on('data', (chunk: Buffer) => { back += chunk.byteLength })
    inbound.pipe(outbound).pipe(inbound)
    inbound.on('error', () => outbound.destroy())
    outbound.on('error', () => inbound.destroy())
  })
  await new Promise<void>(resolve => relay.listen(rport, '127.0.0.1', resolve))
  t.after(async () => {
    await dialler.stop()
    await listener.stop()
    for (const s of sockets) s.destroy()
    await new Promise(resolve => relay.close(resolve))
    await dir.cleanup()
  })
  return { dialler, listener, target: { peerId: listener.peerId, addrs: [`/ip4/127.0.0.1/tcp/${rport}`] }, backBytes: () => back }
}

/** Collects what a stream receives into a hash, and resolves with its length and digest when the writer closes. */
function sink (stream: Stream): Promise<{ bytes: number, digest: string }> {
  const hash = createHash('sha256')
  let bytes = 0
  return new Promise((resolve, reject) => {
    stream.addEventListener('message', (evt) => {
      const data = evt.data.subarray()
      bytes += data.byteLength
      hash.update(data)
    })
    stream.addEventListener('remoteCloseWrite', () => resolve({ bytes, digest: hash.digest('hex') }))
    stream.addEventListener('close', (evt) => { if (evt.error !== undefined) reject(evt.error) })
  })
}

async function until (what: string, check: () => boolean): Promise<void> {
  for (let waited = 0; !check(); waited += 10) {
    if (waited > 10_000) throw new Error(`timed out waiting for ${what}`)
    await sleep(10)
  }
}

test('200 small messages one way: the receiver sends no window update back for them', async (t) => {
  const { dialler, listener, target, backBytes } = await nodesThroughCounter(t)
  let received: Promise<{ bytes: number, digest: string }> | undefined
  await listener.handle(PROTOCOL, async (stream) => { received = sink(stream) })
  const stream = await dialler.openStream(target, PROTOCOL)
  await until('the stream to open', () => received !== undefined)
  // The handshake, protocol negotiation and the stream's ACK are done; what follows back is updates only.
  const first = Buffer.alloc(100, 1)
  stream.send(first)
  await sleep(200)
  const before = backBytes()
  for (let i = 0; i < 200; i++) {
    stream.send(Buffer.alloc(100, i))
    await sleep(1)
  }
  await stream.close()
  const got = await received
  assert.equal(got?.bytes, 201 * 100)
  await sleep(100)
  // Answering each 100-byte frame with an update was ~30 bytes on the wire each (12 of yamux, 18 of Noise): 6 KB.
  // The close (FIN) and its acknowledgement may still come back.
  assert.ok(backBytes() - before < 200, `${backBytes() - before} bytes came back for 200 small frames`)
})

test('64 MiB one way still flows past the initial window, intact, with updates at half a window', async (t) => {
  const { dialler, listener, target } = await nodesThroughCounter(t)
  let received: Promise<{ bytes: number, digest: string }> | undefined
  await listener.handle(PROTOCOL, async (stream) => { received = sink(stream) })
  const stream = await dialler.openStream(target, PROTOCOL)
  const hash = createHash('sha256')
  for (let i = 0; i < 64; i++) {
    const chunk = randomBytes(1024 * 1024)
    hash.update(chunk)
    if (!stream.send(chunk)) await new Promise(resolve => stream.addEventListener('drain', resolve, { once: true }))
  }
  await stream.close()
  await until('the stream to open', () => received !== undefined)
  const got = await received
  assert.deepEqual(got, { bytes: 64 * 1024 * 1024, digest: hash.digest('hex') })
})
