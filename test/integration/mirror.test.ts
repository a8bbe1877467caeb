import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { readFile, readdir, open } from 'node:fs/promises'
import { connect } from 'node:net'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { request } from 'undici'
import { startContainerd, writeHostsToml, type TestContainerd } from '../helpers/containerd.ts'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, type TestPeer } from '../helpers/peer.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { skopeoCopyToDir, skopeoListTags, writeRegistriesConf } from '../helpers/skopeo.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir } from '../helpers/tmp.ts'

const MIB = 1024 * 1024

/**
 * One peer (with its embedded scheduler) in front of a real registry. The
 * origin is reached through a counting proxy, so "bytes from the origin" is
 * measured where the origin sends them.
 */
describe('a single peer as a registry mirror', () => {
  let registry: TestRegistry
  let origin: ThrottleProxy
  let peer: TestPeer
  let containerd: TestContainerd
  let image: BuiltImage
  let work: { path: string, cleanup: () => Promise<void> }

  before(async () => {
    work = await tmpDir('df-mirror-it-')
    registry = await startRegistry()
    origin = await startThrottleProxy({ targetPort: registry.port })
    image = await buildImage(path.join(work.path, 'image'), { layers: [3 * MIB + 12345, 5 * MIB, 200 * 1024, 16 * MIB + 7], seed: 'mirror-it', tag: 'v1' })
    await pushImage(image, `${registry.host}/team/app:v1`)
    peer = await startPeer({ registry: origin.url, name: 'mirror' })
    containerd = await startContainerd()
  })

  after(async () => {
    await containerd?.close()
    await peer?.close()
    await origin?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('containerd pulls through the peer; a second pull takes no blob bytes from the origin', async () => {
    const hosts = path.join(work.path, 'hosts')
    await writeHostsToml(hosts, origin.host, { server: origin.url, mirrors: [peer.url] })
    origin.reset()
    await containerd.fetch(`${origin.host}/team/app:v1`, { hostsDir: hosts })
    const stored = await containerd.listContent()
    for (const blob of image.blobs) assert.ok(stored.includes(blob.digest), `containerd has ${blob.digest}`)
    for (const layer of image.layers) assert.ok((await containerd.readContent(layer.digest)).equals(readBlob(image, layer.digest)))
    const coldBytes = origin.bytesDown()
    assert.ok(coldBytes >= image.totalBytes, `the cold pull came from the origin (${coldBytes} bytes)`)
    assert.ok(coldBytes < image.totalBytes * 1.05 + 64 * 1024, `…once (${coldBytes} for an image of ${image.totalBytes})`)
    const before = await peer.metrics()

    await containerd.removeAll()
    origin.reset()
    await containerd.fetch(`${origin.host}/team/app:v1`, { hostsDir: hosts })
    for (const blob of image.blobs) assert.ok((await containerd.listContent()).includes(blob.digest))
    const after = await peer.metrics()
    assert.equal(after.get('damselfly_fetched_bytes_total', { source: 'origin' }), before.get('damselfly_fetched_bytes_total', { source: 'origin' }), 'no piece came from the origin')
    // What the origin still sends: the tag's manifest and authorization HEADs, a few KiB.
    assert.ok(origin.bytesDown() < 64 * 1024, `warm pull cost the origin ${origin.bytesDown()} bytes`)
    assert.ok(after.get('damselfly_served_bytes_total', { source: 'local' }) >= image.layers.reduce((s, l) => s + l.size, 0))
  })

  test('skopeo pulls through the mirror of its registries.conf', async () => {
    const conf = path.join(work.path, 'registries.conf')
    await writeRegistriesConf(conf, { registryHost: origin.host, mirror: `127.0.0.1:${peer.port}`, insecure: true })
    const dest = path.join(work.path, 'skopeo-out')
    const fetchedBefore = (await peer.metrics()).get('damselfly_mirror_requests_total', { route: 'blob' })
    await skopeoCopyToDir(`docker://${origin.host}/team/app:v1`, dest, { registriesConf: conf })
    for (const layer of image.layers) {
      const copied = await readFile(path.join(dest, layer.digest.slice(7)))
      assert.ok(copied.equals(readBlob(image, layer.digest)), `layer ${layer.digest}`)
    }
    const fetchedAfter = (await peer.metrics()).get('damselfly_mirror_requests_total', { route: 'blob' })
    assert.ok(fetchedAfter - fetchedBefore >= image.layers.length, 'the blobs went through the mirror')
  })

  test('skopeo list-tags through the mirror sees the registry\'s tags, a new one at once', async () => {
    await pushImage(image, `${registry.host}/team/app:v2`)
    assert.deepEqual(await skopeoListTags(`docker://127.0.0.1:${peer.port}/team/app`), ['v1', 'v2'])
    await pushImage(image, `${registry.host}/team/app:v3`)
    assert.deepEqual(await skopeoListTags(`docker://127.0.0.1:${peer.port}/team/app`), ['v1', 'v2', 'v3'])
    // docker-registry 2.8 answers every tag at once (it pages only _catalog); paging through the mirror is in test/peer/mirror-app.test.ts.
    const plain = await request(`${peer.url}/v2/team/app/tags/list`)
    assert.equal(plain.statusCode, 200)
    assert.equal(plain.headers['content-type'], 'application/json; charset=utf-8')
    assert.deepEqual(await plain.body.json(), { name: 'team/app', tags: ['v1', 'v2', 'v3'] })
  })

  test('nydusd-style unaligned range reads fetch only the covering pieces from the origin', async () => {
    const fresh = await buildImage(path.join(work.path, 'lazy'), { layers: [24 * MIB + 333], seed: 'lazy-reads', tag: 'lazy' })
    await pushImage(fresh, `${registry.host}/team/lazy:lazy`)
    const layer = fresh.layers[0] as { digest: string, size: number }
    const data = readBlob(fresh, layer.digest)
    const ranges: Array<[number, number]> = [[1_234_567, 1_234_567 + MIB - 1], [7 * MIB + 5, 8 * MIB + 100], [20 * MIB - 10, 20 * MIB + 900_000]]
    const pieces = new Set<number>()
    for (const [s, e] of ranges) for (let p = Math.floor(s / MIB); p <= Math.floor(e / MIB); p++) pieces.add(p)
    origin.reset()
    const before = await peer.metrics()
    for (const [start, end] of ranges) {
      const res = await request(`${peer.url}/v2/team/lazy/blobs/${layer.digest}`, { headers: { range: `bytes=${start}-${end}`, 'x-dragonfly-registry': origin.url } })
      assert.equal(res.statusCode, 206)
      assert.equal(res.headers['content-range'], `bytes ${start}-${end}/${layer.size}`)
      const body = Buffer.from(await res.body.arrayBuffer())
      assert.ok(body.equals(data.subarray(start, end + 1)), `range ${start}-${end}`)
    }
    const after = await peer.metrics()
    const fromOrigin = after.get('damselfly_fetched_bytes_total', { source: 'origin' }) - before.get('damselfly_fetched_bytes_total', { source: 'origin' })
    assert.equal(fromOrigin, pieces.size * MIB, `exactly the ${pieces.size} covering pieces came from the origin`)
    assert.ok(origin.bytesDown() < pieces.size * MIB + 64 * 1024, `origin sent ${origin.bytesDown()} bytes, not the ${layer.size}-byte blob`)
  })

  test('a restart keeps the cache, and a corrupted piece on disk is caught and re-fetched, never served', async () => {
    const layer = image.layers[3] as { digest: string, size: number }
    const url = `${peer.url}/v2/team/app/blobs/${layer.digest}?ns=${encodeURIComponent(origin.host)}`
    await peer.stop()
    // Damage piece 5 of the cached 16 MiB layer while the peer is down.
    const file = path.join(peer.dataDir, 'blobs', 'sha256', layer.digest.slice(7), 'data')
    const fh = await open(file, 'r+')
    const byte = Buffer.alloc(1)
    await fh.read(byte, 0, 1, 5 * MIB + 77)
    await fh.write(Buffer.from([(byte[0] as number) ^ 0xff]), 0, 1, 5 * MIB + 77)
    await fh.close()
    await peer.start()

    origin.reset()
    const res = await request(url)
    assert.equal(res.statusCode, 200)
    const body = Buffer.from(await res.body.arrayBuffer())
    assert.equal(createHash('sha256').update(body).digest('hex'), layer.digest.slice(7), 'the client got the right bytes')
    const metrics = await peer.metrics()
    assert.equal(metrics.get('damselfly_piece_verification_failures_total', { source: 'local' }), 1)
    assert.equal(metrics.get('damselfly_fetched_bytes_total', { source: 'origin' }), MIB, 'only the damaged piece came from the origin again')
    assert.ok(origin.bytesDown() < MIB + 64 * 1024)

    // Everything else survived the restart.
    origin.reset()
    for (const l of image.layers.slice(0, 3)) {
      const r = await request(`${peer.url}/v2/team/app/blobs/${l.digest}?ns=${encodeURIComponent(origin.host)}`)
      assert.equal(r.statusCode, 200)
      assert.ok(Buffer.from(await r.body.arrayBuffer()).equals(readBlob(image, l.digest)))
    }
    assert.equal((await peer.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' }), MIB)
  })

  test('bad input gets a clear 4xx and harms nothing', async () => {
    const digest = image.layers[0]?.digest as string
    const raw = async (payload: string): Promise<string> => new Promise((resolve, reject) => {
      const socket = connect(peer.port, '127.0.0.1')
      let out = ''
      socket.setTimeout(5_000, () => { socket.destroy(); resolve(out) })
      socket.on('data', d => { out += d.toString('latin1') })
      socket.on('end', () => { resolve(out) })
      socket.on('close', () => { resolve(out) })
      // The server may reset after answering (it will not read a 64 KiB header); what it said still counts.
      socket.on('error', (err) => { out === '' ? reject(err) : resolve(out) })
      socket.write(payload)
    })
    const status = (text: string): number => Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0)
    assert.equal(status(await raw(`GET /v2/../../../../etc/passwd/blobs/${digest} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)) >= 400, true)
    assert.equal(status(await raw('GET /v2/team/app/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')), 400)
    assert.equal(status(await raw(`GET /v2/team/app/blobs/${digest} HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(64 * 1024)}\r\nConnection: close\r\n\r\n`)), 431)
    assert.equal(status(await raw('\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n')), 400)
    assert.equal(status(await raw(`GET /v2/team/app/blobs/${digest} HTTP/1.1\r\nHost: x\r\nX-Dragonfly-Registry: file:///etc/passwd\r\nConnection: close\r\n\r\n`)), 400)
    assert.equal(status(await raw(`GET /v2/team/app/blobs/${digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=99-1\r\nConnection: close\r\n\r\n`)), 400)
    const health = await request(`${peer.url}/healthy`)
    assert.equal(health.statusCode, 200)
    await health.body.dump()
    // Only blobs/, the keys, the remembered tags and public content, and the embedded scheduler's folder live in the data dir.
    const entries = (await readdir(peer.dataDir)).sort()
    assert.deepEqual(entries.filter(e => !['blobs', 'peer.key', 'scheduler', 'tags.json', 'public.json'].includes(e)), [])
  })
})

describe('a peer in front of a private registry', () => {
  let registry: TestRegistry
  let peer: TestPeer
  let containerd: TestContainerd
  let image: BuiltImage
  let work: { path: string, cleanup: () => Promise<void> }
  const basic = `Basic ${Buffer.from('alice:s3cret-pass').toString('base64')}`

  before(async () => {
    work = await tmpDir('df-private-it-')
    registry = await startRegistry({ auth: { username: 'alice', password: 's3cret-pass' } })
    image = await buildImage(path.join(work.path, 'image'), { layers: [2 * MIB + 99, 300 * 1024], seed: 'private-it', tag: 'v1' })
    await pushImage(image, `${registry.host}/secret/app:v1`, { creds: 'alice:s3cret-pass' })
    peer = await startPeer({ registry: registry.url, name: 'private' })
    containerd = await startContainerd()
  })

  after(async () => {
    await containerd?.close()
    await peer?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('a cached private blob is served only to callers the registry accepts', async () => {
    const hosts = path.join(work.path, 'hosts')
    await writeHostsToml(hosts, registry.host, { server: registry.url, mirrors: [peer.url] })
    await containerd.fetch(`${registry.host}/secret/app:v1`, { hostsDir: hosts, user: 'alice:s3cret-pass' })
    const layer = image.layers[0] as { digest: string }
    const url = `${peer.url}/v2/secret/app/blobs/${layer.digest}`
    const served = (await peer.metrics()).get('damselfly_served_bytes_total')

    const anonymous = await request(url)
    assert.equal(anonymous.statusCode, 401)
    assert.match(String(anonymous.headers['www-authenticate']), /^Basic realm=/)
    assert.equal((await anonymous.body.json() as { errors: Array<{ code: string }> }).errors[0]?.code, 'UNAUTHORIZED')

    const wrong = await request(url, { headers: { authorization: `Basic ${Buffer.from('alice:wrong').toString('base64')}` } })
    assert.equal(wrong.statusCode, 401)
    await wrong.body.dump()
    const head = await request(url, { method: 'HEAD' })
    assert.equal(head.statusCode, 401)
    await head.body.dump()
    assert.equal((await peer.metrics()).get('damselfly_served_bytes_total'), served, 'not a byte to the refused callers')

    const right = await request(url, { headers: { authorization: basic } })
    assert.equal(right.statusCode, 200)
    assert.ok(Buffer.from(await right.body.arrayBuffer()).equals(readBlob(image, layer.digest)))
    // Credentials never reach the logs.
    assert.equal(peer.output().includes('s3cret-pass') || peer.output().includes(basic.slice(6)), false)
  })

  test('skopeo list-tags of a private repository through the mirror needs the registry\'s credentials', async () => {
    const ref = `docker://127.0.0.1:${peer.port}/secret/app`
    assert.deepEqual(await skopeoListTags(ref, { creds: 'alice:s3cret-pass' }), ['v1'])
    await assert.rejects(skopeoListTags(ref), /unauthorized|authentication required/i)
    await assert.rejects(skopeoListTags(ref, { creds: 'alice:wrong' }), /unauthorized|authentication required|invalid username/i)
  })

  test('skopeo with credentials for the mirror pulls the private image through it', async () => {
    const conf = path.join(work.path, 'registries.conf')
    await writeRegistriesConf(conf, { registryHost: registry.host, mirror: `127.0.0.1:${peer.port}`, insecure: true })
    const before = (await peer.metrics()).get('damselfly_mirror_requests_total', { route: 'blob', status: '200' })
    await skopeoCopyToDir(`docker://${registry.host}/secret/app:v1`, path.join(work.path, 'out'), {
      registriesConf: conf,
      auths: { [`127.0.0.1:${peer.port}`]: 'alice:s3cret-pass', [registry.host]: 'alice:s3cret-pass' }
    })
    const after = (await peer.metrics()).get('damselfly_mirror_requests_total', { route: 'blob', status: '200' })
    assert.ok(after - before >= image.layers.length, 'blobs came through the mirror')
  })
})
