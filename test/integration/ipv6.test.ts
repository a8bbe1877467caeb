import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { request } from 'undici'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { tmpDir } from '../helpers/tmp.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'

const MIB = 1024 * 1024

// Every damselfly port on IPv6 (::1): the scheduler's libp2p and HTTP ports,
// each peer's mirror, p2p and upload ports. The origin stays on 127.0.0.1: a
// peer on an IPv6 network may still reach its registry over IPv4.

describe('a swarm over IPv6', () => {
  let registry: TestRegistry
  let scheduler: TestScheduler
  let image: BuiltImage
  let work: { path: string, cleanup: () => Promise<void> }
  const peers: TestPeer[] = []

  before(async () => {
    work = await tmpDir('df-ipv6-it-')
    registry = await startRegistry()
    image = await buildImage(path.join(work.path, 'image'), { layers: [6 * MIB + 7], seed: 'ipv6', tag: 'v1' })
    await pushImage(image, `${registry.host}/v6/app:v1`)
    scheduler = await startScheduler({ host: '::1' })
  })

  after(async () => {
    for (const p of peers) await p.close()
    await scheduler?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('a peer takes a blob from another over ::1, through its mirror on ::1', async () => {
    const layer = image.layers[0] as { digest: string, size: number }
    for (const name of ['v6-first', 'v6-second']) peers.push(await startPeer({ registry: registry.url, scheduler: scheduler.address, host: '::1', name }))
    const [first, second] = peers as [TestPeer, TestPeer]
    assert.match(first.url, /^http:\/\/\[::1\]:\d+$/)
    const hosts = await (await request(`${scheduler.httpUrl}/api/v1/hosts`)).body.json() as Array<{ addrs: string[] }>
    assert.ok(hosts.length === 2 && hosts.every(h => h.addrs.every(a => a.startsWith('/ip6/::1/'))), `hosts announce IPv6 addresses: ${JSON.stringify(hosts.map(h => h.addrs))}`)
    for (const p of [first, second]) {
      const res = await request(`${p.url}/v2/v6/app/blobs/${layer.digest}`)
      const body = Buffer.from(await res.body.arrayBuffer())
      assert.equal(res.statusCode, 200)
      assert.equal(`sha256:${createHash('sha256').update(body).digest('hex')}`, layer.digest)
      assert.ok(body.equals(readBlob(image, layer.digest)))
    }
    const m = await second.metrics()
    assert.ok(m.get('damselfly_fetched_bytes_total', { source: 'peer' }) >= layer.size, 'the second peer took the blob from the first, over ::1')
    assert.equal(m.get('damselfly_fetched_bytes_total', { source: 'origin' }), 0)
  })
})
