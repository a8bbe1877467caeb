import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test, type TestContext } from 'node:test'
import type { FastifyInstance } from 'fastify'
import { Writable } from 'node:stream'
import { createLogger, silentLogger } from '../../src/logger.ts'
import { createMetricsRegistry } from '../../src/metrics.ts'
import { MIB } from '../../src/pieces.ts'
import { createAccessChecker } from '../../peer/auth/index.ts'
import { createBlobService } from '../../peer/blobs/index.ts'
import { createPassthrough } from '../../peer/blobs/passthrough.ts'
import { createManifestService } from '../../peer/manifests/index.ts'
import { buildMirrorApp } from '../../peer/mirror/app.ts'
import { createPieceStore } from '../../peer/piece-store/index.ts'
import { createTagCache } from '../../peer/facts/tags.ts'
import { createUpstreamSelector } from '../../peer/upstream/index.ts'
import { FakeOrigin } from '../fakes/origin.ts'

async function setup (t: TestContext, logger = silentLogger()): Promise<{ app: FastifyInstance, origin: FakeOrigin, dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'df-mirror-'))
  const origin = new FakeOrigin()
  const metrics = createMetricsRegistry()
  const store = createPieceStore({ logger }, { dataDir: dir })
  await store.start()
  const tags = createTagCache({ logger }, { dataDir: dir })
  await tags.start()
  const access = createAccessChecker({ logger, origin }, { ttlMs: 0 })
  const blobs = createBlobService({ logger, store, origin, access, metrics })
  const upstreams = createUpstreamSelector({ defaultRegistry: 'http://registry.test:5000' })
  const passthrough = createPassthrough({ origin })
  const manifests = createManifestService({ logger, origin, blobs, access, tags })
  const app = buildMirrorApp({ logger, blobs, manifests, passthrough, origin, upstreams, metrics, ready: () => true })
  await app.ready()
  t.after(async () => {
    await app.close()
    await blobs.stop()
    await tags.stop()
    await store.stop()
    await rm(dir, { recursive: true, force: true })
  })
  return { app, origin, dir }
}

function errorCode (body: string): string {
  return (JSON.parse(body) as { errors: Array<{ code: string }> }).errors[0]?.code ?? ''
}

test('GET and HEAD of a blob carry the digest, length and range support', async (t) => {
  const { app, origin } = await setup(t)
  const data = randomBytes(3 * MIB + 5)
  const digest = origin.addBlob('team/app', data)
  const head = await app.inject({ method: 'HEAD', url: `/v2/team/app/blobs/${digest}` })
  assert.equal(head.statusCode, 200)
  assert.equal(head.headers['content-length'], String(data.length))
  assert.equal(head.headers['docker-content-digest'], digest)
  assert.equal(head.headers['accept-ranges'], 'bytes')
  assert.equal(head.rawPayload.length, 0)
  assert.equal(origin.bytesSent, 0, 'HEAD fetches no blob bytes')

  const get = await app.inject({ method: 'GET', url: `/v2/team/app/blobs/${digest}` })
  assert.equal(get.statusCode, 200)
  assert.ok(get.rawPayload.equals(data))
})

test('single ranges answer 206 exactly; suffix and open ranges too; past the end is 416', async (t) => {
  const { app, origin } = await setup(t)
  const data = randomBytes(2 * MIB + 100)
  const digest = origin.addBlob('team/app', data)
  const url = `/v2/team/app/blobs/${digest}`
  const cases: Array<[string, number, number]> = [['bytes=1000-1048999', 1000, 1048999], ['bytes=-50', data.length - 50, data.length - 1], ['bytes=2097000-', 2097000, data.length - 1]]
  for (const [range, start, end] of cases) {
    const res = await app.inject({ method: 'GET', url, headers: { range } })
    assert.equal(res.statusCode, 206, range)
    assert.equal(res.headers['content-range'], `bytes ${start}-${end}/${data.length}`)
    assert.equal(res.headers['content-length'], String(end - start + 1))
    assert.ok(res.rawPayload.equals(data.subarray(start, end + 1)), range)
  }
  const past = await app.inject({ method: 'GET', url, headers: { range: `bytes=${data.length}-` } })
  assert.equal(past.statusCode, 416)
  assert.equal(past.headers['content-range'], `bytes */${data.length}`)
  assert.equal(errorCode(past.body), 'RANGE_INVALID')
  const bad = await app.inject({ method: 'GET', url, headers: { range: 'bytes=x-y' } })
  assert.equal(bad.statusCode, 400)
  assert.equal(errorCode(bad.body), 'RANGE_INVALID')
})

