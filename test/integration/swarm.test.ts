import assert from 'node:assert/strict'
import { createHash, createSecretKey } from 'node:crypto'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as delay } from 'node:timers/promises'
import { request } from 'undici'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir } from '../helpers/tmp.ts'

const MIB = 1024 * 1024

interface Pulled { digest: string, sha256: string, bytes: number }

/** What containerd does through a mirror: the tag's manifest, then every blob by digest, with ?ns=. */
async function pull (peer: TestPeer, origin: ThrottleProxy, repo: string, image: BuiltImage, tag = image.tag): Promise<{ manifestDigest: string, blobs: Pulled[], stale: boolean }> {
  const ns = `ns=${encodeURIComponent(origin.host)}`
  const res = await request(`${peer.url}/v2/${repo}/manifests/${tag}?${ns}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json' } })
  const body = Buffer.from(await res.body.arrayBuffer())
  assert.equal(res.statusCode, 200, `manifest of ${repo}:${tag} from ${peer.name}: ${body.toString()}`)
  const blobs = await Promise.all([image.config, ...image.layers].map(async (b): Promise<Pulled> => {
    const r = await request(`${peer.url}/v2/${repo}/blobs/${b.digest}?${ns}`)
    const hash = createHash('sha256')
    let bytes = 0
    for await (const chunk of r.body) {
      hash.update(chunk as Buffer)
      bytes += (chunk as Buffer).length
    }
    assert.equal(r.statusCode, 200, `${b.digest} from ${peer.name}`)
    return { digest: b.digest, sha256: `sha256:${hash.digest('hex')}`, bytes }
  }))
  return { manifestDigest: String(res.headers['docker-content-digest']), blobs, stale: res.headers.warning !== undefined }
}

function assertIntact (pulled: { blobs: Pulled[] }, image: BuiltImage, who: string): void {
  for (const b of pulled.blobs) {
    assert.equal(b.sha256, b.digest, `${who}: ${b.digest} intact`)
    assert.equal(b.bytes, image.blobs.find(x => x.digest === b.digest)?.size, `${who}: ${b.digest} complete`)
  }
}

async function schedulerTasks (scheduler: TestScheduler): Promise<Array<{ digest: string, completeHolders: string[], partialHolders: unknown[] }>> {
  const res = await request(`${scheduler.httpUrl}/api/v1/tasks`)
  return await res.body.json() as Array<{ digest: string, completeHolders: string[], partialHolders: unknown[] }>
}

describe('a swarm of peers', () => {
  let registry: TestRegistry
  let origin: ThrottleProxy
  let scheduler: TestScheduler
  let work: { path: string, cleanup: () => Promise<void> }
  const peers: TestPeer[] = []

  before(async () => {
    work = await tmpDir('df-swarm-it-')
    registry = await startRegistry()
    origin = await startThrottleProxy({ targetPort: registry.port, bytesPerSecond: 30 * MIB })
    scheduler = await startScheduler()
  })

  after(async () => {
    await Promise.allSettled(peers.map(async p => { await p.close() }))
    await scheduler?.close()
    await origin?.close()
    await registry?.close()
    await work?.cleanup()
  })

  async function newPeers (n: number, options: { seed?: boolean, env?: NodeJS.ProcessEnv, args?: string[], prefix?: string } = {}): Promise<TestPeer[]> {
    const started = await Promise.all(Array.from({ length: n }, async (_, i) => startPeer({
      registry: origin.url,
      scheduler: scheduler.address,
      name: `${options.prefix ?? 'peer'}-${peers.length + i}`,
      ...(options.seed === true ? { seed: true } : {}),
      ...(options.env === undefined ? {} : { env: options.env }),
      ...(options.args === undefined ? {} : { args: options.args })
    })))
    peers.push(...started)
    return started
  }

  async function image (name: string, layers: number[]): Promise<BuiltImage> {
    const built = await buildImage(path.join(work.path, name), { layers, seed: name, tag: 'v1' })
    await pushImage(built, `${registry.host}/swarm/${name}:v1`)
    return built
  }

  test('six cold pulls at once cost the origin about one copy; most bytes come from peers', async () => {
    const img = await image('six', [12 * MIB, 20 * MIB + 4321, 8 * MIB, 300 * 1024])
    const six = await newPeers(6)
    origin.reset()
    const pulls = await Promise.all(six.map(async p => pull(p, origin, 'swarm/six', img)))
    pulls.forEach((pulled, i) => { assertIntact(pulled, img, six[i]?.name ?? '') })
    const sent = origin.bytesDown()
    assert.ok(sent <= img.totalBytes * 1.1, `origin sent ${sent} bytes for a ${img.totalBytes}-byte image pulled 6 times (${(sent / img.totalBytes).toFixed(2)}×)`)
    let fromPeers = 0
    let fromOrigin = 0
    let overHttp = 0
    for (const p of six) {
      const m = await p.metrics()
      fromPeers += m.get('damselfly_fetched_bytes_total', { source: 'peer' })
      fromOrigin += m.get('damselfly_fetched_bytes_total', { source: 'origin' })
      overHttp += m.get('damselfly_uploaded_bytes_total', { transport: 'http' })
    }
    assert.ok(fromPeers > 4 * fromOrigin, `peers supplied ${fromPeers} bytes, the origin ${fromOrigin}`)
    // Hedged duplicates may be sent and dropped, so uploads can exceed what children kept.
    assert.ok(overHttp >= fromPeers, `${overHttp} bytes went over upload ports for ${fromPeers} bytes children took from peers`)
    // Pieces from peers land in buffers that go round again once the disk write and the client's socket are done with them.
    let reused = 0
    for (const p of six) reused += (await p.metrics()).get('damselfly_piece_buffers', { count: 'reused' })
    assert.ok(reused > 0, 'receive buffers were reused')
  })

  test('with a seed up, the seed is the one that goes to the origin', async () => {
    const img = await image('seeded', [16 * MIB, 6 * MIB + 17])
    const [seed] = await newPeers(1, { seed: true, prefix: 'seed' })
    const four = await newPeers(4)
    origin.reset()
    const pulls = await Promise.all(four.map(async p => pull(p, origin, 'swarm/seeded', img)))
    pulls.forEach((pulled, i) => { assertIntact(pulled, img, four[i]?.name ?? '') })
    const originByPeer = await Promise.all([seed as TestPeer, ...four].map(async p => `${p.name}=${(await p.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' })}`))
    assert.ok(origin.bytesDown() <= img.totalBytes * 1.1, `origin sent ${origin.bytesDown()} for ${img.totalBytes} (${originByPeer.join(' ')})`)
    const seedMetrics = await (seed as TestPeer).metrics()
    const layerBytes = img.layers.reduce((s, l) => s + l.size, 0)
    assert.ok(seedMetrics.get('damselfly_fetched_bytes_total', { source: 'origin' }) >= layerBytes, `the seed fetched the layers from the origin (${originByPeer.join(' ')})`)
    let peersFromOrigin = 0
    for (const p of four) peersFromOrigin += (await p.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' })
    assert.ok(peersFromOrigin <= 2 * MIB, `ordinary peers fetched ${peersFromOrigin} bytes from the origin`)
  })

  test('with pieces on libp2p streams instead of the upload port, peers still share every byte', async () => {
    const img = await image('streams', [9 * MIB + 123])
    const [a, b] = await newPeers(2, { args: ['--piece-transport', 'libp2p'], prefix: 'streams' })
    // Peers from earlier tests (a seed among them) may serve pieces too: count uploads swarm-wide.
    const uploads = async (transport: string): Promise<number> => (await Promise.all(peers.map(async p => (await p.metrics()).get('damselfly_uploaded_bytes_total', { transport })))).reduce((x, y) => x + y, 0)
    assertIntact(await pull(a as TestPeer, origin, 'swarm/streams', img), img, 'a')
    const [httpBefore, streamsBefore] = [await uploads('http'), await uploads('libp2p')]
    assertIntact(await pull(b as TestPeer, origin, 'swarm/streams', img), img, 'b')
    const bm = await (b as TestPeer).metrics()
    const blobBytes = img.config.size + (img.layers[0]?.size ?? 0)
    assert.equal(bm.get('damselfly_fetched_bytes_total', { source: 'peer' }), blobBytes, 'b got config and layer from peers')
    assert.equal(bm.get('damselfly_fetched_bytes_total', { source: 'origin' }), 0)
    assert.equal(await uploads('http') - httpBefore, 0, 'no upload port was used')
    assert.ok(await uploads('libp2p') - streamsBefore >= blobBytes, 'every byte b took went over libp2p streams')
  })

  test('a parent killed in the middle of serving: the pull still succeeds with correct bytes', async () => {
    const img = await image('killed', [40 * MIB])
    // A parent that uploads slowly, so there is time to kill it mid-transfer.
    const [parent] = await newPeers(1, { args: ['--upload-rate-limit', '8MiB'], prefix: 'slow-parent' })
    await pull(parent as TestPeer, origin, 'swarm/killed', img)
    const [child] = await newPeers(1, { prefix: 'orphan' })
    const pulling = pull(child as TestPeer, origin, 'swarm/killed', img)
    await waitFor(async () => ((await (child as TestPeer).metrics()).get('damselfly_fetched_bytes_total', { source: 'peer' })) >= 4 * MIB, { timeoutMs: 20_000, what: 'the child to be fetching from its parent' })
    await (parent as TestPeer).kill()
    const pulled = await pulling
    assertIntact(pulled, img, 'the orphaned child')
  })

  test('a peer serving corrupted pieces never gets a bad byte to a client, and is barred once two children say so', async () => {
    const img = await image('liar', [10 * MIB + 55])
    const [liar] = await newPeers(1, { env: { DAMSELFLY_TEST_FAULTS: 'corrupt-pieces' }, prefix: 'liar' })
    await pull(liar as TestPeer, origin, 'swarm/liar', img)
    // One child's word does not bar a parent swarm-wide (a lying member could bar anyone): it takes two.
    const [first, second] = await newPeers(2, { prefix: 'victim' })
    assertIntact(await pull(first as TestPeer, origin, 'swarm/liar', img), img, 'the first victim')
    const schedulerMetrics = async (): Promise<string> => (await request(`${scheduler.httpUrl}/metrics`)).body.text()
    assert.match(await schedulerMetrics(), /damselfly_scheduler_parents_barred_total 0/, 'one report bars nobody')
    assertIntact(await pull(second as TestPeer, origin, 'swarm/liar', img), img, 'the second victim')
    for (const victim of [first, second]) {
      const m = await (victim as TestPeer).metrics()
      assert.ok(m.get('damselfly_parents_barred_total') >= 1, `${victim?.name ?? ''} barred the liar`)
      assert.ok(m.get('damselfly_peer_pieces_rejected_total') >= 1, 'the bad piece was rejected')
    }
    assert.match(await schedulerMetrics(), /damselfly_scheduler_parents_barred_total [1-9]/)
    // And no one else is sent to the liar any more.
    const hosts = await (await request(`${scheduler.httpUrl}/api/v1/hosts`)).body.json() as Array<{ hostname: string, barred: boolean, peerId: string }>
    assert.ok(hosts.some(h => h.barred), 'the scheduler lists the liar as barred')
  })

  test('the scheduler killed and restarted during pulls: pulls succeed and it learns again who holds what', async () => {
    const img = await image('restart', [30 * MIB, 10 * MIB])
    const three = await newPeers(3)
    origin.reset()
    const pulls = Promise.all(three.map(async p => pull(p, origin, 'swarm/restart', img)))
    await delay(400)
    await scheduler.kill()
    await delay(1_000)
    await scheduler.start()
    const done = await pulls
    done.forEach((pulled, i) => { assertIntact(pulled, img, three[i]?.name ?? '') })
    const layer = img.layers[0]?.digest as string
    // Each of the three re-announced what it holds (other peers of this suite may hold it too).
    const ids = three.map(p => /"peerId":"([^"]+)"[^\n]*"swarm started"/.exec(p.output())?.[1])
    assert.ok(ids.every(id => id !== undefined), 'every peer logged its id')
    await waitFor(async () => {
      const holders = (await schedulerTasks(scheduler)).find(t => t.digest === layer)?.completeHolders ?? []
      return ids.every(id => holders.includes(id as string))
    }, {
      timeoutMs: 15_000,
      what: 'the restarted scheduler to learn the three holders again'
    })
  })

  test('with the origin down, a new peer still pulls a public image from the swarm, its tag answered stale', async () => {
    const img = await image('outage', [9 * MIB, 3 * MIB])
    const warm = await newPeers(2)
    for (const p of warm) assertIntact(await pull(p, origin, 'swarm/outage', img), img, p.name)
    origin.setDown(true)
    try {
      const [late] = await newPeers(1, { prefix: 'late' })
      const pulled = await pull(late as TestPeer, origin, 'swarm/outage', img)
      assert.equal(pulled.manifestDigest, img.manifest.digest)
      assert.equal(pulled.stale, true, 'the tag is marked as answered from memory')
      assertIntact(pulled, img, 'the late peer')
      assert.equal((await (late as TestPeer).metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' }), 0)
    } finally {
      origin.setDown(false)
    }
  })
})

describe('cluster membership and credentials', () => {
  let registry: TestRegistry
  let scheduler: TestScheduler
  let work: { path: string, cleanup: () => Promise<void> }
  const peers: TestPeer[] = []
  const secret = 'correct horse battery staple'

  before(async () => {
    work = await tmpDir('df-secret-it-')
    registry = await startRegistry({ auth: { username: 'bob', password: 'p4ss-word-bob' } })
    scheduler = await startScheduler({ args: ['--cluster-secret', secret] })
  })

  after(async () => {
    await Promise.allSettled(peers.map(async p => { await p.close() }))
    await scheduler?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('a node without the cluster secret cannot join; members share private blobs without sharing credentials', async () => {
    const img = await buildImage(path.join(work.path, 'img'), { layers: [5 * MIB + 3], seed: 'members', tag: 'v1' })
    await pushImage(img, `${registry.host}/team/private:v1`, { creds: 'bob:p4ss-word-bob' })
    const a = await startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'member-a', args: ['--cluster-secret', secret] })
    const b = await startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'member-b', args: ['--cluster-secret', secret] })
    const stranger = await startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'stranger', args: ['--cluster-secret', 'not the right secret at all'] })
    peers.push(a, b, stranger)
    const layer = img.layers[0]?.digest as string
    const auth = { authorization: `Basic ${Buffer.from('bob:p4ss-word-bob').toString('base64')}` }
    const get = async (p: TestPeer): Promise<Buffer> => {
      const r = await request(`${p.url}/v2/team/private/blobs/${layer}`, { headers: auth })
      assert.equal(r.statusCode, 200)
      return Buffer.from(await r.body.arrayBuffer())
    }
    assert.ok((await get(a)).equals(readBlob(img, layer)))
    assert.ok((await get(b)).equals(readBlob(img, layer)))
    assert.equal((await b.metrics()).get('damselfly_fetched_bytes_total', { source: 'peer' }), img.layers[0]?.size, 'b got the layer from a')
    assert.ok((await get(stranger)).equals(readBlob(img, layer)), 'the stranger still works alone, from the origin')
    assert.equal((await stranger.metrics()).get('damselfly_fetched_bytes_total', { source: 'peer' }), 0)
    const hosts = await (await request(`${scheduler.httpUrl}/api/v1/hosts`)).body.json() as unknown[]
    assert.equal(hosts.length, 2, 'only the two members joined')
    // The upload port answers only requests signed with the secret, whoever can reach it.
    const piecePath = `/damselfly/v1/pieces/${layer}/0?wait=0`
    const unsigned = await request(`http://127.0.0.1:${a.uploadPort}${piecePath}`)
    assert.equal(unsigned.statusCode, 401)
    await unsigned.body.dump()
    const { authorizationFor } = await import('../../peer/swarm/piece-http.ts')
    const aId = String(unsigned.headers['x-damselfly-peer'])
    const forged = await request(`http://127.0.0.1:${a.uploadPort}${piecePath}`, {
      headers: { authorization: authorizationFor(createSecretKey(Buffer.from('not the right secret at all')), 'someone', aId, { digest: layer, index: 0, waitMs: 0 }) }
    })
    assert.equal(forged.statusCode, 401)
    await forged.body.dump()
    const signed = await request(`http://127.0.0.1:${a.uploadPort}${piecePath}`, {
      headers: { authorization: authorizationFor(createSecretKey(Buffer.from(secret)), 'someone', aId, { digest: layer, index: 0, waitMs: 0 }) }
    })
    assert.equal(signed.statusCode, 200)
    assert.ok(Buffer.from(await signed.body.arrayBuffer()).equals(readBlob(img, layer).subarray(0, MIB)))
    for (const text of [scheduler.output(), a.output(), b.output()]) {
      assert.equal(text.includes('p4ss-word-bob') || text.includes(auth.authorization.slice(6)), false, 'no credential in any log')
    }
  })
})
