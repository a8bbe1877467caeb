import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { request } from 'undici'
import { buildImage, pushImage, type BuiltBlob } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

// Scheduler replicas, as real processes: a peer given `--scheduler a,b` is in
// session with one; when that one is killed, the peer registers with the other
// within seconds and announces what it holds, so the swarm still serves the blob
// from the peer and the origin is not asked for it again.

const MIB = 1024 * 1024

interface HostView { peerId: string, tasks: number }
interface TaskView { digest: string, completeHolders: string[] }

async function hosts (scheduler: TestScheduler): Promise<HostView[]> {
  const res = await request(`${scheduler.httpUrl}/api/v1/hosts`, { signal: AbortSignal.timeout(2_000) })
  return await res.body.json() as HostView[]
}

async function holders (scheduler: TestScheduler, digest: string): Promise<string[]> {
  const res = await request(`${scheduler.httpUrl}/api/v1/tasks`, { signal: AbortSignal.timeout(2_000) })
  return (await res.body.json() as TaskView[]).find(t => t.digest === digest)?.completeHolders ?? []
}

/** The blob through a peer's mirror, as containerd asks for it; its digest checked. */
async function pullBlob (peer: TestPeer, origin: ThrottleProxy, repo: string, blob: BuiltBlob): Promise<void> {
  const res = await request(`${peer.url}/v2/${repo}/blobs/${blob.digest}?ns=${encodeURIComponent(origin.host)}`, { signal: AbortSignal.timeout(60_000) })
  const hash = createHash('sha256')
  let bytes = 0
  for await (const chunk of res.body) {
    hash.update(chunk as Buffer)
    bytes += (chunk as Buffer).length
  }
  assert.equal(res.statusCode, 200, `${blob.digest} from ${peer.name}`)
  assert.equal(bytes, blob.size, `${peer.name}: the whole blob`)
  assert.equal(`sha256:${hash.digest('hex')}`, blob.digest, `${peer.name}: the blob intact`)
}

describe('scheduler replicas: a peer moves to another when its scheduler dies', () => {
  let work: TmpDir
  let registry: TestRegistry
  let origin: ThrottleProxy
  const schedulers: TestScheduler[] = []
  const peers: TestPeer[] = []

  before(async () => {
    work = await tmpDir('df-failover-it-')
    registry = await startRegistry()
    origin = await startThrottleProxy({ targetPort: registry.port })
    schedulers.push(await startScheduler(), await startScheduler())
  })

  after(async () => {
    await Promise.allSettled(peers.map(async p => { await p.close() }))
    await Promise.allSettled(schedulers.map(async s => { await s.close() }))
    await origin?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('killed, its peer registers with the other within seconds with its holdings, and a second peer takes the blob from it', async (t) => {
    const image = await buildImage(path.join(work.path, 'app'), { layers: [6 * MIB + 4321], seed: 'failover', tag: 'v1' })
    await pushImage(image, `${registry.host}/failover/app:v1`)
    const blob = image.layers[0] as BuiltBlob
    const list = schedulers.map(s => s.address).join(',')

    const first = await startPeer({ registry: origin.url, scheduler: list, name: 'peer-a' })
    peers.push(first)
    // It starts at a random replica: find which from the replicas' own lists.
    let home: TestScheduler | undefined
    let peerId = ''
    await waitFor(async () => {
      for (const s of schedulers) {
        const [host] = await hosts(s)
        if (host !== undefined) {
          home = s
          peerId = host.peerId
        }
      }
      return home !== undefined
    }, { timeoutMs: 10_000, what: 'peer-a to register with one of the schedulers' })
    const other = schedulers.find(s => s !== home) as TestScheduler
    assert.ok(home !== undefined)
    assert.deepEqual(await hosts(other), [], 'peer-a is in session with one replica only')

    origin.reset()
    await pullBlob(first, origin, 'failover/app', blob)
    assert.ok(origin.bytesDown() >= blob.size, 'the first pull came from the origin')
    await waitFor(async () => (await holders(home as TestScheduler, blob.digest)).includes(peerId), { timeoutMs: 10_000, what: 'peer-a to announce the blob to its scheduler' })

    await home.kill()
    const killedAt = Date.now()
    await waitFor(async () => (await hosts(other)).some(h => h.peerId === peerId) && (await holders(other, blob.digest)).includes(peerId), {
      timeoutMs: 15_000,
      intervalMs: 50,
      what: 'peer-a to register with the surviving scheduler and re-announce the blob'
    })
    const tookMs = Date.now() - killedAt
    assert.ok(tookMs < 5_000, `peer-a was back in the swarm ${tookMs} ms after its scheduler died`)
    t.diagnostic(`peer-a registered with the surviving scheduler, holdings included, ${tookMs} ms after the kill`)
    assert.match(first.output(), /lost the scheduler; moving to the next one/)

    // A second peer with the same list: the dead replica is passed over, and the blob comes from peer-a.
    origin.reset()
    const second = await startPeer({ registry: origin.url, scheduler: list, name: 'peer-b' })
    peers.push(second)
    await waitFor(async () => (await hosts(other)).length === 2, { timeoutMs: 10_000, what: 'peer-b to register with the surviving scheduler' })
    await pullBlob(second, origin, 'failover/app', blob)
    const m = await second.metrics()
    assert.equal(m.get('damselfly_fetched_bytes_total', { source: 'origin' }), 0, 'peer-b took nothing from the origin')
    assert.equal(m.get('damselfly_fetched_bytes_total', { source: 'peer' }), blob.size, 'peer-b took the whole blob from peer-a')
    assert.ok(origin.bytesDown() < 64 * 1024, `the origin sent ${origin.bytesDown()} bytes for the second pull (the blob is ${blob.size})`)
    t.diagnostic(`second pull: ${origin.connections()} origin connections, ${origin.bytesDown()} bytes from the origin, ${blob.size} from peer-a`)
  })
})