test('malformed names, digests and hostile paths get OCI errors and touch nothing', async (t) => {
  const { app, dir } = await setup(t)
  const hex = 'a'.repeat(64)
  const cases: Array<[string, number, string]> = [
    [`/v2/Team/App/blobs/sha256:${hex}`, 400, 'NAME_INVALID'],
    // Dot segments are resolved by URL parsing before routing: this lands outside /v2.
    [`/v2/../../etc/blobs/sha256:${hex}`, 404, 'NAME_UNKNOWN'],
    [`/v2/%2e%2e/%2e%2e/blobs/sha256:${hex}`, 404, 'NAME_UNKNOWN'],
    [`/v2/team//app/blobs/sha256:${hex}`, 400, 'NAME_INVALID'],
    ['/v2/team/app/blobs/sha256:../../../etc/passwd', 404, 'NAME_UNKNOWN'],
    ['/v2/team/app/blobs/sha256:1234', 400, 'DIGEST_INVALID'],
    [`/v2/team/app/blobs/md5:${hex}`, 400, 'DIGEST_INVALID'],
    ['/v2/team/app/manifests/bad tag!', 404, 'MANIFEST_UNKNOWN'],
    ['/v2/team/app/manifests/sha256:1234', 404, 'MANIFEST_UNKNOWN'],
    [`/v2/team/app/manifests/${'t'.repeat(129)}`, 404, 'MANIFEST_UNKNOWN'],
    [`/v2/${'a/'.repeat(200)}b/blobs/sha256:${hex}`, 400, 'NAME_INVALID'],
    // The origin's answer: team/app has no tags there.
    ['/v2/team/app/tags/list', 404, 'NAME_UNKNOWN'],
    ['/v2/_catalog', 404, 'NAME_UNKNOWN']
  ]
  for (const [url, status, code] of cases) {
    const res = await app.inject({ method: 'GET', url })
    assert.equal(res.statusCode, status, url)
    assert.equal(errorCode(res.body), code, url)
  }
  assert.deepEqual(await readdir(join(dir, 'blobs')), [])
})

test('tags/list comes from the origin for each caller, with its credentials, pages and all; never from a cache', async (t) => {
  const { app, origin } = await setup(t)
  const manifest = { schemaVersion: 2, config: { digest: `sha256:${'c'.repeat(64)}`, size: 2 }, layers: [] }
  for (const tag of ['v1', 'v2', 'v3']) origin.addManifest('team/app', tag, manifest)
  const all = await app.inject({ method: 'GET', url: '/v2/team/app/tags/list' })
  assert.equal(all.statusCode, 200)
  assert.deepEqual(JSON.parse(all.body), { name: 'team/app', tags: ['v1', 'v2', 'v3'] })
  assert.equal(all.headers['content-type'], 'application/json')

  // Pages: the origin's link goes back to the caller, still naming the registry as containerd did (ns=).
  const first = await app.inject({ method: 'GET', url: '/v2/team/app/tags/list?n=2&ns=registry.test:5000' })
  assert.deepEqual(JSON.parse(first.body).tags, ['v1', 'v2'])
  assert.equal(first.headers.link, '</v2/team/app/tags/list?last=v2&n=2&ns=registry.test%3A5000>; rel="next"')
  const next = await app.inject({ method: 'GET', url: '/v2/team/app/tags/list?last=v2&n=2&ns=registry.test:5000' })
  assert.deepEqual(JSON.parse(next.body).tags, ['v3'])
  assert.equal(next.headers.link, undefined)

  // A new tag shows at once: nothing is cached.
  origin.addManifest('team/app', 'v4', manifest)
  assert.deepEqual(JSON.parse((await app.inject({ method: 'GET', url: '/v2/team/app/tags/list' })).body).tags, ['v1', 'v2', 'v3', 'v4'])
  const asked = origin.requests.filter(r => r.what.startsWith('/v2/team/app/tags/list')).length
  assert.equal(asked, 4, 'every listing went to the origin')

  // Private: the origin's 401 and challenge reach the caller; its credentials reach the origin.
  origin.privateRepos.add('team/secret')
  origin.addManifest('team/secret', 'v1', manifest)
  const anonymous = await app.inject({ method: 'GET', url: '/v2/team/secret/tags/list' })
  assert.equal(anonymous.statusCode, 401)
  assert.equal(anonymous.headers['www-authenticate'], 'Basic realm="fake"')
  assert.equal(errorCode(anonymous.body), 'UNAUTHORIZED')
  const authorized = await app.inject({ method: 'GET', url: '/v2/team/secret/tags/list', headers: { authorization: origin.validAuth } })
  assert.deepEqual(JSON.parse(authorized.body).tags, ['v1'])

  // Unknown repositories are the origin's 404; bad parameters are refused before the origin is asked.
  assert.equal(errorCode((await app.inject({ method: 'GET', url: '/v2/team/none/tags/list' })).body), 'NAME_UNKNOWN')
  const before = origin.requests.length
  for (const query of ['n=lots', 'last=bad%20tag', 'n=1&n=2']) {
    const bad = await app.inject({ method: 'GET', url: `/v2/team/app/tags/list?${query}` })
    assert.equal(bad.statusCode, 400, query)
    assert.match(JSON.parse(bad.body).errors[0].message, /query parameter (n|last)=.*: expected (a number of tags|a tag)/, query)
  }
  assert.equal(origin.requests.length, before)
  origin.down = true
  assert.equal((await app.inject({ method: 'GET', url: '/v2/team/app/tags/list' })).statusCode, 502)
})

