import assert from 'node:assert/strict'
import { test, type TestContext } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { silentLogger } from '../../src/logger.ts'
import { createP2PNode, type P2PNode } from '../../src/p2p/index.ts'
import { freePort } from '../helpers/ports.ts'
import { tmpDir } from '../helpers/tmp.ts'

// Peers whose pieces travel over the upload port offer Noise only
// (peer/swarm); a peer with pieces on libp2p streams offers TLS first. The two
// must still reach each other, whichever side dials.

const PROTOCOL = '/damselfly-test/echo/1'
const logger = silentLogger()

async function node (t: TestContext, name: string, encrypters: Array<'tls' | 'noise'>): Promise<{ node: P2PNode, addr: string }> {
  const dir = await tmpDir(`df-enc-${name}-`)
  const port = await freePort()
  const n = await createP2PNode({ logger }, { dataDir: dir.path, keyName: `${name}.key`, listen: [`/ip4/127.0.0.1/tcp/${port}`], encrypters })
  await n.handle(PROTOCOL, async (stream) => {
    for await (const chunk of stream) stream.send(chunk.subarray())
    await stream.close()
  })
  t.after(async () => {
    await n.stop()
    await dir.cleanup()
  })
  return { node: n, addr: `/ip4/127.0.0.1/tcp/${port}` }
}

async function echo (from: P2PNode, to: { node: P2PNode, addr: string }): Promise<string> {
  const stream = await from.openStream({ peerId: to.node.peerId, addrs: [to.addr] }, PROTOCOL)
  stream.send(Buffer.from('piece?'))
  await stream.close()
  let got = ''
  for await (const chunk of stream) got += Buffer.from(chunk.subarray()).toString()
  return got
}

test('a Noise-only node and a TLS-first node reach each other, whichever dials', async (t) => {
  const noiseOnly = await node(t, 'noise', ['noise'])
  const tlsFirst = await node(t, 'tls', ['tls', 'noise'])
  assert.equal(await echo(noiseOnly.node, tlsFirst), 'piece?')
  await noiseOnly.node.hangUp(tlsFirst.node.peerId)
  // The other side may still hold the closing connection for a moment: a dial then would reuse it.
  for (let waited = 0; tlsFirst.node.isConnected(noiseOnly.node.peerId); waited += 10) {
    assert.ok(waited < 5_000, 'the TLS-first node saw the connection close')
    await sleep(10)
  }
  assert.equal(await echo(tlsFirst.node, noiseOnly), 'piece?')
})

test('two TLS-first nodes still talk (pieces on libp2p streams)', async (t) => {
  const a = await node(t, 'a', ['tls', 'noise'])
  const b = await node(t, 'b', ['tls', 'noise'])
  assert.equal(await echo(a.node, b), 'piece?')
})
