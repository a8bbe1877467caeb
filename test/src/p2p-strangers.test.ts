import assert from 'node:assert/strict'
import { test, type TestContext } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { silentLogger } from '../../src/logger.ts'
import { createP2PNode, type P2PNode } from '../../src/p2p/index.ts'
import { freePort } from '../helpers/ports.ts'
import { tmpDir } from '../helpers/tmp.ts'

// A node with a cluster secret closes a connection that has not joined the
// cluster within 10 s of opening: a stranger that connects and idles must not
// keep a connection slot for the socket idle limit (5 min).

const logger = silentLogger()

async function node (t: TestContext, name: string, clusterSecret: string | undefined, listen: boolean): Promise<{ node: P2PNode, addr: string }> {
  const dir = await tmpDir(`df-strangers-${name}-`)
  const port = await freePort()
  const addr = `/ip4/127.0.0.1/tcp/${port}`
  const n = await createP2PNode({ logger }, { dataDir: dir.path, keyName: `${name}.key`, listen: listen ? [addr] : [], clusterSecret })
  t.after(async () => {
    await n.stop()
    await dir.cleanup()
  })
  return { node: n, addr }
}

test('a connection that never joins is closed after 10 s; a member\'s stays', async (t) => {
  const guarded = await node(t, 'guarded', 'the cluster secret', true)
  // Without a secret a node joins nothing: its connection stays a stranger's.
  const stranger = await node(t, 'stranger', undefined, false)
  const member = await node(t, 'member', 'the cluster secret', false)
  const target = { peerId: guarded.node.peerId, addrs: [guarded.addr] }
  const started = Date.now()
  await stranger.node.connect(target)
  await member.node.connect(target)
  assert.ok(guarded.node.isConnected(stranger.node.peerId))
  while (guarded.node.isConnected(stranger.node.peerId)) {
    assert.ok(Date.now() - started < 15_000, 'the stranger\'s connection was closed within 15 s')
    await sleep(100)
  }
  const closedAfter = Date.now() - started
  assert.ok(closedAfter >= 9_000, `closed after ${closedAfter} ms, not before the grace of 10 s`)
  await sleep(1_000)
  assert.ok(guarded.node.isConnected(member.node.peerId), 'the member is still connected')
})