test('referrers pass through to the origin with a checked digest and artifactType', async (t) => {
  const { app, origin } = await setup(t)
  const res = await app.inject({ method: 'GET', url: `/v2/team/app/referrers/sha256:${'a'.repeat(64)}?artifactType=application/vnd.dev.cosign.artifact.sig.v1%2Bjson` })
  // The fake origin has no referrers API: its own 404 comes back.
  assert.equal(res.statusCode, 404)
  assert.equal(origin.requests.at(-1)?.what, `/v2/team/app/referrers/sha256:${'a'.repeat(64)}?artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson`)
  assert.equal((await app.inject({ method: 'GET', url: '/v2/team/app/referrers/sha256:1234' })).statusCode, 400)
  assert.equal((await app.inject({ method: 'GET', url: `/v2/team/app/referrers/sha256:${'a'.repeat(64)}?artifactType=not a type` })).statusCode, 400)
})

test('pushes and deletes are 405 whatever the body', async (t) => {
  const { app } = await setup(t)
  for (const [method, url] of [['POST', '/v2/team/app/blobs/uploads/'], ['PUT', '/v2/team/app/manifests/v1'], ['PATCH', '/v2/team/app/blobs/uploads/x'], ['DELETE', `/v2/team/app/blobs/sha256:${'a'.repeat(64)}`]] as const) {
    const res = await app.inject({ method, url, payload: randomBytes(1000), headers: { 'content-type': 'application/octet-stream' } })
    assert.equal(res.statusCode, 405, `${method} ${url}`)
    assert.equal(errorCode(res.body), 'UNSUPPORTED')
  }
})

test('the upstream comes from the header, then ns; bad ones are 400', async (t) => {
  const { app, origin } = await setup(t)
  const digest = origin.addBlob('team/app', randomBytes(10))
  const ok = await app.inject({ method: 'HEAD', url: `/v2/team/app/blobs/${digest}?ns=registry.test:5000` })
  assert.equal(ok.statusCode, 200)
  for (const headers of [{ 'x-dragonfly-registry': 'ftp://registry.test' }, { 'x-dragonfly-registry': 'registry.test' }, { 'x-dragonfly-registry': 'http://user:pw@registry.test' }]) {
    const res = await app.inject({ method: 'GET', url: `/v2/team/app/blobs/${digest}`, headers })
    assert.equal(res.statusCode, 400, JSON.stringify(headers))
    assert.equal(errorCode(res.body), 'UNSUPPORTED')
  }
  const badNs = await app.inject({ method: 'GET', url: `/v2/team/app/blobs/${digest}?ns=bad%20host` })
  assert.equal(badNs.statusCode, 400)
})

