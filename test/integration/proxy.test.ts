import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { Agent, ProxyAgent, request } from 'undici'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { freePort } from '../helpers/ports.ts'
import { run, waitFor } from '../helpers/process.ts'
import { makeTestCa, makeTestCert, startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir } from '../helpers/tmp.ts'

const MIB = 1024 * 1024

function sha256 (data: Buffer): string {
  return createHash('sha256').update(data).digest('hex')
}

/**
 * The peer as a forward proxy, the way current nydusd (`proxy.url`), curl -x
 * and HTTP_PROXY clients use it, and as a header-less mirror on one port per
 * registry, the way current nydus-snapshotter uses it. Origins: one real
 * registry over plain http, one over https with a test CA; each behind a
 * counting relay so "bytes from the origin" is measured at the origin.
 */
describe('proxy mode and header-less mirrors', () => {
  let work: { path: string, cleanup: () => Promise<void> }
  let plain: TestRegistry
  let secure: TestRegistry
  let plainOrigin: ThrottleProxy
  let secureOrigin: ThrottleProxy
  let scheduler: TestScheduler
  let peer: TestPeer
  let originCert: string
  let interceptCa: { cert: string, key: string }
  let plainImage: BuiltImage
  let secureImage: BuiltImage
  let securePort: number
  const closers: Array<() => Promise<void>> = []

  before(async () => {
    work = await tmpDir('df-proxy-it-')
    const certs = await makeTestCert(path.join(work.path, 'origin-tls'))
    originCert = await readFile(certs.cert, 'utf8')
    interceptCa = await makeTestCa(path.join(work.path, 'intercept'), 'damselfly-test-intercept-ca')
    plain = await startRegistry()
    secure = await startRegistry({ tls: certs })
    plainOrigin = await startThrottleProxy({ targetPort: plain.port })
    secureOrigin = await startThrottleProxy({ targetPort: secure.port, scheme: 'https' })
    plainImage = await buildImage(path.join(work.path, 'plain'), { layers: [6 * MIB + 4321, 2 * MIB], seed: 'proxy-plain', tag: 'v1' })
    secureImage = await buildImage(path.join(work.path, 'secure'), { layers: [9 * MIB + 777, 3 * MIB + 5], seed: 'proxy-secure', tag: 'v1' })
    await pushImage(plainImage, `${plain.host}/team/plain:v1`)
    await pushImage(secureImage, `${secure.host}/team/secure:v1`, { tlsVerify: false })
    scheduler = await startScheduler()
    securePort = await freePort()
    peer = await startPeer({
      registry: plainOrigin.url,
      scheduler: scheduler.address,
      name: 'proxy',
      args: [
        '--registries', secureOrigin.url,
        '--origin-ca', certs.cert,
        '--proxy-ca-cert', interceptCa.cert,
        '--proxy-ca-key', interceptCa.key,
        '--proxy-intercept', secureOrigin.host,
        '--mirrors', `${securePort}=${secureOrigin.url}`
      ]
    })
  })

  after(async () => {
    for (const close of closers.reverse()) await close().catch(() => {})
    await peer?.close()
    await scheduler?.close()
    await secureOrigin?.close()
    await plainOrigin?.close()
    await secure?.close()
    await plain?.close()
    await work?.cleanup()
  })

  function proxyAgent (tls: { ca?: string, rejectUnauthorized?: boolean } = {}): ProxyAgent {
    const agent = new ProxyAgent({ uri: peer.url, requestTls: tls })
    closers.push(async () => { await agent.close() })
    return agent
  }

  test('absolute-form requests: blobs through the piece cache, everything else forwarded as it is', async () => {
    const agent = proxyAgent()
    const layer = plainImage.layers[0] as { digest: string, size: number }
    plainOrigin.reset()
    const res = await request(`${plainOrigin.url}/v2/team/plain/blobs/${layer.digest}`, { dispatcher: agent })
    assert.equal(res.statusCode, 200)
    assert.equal(res.headers['docker-content-digest'], layer.digest)
    assert.equal(sha256(Buffer.from(await res.body.arrayBuffer())), layer.digest.slice(7))
    // The manifest by tag is not ours to cache: it is forwarded and comes back byte for byte.
    const manifest = await request(`${plainOrigin.url}/v2/team/plain/manifests/v1`, { dispatcher: agent, headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })
    assert.equal(manifest.statusCode, 200)
    assert.equal(sha256(Buffer.from(await manifest.body.arrayBuffer())), plainImage.manifest.digest.slice(7))
    const firstBytes = plainOrigin.bytesDown()
    assert.ok(firstBytes >= layer.size, 'the cold blob came from the origin')

    // curl -x is another real proxy client; the blob is now served from the cache.
    plainOrigin.reset()
    const out = path.join(work.path, 'curl-blob')
    await run('curl', ['-sSf', '-x', peer.url, '-o', out, `${plainOrigin.url}/v2/team/plain/blobs/${layer.digest}`], { timeoutMs: 60_000 })
    assert.equal(sha256(await readFile(out)), layer.digest.slice(7))
    assert.ok(plainOrigin.bytesDown() < 64 * 1024, `the second read took no blob bytes from the origin (${plainOrigin.bytesDown()})`)
    const metrics = await peer.metrics()
    assert.ok(metrics.get('damselfly_proxy_requests_total', { kind: 'swarm' }) >= 2)
    assert.ok(metrics.get('damselfly_proxy_requests_total', { kind: 'forward' }) >= 1)
  })

  test('CONNECT to an intercepted https registry: answered with the operator CA, blobs served from the cache', async () => {
    // The client trusts only the interception CA: it can only succeed if the peer answered the tunnel.
    const agent = proxyAgent({ ca: await readFile(interceptCa.cert, 'utf8') })
    const layer = secureImage.layers[0] as { digest: string, size: number }
    secureOrigin.reset()
    const before = await peer.metrics()
    const res = await request(`${secureOrigin.url}/v2/team/secure/blobs/${layer.digest}`, { dispatcher: agent, headers: { range: 'bytes=1000-2097151' } })
    assert.equal(res.statusCode, 206)
    assert.equal(res.headers['content-range'], `bytes 1000-2097151/${layer.size}`)
    const body = Buffer.from(await res.body.arrayBuffer())
    assert.ok(body.equals(readBlob(secureImage, layer.digest).subarray(1000, 2097152)))
    // A range read asks the origin for the covering pieces only.
    assert.ok(secureOrigin.bytesDown() < 2 * MIB + 256 * 1024, `origin sent ${secureOrigin.bytesDown()} bytes for a 2 MiB range`)
    const tags = await request(`${secureOrigin.url}/v2/team/secure/tags/list`, { dispatcher: agent })
    assert.equal(tags.statusCode, 200)
    assert.deepEqual((await tags.body.json() as { tags: string[] }).tags, ['v1'])
    const after = await peer.metrics()
    assert.ok(after.get('damselfly_proxy_requests_total', { kind: 'intercept' }) > before.get('damselfly_proxy_requests_total', { kind: 'intercept' }))

    const out = path.join(work.path, 'curl-secure')
    await run('curl', ['-sSf', '-x', peer.url, '--cacert', interceptCa.cert, '-o', out, `${secureOrigin.url}/v2/team/secure/blobs/${layer.digest}`], { timeoutMs: 60_000 })
    assert.equal(sha256(await readFile(out)), layer.digest.slice(7))
  })

  test('CONNECT to any other host is a byte-for-byte tunnel', async () => {
    // Trusting only the origin's own certificate: an intercepted tunnel would fail the handshake.
    const agent = proxyAgent({ ca: originCert })
    const layer = secureImage.layers[1] as { digest: string, size: number }
    const before = await peer.metrics()
    const res = await request(`${secure.url}/v2/team/secure/blobs/${layer.digest}`, { dispatcher: agent })
    assert.equal(res.statusCode, 200)
    assert.equal(sha256(Buffer.from(await res.body.arrayBuffer())), layer.digest.slice(7))
    const after = await peer.metrics()
    assert.equal(after.get('damselfly_proxy_requests_total', { kind: 'tunnel' }), before.get('damselfly_proxy_requests_total', { kind: 'tunnel' }) + 1)
    assert.equal(after.get('damselfly_proxy_requests_total', { kind: 'swarm' }), before.get('damselfly_proxy_requests_total', { kind: 'swarm' }), 'nothing went through the cache')
    // And the interception CA is not what that host presented.
    const wrong = proxyAgent({ ca: await readFile(interceptCa.cert, 'utf8') })
    await assert.rejects(request(`${secure.url}/v2/`, { dispatcher: wrong }))
  })

  test('a replay of nydusd proxy mode: priority 6 ranges interleaved with a priority 3 stream prefetch; the whole blob ends up in the swarm', async () => {
    const [onDemand, streamed] = secureImage.layers as unknown as [{ digest: string, size: number }, { digest: string, size: number }]
    // nydusd with use_http: https rewritten to http in the URL; the peer knows the registry is https.
    const base = `http://${secureOrigin.host}/v2/team/secure/blobs/`
    const agent = proxyAgent()
    const onDemandBytes = readBlob(secureImage, onDemand.digest)
    const streamedBytes = readBlob(secureImage, streamed.digest)
    // Unaligned ~1 MiB reads at compressed offsets, as nydusd's amplified FUSE reads are.
    const offsets = [5 * MIB + 12345, 123, 8 * MIB + 999, 2 * MIB + 77, 7 * MIB + 4097, 3 * MIB + 31]
    const ranged = offsets.map(async (start) => {
      const end = Math.min(start + MIB + 333, onDemand.size) - 1
      const res = await request(`${base}${onDemand.digest}`, {
        dispatcher: agent,
        headers: { range: `bytes=${start}-${end}`, 'x-dragonfly-priority': '6', 'x-dragonfly-use-p2p': 'true', 'x-dragonfly-prefetch': 'true', 'user-agent': 'nydusd/1.0.0' }
      })
      assert.equal(res.statusCode, 206)
      const body = Buffer.from(await res.body.arrayBuffer())
      assert.ok(body.equals(onDemandBytes.subarray(start, end + 1)), `bytes ${start}-${end}`)
    })
    // Stream prefetch: one range-less GET, then an open-ended one from where a retry would resume.
    const stream = (async () => {
      const res = await request(`${base}${streamed.digest}`, { dispatcher: agent, headers: { 'x-dragonfly-priority': '3', 'x-dragonfly-use-p2p': 'true', 'user-agent': 'nydusd/1.0.0' } })
      assert.equal(res.statusCode, 200)
      assert.ok(Buffer.from(await res.body.arrayBuffer()).equals(streamedBytes))
      const tail = await request(`${base}${streamed.digest}`, { dispatcher: agent, headers: { range: `bytes=${MIB + 1}-`, 'x-dragonfly-priority': '3' } })
      assert.equal(tail.statusCode, 206)
      assert.ok(Buffer.from(await tail.body.arrayBuffer()).equals(streamedBytes.subarray(MIB + 1)))
    })()
    await Promise.all([...ranged, stream])

    // X-Dragonfly-Prefetch: the peer completes the blob in the background and the scheduler sees it whole.
    await waitFor(async () => {
      const tasks = await (await request(`${scheduler.httpUrl}/api/v1/tasks`)).body.json() as Array<{ digest: string, completeHolders: string[] }>
      return tasks.find(t => t.digest === onDemand.digest)?.completeHolders.length === 1
    }, { timeoutMs: 30_000, what: 'the prefetched blob to be complete in the swarm' })
    secureOrigin.reset()
    const whole = await request(`${base}${onDemand.digest}`, { dispatcher: agent })
    assert.ok(Buffer.from(await whole.body.arrayBuffer()).equals(onDemandBytes))
    assert.ok(secureOrigin.bytesDown() < 64 * 1024, `the whole blob was already here (${secureOrigin.bytesDown()} bytes from the origin)`)
  })

  test('two registries served header-less on two ports; ping targets answer 2xx at once', async () => {
    const plainLayer = plainImage.layers[1] as { digest: string }
    const secureLayer = secureImage.layers[1] as { digest: string }
    const second = `http://127.0.0.1:${securePort}`
    for (const [url, repo, digest] of [[peer.url, 'team/plain', plainLayer.digest], [second, 'team/secure', secureLayer.digest]] as const) {
      const res = await request(`${url}/v2/${repo}/blobs/${digest}`)
      assert.equal(res.statusCode, 200, `${url} serves ${repo}`)
      assert.equal(sha256(Buffer.from(await res.body.arrayBuffer())), digest.slice(7))
    }
    // Each port is bound to its registry: the other registry's repository is unknown there.
    const crossed = await request(`${second}/v2/team/plain/blobs/${plainLayer.digest}`)
    assert.equal(crossed.statusCode, 404)
    await crossed.body.dump()
    for (const ping of [`${second}/healthy`, `${second}/`, `${peer.url}/`]) {
      const res = await request(ping, { signal: AbortSignal.timeout(3_000) })
      assert.equal(res.statusCode, 200, ping)
      await res.body.dump()
    }
  })

  test('errors in proxy mode: origin answers pass through marked backend; peer-side failures are 5xx', async () => {
    const agent = proxyAgent()
    const missing = await request(`${plainOrigin.url}/v2/team/plain/manifests/nope`, { dispatcher: agent })
    assert.equal(missing.statusCode, 404)
    assert.equal(missing.headers['x-dragonfly-error-type'], 'backend')
    assert.equal((await missing.body.json() as { errors: Array<{ code: string }> }).errors[0]?.code, 'MANIFEST_UNKNOWN')
    const unknownBlob = await request(`${plainOrigin.url}/v2/team/plain/blobs/sha256:${'0'.repeat(64)}`, { dispatcher: agent })
    assert.equal(unknownBlob.statusCode, 404)
    assert.equal(unknownBlob.headers['x-dragonfly-error-type'], 'backend')
    await unknownBlob.body.dump()
    // Nothing listens on this port: the peer cannot reach the origin, so nydusd should fall back (5xx).
    const closed = await freePort()
    const unreachable = await request(`http://127.0.0.1:${closed}/v2/team/plain/manifests/v1`, { dispatcher: agent })
    assert.ok(unreachable.statusCode >= 500, `got ${unreachable.statusCode}`)
    await unreachable.body.dump()
    const blobUnreachable = await request(`http://127.0.0.1:${closed}/v2/team/plain/blobs/sha256:${'1'.repeat(64)}`, { dispatcher: agent })
    assert.ok(blobUnreachable.statusCode >= 500, `got ${blobUnreachable.statusCode}`)
    await blobUnreachable.body.dump()
    // A malformed CONNECT target is refused, and the peer keeps serving.
    const raw = new Agent()
    closers.push(async () => { await raw.close() })
    const res = await run('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '-x', peer.url, '-p', 'https://bad_host!:443/'], { timeoutMs: 10_000 }).catch((err: unknown) => ({ stdout: String((err as Error).message) }))
    assert.doesNotMatch(res.stdout, /^200$/)
    const health = await request(`${peer.url}/healthy`, { dispatcher: raw })
    assert.equal(health.statusCode, 200)
    await health.body.dump()
  })
})