test('manifests by tag come from the origin; by digest from the cache; a tag survives the origin going down, marked stale', async (t) => {
  const { app, origin } = await setup(t)
  const manifest = { schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', layers: [] }
  const digest = origin.addManifest('team/app', 'v1', manifest)
  const byTag = await app.inject({ method: 'GET', url: '/v2/team/app/manifests/v1' })
  assert.equal(byTag.statusCode, 200)
  assert.equal(byTag.headers['docker-content-digest'], digest)
  assert.equal(byTag.headers['content-type'], 'application/vnd.oci.image.manifest.v1+json')
  assert.equal(createHash('sha256').update(byTag.rawPayload).digest('hex'), digest.slice(7))

  const gets = origin.requests.filter(r => r.method === 'GET').length
  const byDigest = await app.inject({ method: 'GET', url: `/v2/team/app/manifests/${digest}` })
  assert.equal(byDigest.statusCode, 200)
  assert.equal(byDigest.headers['content-type'], 'application/vnd.oci.image.manifest.v1+json')
  assert.ok(byDigest.rawPayload.equals(byTag.rawPayload))
  assert.equal(origin.requests.filter(r => r.method === 'GET').length, gets, 'served from the cache')

  origin.down = true
  const stale = await app.inject({ method: 'GET', url: '/v2/team/app/manifests/v1' })
  assert.equal(stale.statusCode, 200)
  assert.equal(stale.headers['docker-content-digest'], digest)
  assert.match(String(stale.headers.warning), /^110 /)
  assert.ok(stale.headers['x-damselfly-stale'] !== undefined)
  const unknown = await app.inject({ method: 'GET', url: '/v2/team/app/manifests/never-seen' })
  assert.equal(unknown.statusCode, 502)
})

test('401 from the origin is passed back with its challenge; /v2/ reflects the origin', async (t) => {
  const { app, origin } = await setup(t)
  origin.privateRepos.add('team/app')
  const digest = origin.addBlob('team/app', randomBytes(10))
  const res = await app.inject({ method: 'GET', url: `/v2/team/app/blobs/${digest}` })
  assert.equal(res.statusCode, 401)
  assert.equal(res.headers['www-authenticate'], 'Basic realm="fake"')
  assert.equal(errorCode(res.body), 'UNAUTHORIZED')
  const base = await app.inject({ method: 'GET', url: '/v2/' })
  assert.equal(base.statusCode, 401)
  assert.equal(base.headers['www-authenticate'], 'Basic realm="fake"')
  const authed = await app.inject({ method: 'GET', url: '/v2/', headers: { authorization: origin.validAuth } })
  assert.equal(authed.statusCode, 200)
  origin.down = true
  assert.equal((await app.inject({ method: 'GET', url: '/v2/' })).statusCode, 200)
})

test('health and metrics answer outside the registry API', async (t) => {
  const { app } = await setup(t)
  assert.equal((await app.inject({ method: 'GET', url: '/healthy' })).statusCode, 200)
  const metrics = await app.inject({ method: 'GET', url: '/metrics' })
  assert.equal(metrics.statusCode, 200)
  assert.match(metrics.body, /damselfly_mirror_requests_total/)
})

test('every answer carries a request id (the caller\'s when it sent one) and the log lines name it, never the credentials', async (t) => {
  const lines: string[] = []
  const sink = new Writable({ write (chunk, _enc, done) { lines.push(String(chunk)); done() } })
  const { app, origin } = await setup(t, createLogger({ level: 'debug', destination: sink }))
  const digest = origin.addBlob('team/app', randomBytes(1000))
  const secret = Buffer.from('alice:s3cret-pass').toString('base64')
  const given = await app.inject({ method: 'GET', url: `/v2/team/app/blobs/${digest}`, headers: { 'x-request-id': 'pull-42.a', authorization: `Basic ${secret}` } })
  assert.equal(given.statusCode, 200)
  assert.equal(given.headers['x-request-id'], 'pull-42.a')
  const made = await app.inject({ method: 'GET', url: '/v2/team/app/blobs/sha256:nothex', headers: { 'x-request-id': 'not ok; injected' } })
  assert.match(String(made.headers['x-request-id']), /^[0-9a-f-]{36}$/, 'an unusable id is replaced')
  const mine = lines.filter(l => l.includes('"reqId":"pull-42.a"'))
  assert.ok(mine.length > 0, 'the request is logged under its id')
  for (const l of lines) {
    JSON.parse(l)
    assert.equal(l.includes(secret) || l.includes('s3cret-pass'), false, `no credential in ${l}`)
  }
})
