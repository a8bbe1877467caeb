// Exercises the integration-test helpers end to end, so that they keep working
// with the registry, skopeo and containerd installed here (test/setup/ensure-deps.sh).
import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { readFile, readdir } from 'node:fs/promises'
import http from 'node:http'
import path from 'node:path'
import { test } from 'node:test'
import { Agent, request } from 'undici'
import { startContainerd, writeHostsToml } from './containerd.ts'
import { buildImage, pushImage, readBlob } from './image.ts'
import type { BuiltImage } from './image.ts'
import { freePorts } from './ports.ts'
import { run, spawnProcess, waitFor } from './process.ts'
import { startRegistry } from './registry.ts'
import { skopeoCopyToDir, writeRegistriesConf } from './skopeo.ts'
import { startThrottleProxy } from './throttle.ts'
import { tmpDir } from './tmp.ts'

const KiB = 1024

function sha256 (data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

async function download (url: string, dispatcher: Agent, headers: Record<string, string> = {}): Promise<{ status: number, body: Buffer }> {
  const res = await request(url, { dispatcher, headers })
  const chunks: Buffer[] = []
  for await (const chunk of res.body) chunks.push(chunk as Buffer)
  return { status: res.statusCode, body: Buffer.concat(chunks) }
}

interface LoggedRequest { method: string, url: string, headers: http.IncomingHttpHeaders }

/** An HTTP proxy to `target` that records every request it forwards: a stand-in mirror. */
async function startLoggingMirror (target: string): Promise<{ host: string, url: string, log: LoggedRequest[], close(): Promise<void> }> {
  const log: LoggedRequest[] = []
  const dispatcher = new Agent()
  const server = http.createServer((req, res) => {
    log.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers })
    const headers: Record<string, string> = {}
    for (const [k, v] of Object.entries(req.headers)) {
      if (typeof v === 'string' && !['host', 'connection'].includes(k)) headers[k] = v
    }
    const method = req.method === 'HEAD' ? 'HEAD' : 'GET'
    request(`${target}${req.url ?? '/'}`, { method, headers, dispatcher }).then(async (up) => {
      const out: Record<string, string | string[]> = {}
      for (const [k, v] of Object.entries(up.headers)) {
        if (v !== undefined && !['connection', 'transfer-encoding', 'keep-alive'].includes(k)) out[k] = v
      }
      res.writeHead(up.statusCode, out)
      for await (const chunk of up.body) res.write(chunk)
      res.end()
    }).catch((e: unknown) => {
      if (!res.headersSent) res.writeHead(502)
      res.end(String(e))
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  assert.ok(address !== null && typeof address === 'object')
  const host = `127.0.0.1:${address.port}`
  return {
    host,
    url: `http://${host}`,
    log,
    async close () {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
      await dispatcher.close()
    }
  }
}

test('ports, processes and waiting', async () => {
  const ports = await freePorts(5)
  assert.equal(new Set(ports).size, 5)
  assert.equal((await run('sh', ['-c', 'cat; echo err >&2'], { input: 'hello' })).stdout, 'hello')
  await assert.rejects(run('sh', ['-c', 'echo boom >&2; exit 3']), (e: Error) => /exited with 3/.test(e.message) && e.message.includes('boom'))
  await assert.rejects(run('sleep', ['5'], { timeoutMs: 100 }), /timed out after 100 ms/)
  await assert.rejects(waitFor(async () => false, { timeoutMs: 50, intervalMs: 10, what: 'nothing' }), { message: 'timed out waiting for nothing' })
  const p = spawnProcess('sh', ['-c', 'echo started; exec sleep 30'])
  await waitFor(async () => p.output().includes('started'), { timeoutMs: 5000, intervalMs: 10, what: 'output' })
  await p.stop()
  assert.equal(await p.exited, null) // killed by SIGTERM
})

test('a registry, a pushed image and the throttling proxy in front of it', async (t) => {
  const tmp = await tmpDir('harness-image')
  t.after(() => tmp.cleanup())
  const registry = await startRegistry()
  t.after(() => registry.close())
  const image = await buildImage(tmp.path, { layers: [300 * KiB, 1536 * KiB], seed: 'harness-1' })
  assert.equal(image.layers.length, 2)
  assert.equal(image.blobs.length, 4)
  assert.equal(image.totalBytes, image.blobs.reduce((n, b) => n + b.size, 0))
  assert.ok((image.layers[1]?.size ?? 0) >= 1536 * KiB)
  for (const blob of image.blobs) assert.equal(sha256(readBlob(image, blob.digest)), blob.digest)
  // Same seed, same blobs; another seed, other layers.
  const again = await buildImage(path.join(tmp.path, 'again'), { layers: [300 * KiB], seed: 'harness-1' })
  const other = await buildImage(path.join(tmp.path, 'other'), { layers: [300 * KiB], seed: 'harness-2' })
  assert.equal(again.layers[0]?.digest, image.layers[0]?.digest)
  assert.notEqual(other.layers[0]?.digest, image.layers[0]?.digest)

  await pushImage(image, `${registry.host}/team/app:v1`)

  const proxy = await startThrottleProxy({ targetPort: registry.port, bytesPerSecond: 20 * 1024 * KiB })
  t.after(() => proxy.close())
  const agent = new Agent()
  t.after(() => agent.close())
  const layer = image.layers[1] as BuiltImage['layers'][number]
  const got = await download(`${proxy.url}/v2/team/app/blobs/${layer.digest}`, agent)
  assert.equal(got.status, 200)
  assert.equal(sha256(got.body), layer.digest)
  assert.ok(proxy.bytesDown() >= layer.size, `${proxy.bytesDown()} < ${layer.size}`)
  assert.ok(proxy.bytesUp() > 0)
  assert.equal(proxy.connections(), 1)

  const manifest = await download(`${registry.url}/v2/team/app/manifests/v1`, agent, { accept: 'application/vnd.oci.image.manifest.v1+json' })
  assert.equal(sha256(manifest.body), image.manifest.digest)

  proxy.setDown(true)
  await assert.rejects(download(`${proxy.url}/v2/`, agent))
  proxy.setDown(false)
  proxy.reset()
  assert.equal((await download(`${proxy.url}/v2/`, agent)).status, 200)
  assert.equal(proxy.connections(), 1)

  // An outage of the origin, then the same data again.
  await registry.stop()
  await assert.rejects(download(`${proxy.url}/v2/`, agent))
  await registry.start()
  assert.equal(sha256((await download(`${proxy.url}/v2/team/app/blobs/${layer.digest}`, agent)).body), layer.digest)
})

test('a multi-platform image is pushed as an index', async (t) => {
  const tmp = await tmpDir('harness-multi')
  t.after(() => tmp.cleanup())
  const registry = await startRegistry()
  t.after(() => registry.close())
  const image = await buildImage(tmp.path, {
    layers: [10 * KiB, 20 * KiB],
    platforms: [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }],
    tag: 'v2'
  })
  assert.equal(image.manifest.mediaType, 'application/vnd.oci.image.index.v1+json')
  assert.equal(image.platformManifests.length, 2)
  assert.equal(image.blobs.length, 7) // index, 2 manifests, 2 configs, 2 shared layers
  await pushImage(image, `${registry.host}/team/multi:v2`)
  const agent = new Agent()
  t.after(() => agent.close())
  for (const m of image.platformManifests) {
    const got = await download(`${registry.url}/v2/team/multi/manifests/${m.digest}`, agent, { accept: m.mediaType })
    assert.equal(got.status, 200)
    assert.equal(sha256(got.body), m.digest)
  }
})

test('a registry with basic auth', async (t) => {
  const tmp = await tmpDir('harness-auth')
  t.after(() => tmp.cleanup())
  const registry = await startRegistry({ auth: { username: 'alice', password: 's3cret' } })
  t.after(() => registry.close())
  const image = await buildImage(tmp.path, { layers: [64 * KiB] })
  await assert.rejects(pushImage(image, `${registry.host}/private/app:v1`), /unauthorized|authentication required/i)
  await pushImage(image, `${registry.host}/private/app:v1`, { creds: 'alice:s3cret' })
  const agent = new Agent()
  t.after(() => agent.close())
  const anonymous = await download(`${registry.url}/v2/`, agent)
  assert.equal(anonymous.status, 401)
  const authorization = `Basic ${Buffer.from('alice:s3cret').toString('base64')}`
  const blob = await download(`${registry.url}/v2/private/app/blobs/${image.config.digest}`, agent, { authorization })
  assert.equal(blob.status, 200)
  assert.equal(sha256(blob.body), image.config.digest)
})

test('containerd fetches from the registry, and through a mirror with ?ns=', async (t) => {
  const tmp = await tmpDir('harness-containerd')
  t.after(() => tmp.cleanup())
  const registry = await startRegistry()
  t.after(() => registry.close())
  const image = await buildImage(path.join(tmp.path, 'image'), { layers: [256 * KiB, 512 * KiB] })
  const ref = `${registry.host}/team/app:v1`
  await pushImage(image, ref)
  const containerd = await startContainerd()
  t.after(() => containerd.close())

  const direct = path.join(tmp.path, 'hosts-direct')
  await writeHostsToml(direct, registry.host, { server: registry.url, mirrors: [] })
  const { stderr } = await containerd.fetch(ref, { hostsDir: direct })
  assert.doesNotMatch(stderr, /failed to decode hosts.toml/)
  const content = await containerd.listContent()
  for (const blob of image.blobs) assert.ok(content.includes(blob.digest), `${blob.digest} missing`)
  assert.equal(sha256(await containerd.readContent(image.config.digest)), image.config.digest)

  await containerd.removeAll()
  assert.deepEqual(await containerd.listContent(), [])

  const mirror = await startLoggingMirror(registry.url)
  t.after(() => mirror.close())
  const viaMirror = path.join(tmp.path, 'hosts-mirror')
  await writeHostsToml(viaMirror, registry.host, { server: registry.url, mirrors: [mirror.url] })
  await containerd.fetch(ref, { hostsDir: viaMirror })
  assert.deepEqual((await containerd.listContent()).sort(), image.blobs.map((b) => b.digest).sort())
  const ns = `ns=${encodeURIComponent(registry.host)}`
  assert.equal(mirror.log[0]?.method, 'HEAD')
  assert.equal(mirror.log[0]?.url, `/v2/team/app/manifests/v1?${ns}`)
  assert.ok(mirror.log.every((r) => r.url.endsWith(`?${ns}`)), 'every mirror request carries ns')
  assert.ok(!mirror.log.some((r) => r.url.startsWith('/v2/?') || r.url === '/v2/'), 'no ping')
  for (const blob of image.blobs.filter((b) => b.digest !== image.manifest.digest)) {
    assert.ok(mirror.log.some((r) => r.method === 'GET' && r.url === `/v2/team/app/blobs/${blob.digest}?${ns}`), blob.digest)
  }
})

test('skopeo pulls through the mirror of its registries.conf', async (t) => {
  const tmp = await tmpDir('harness-skopeo')
  t.after(() => tmp.cleanup())
  const registry = await startRegistry()
  t.after(() => registry.close())
  const image = await buildImage(path.join(tmp.path, 'image'), { layers: [128 * KiB] })
  await pushImage(image, `${registry.host}/team/app:v1`)
  const mirror = await startLoggingMirror(registry.url)
  t.after(() => mirror.close())
  const conf = path.join(tmp.path, 'registries.conf')
  await writeRegistriesConf(conf, { registryHost: registry.host, mirror: mirror.host })
  const dest = path.join(tmp.path, 'out')
  await skopeoCopyToDir(`docker://${registry.host}/team/app:v1`, dest, { registriesConf: conf })
  const files = await readdir(dest)
  for (const blob of image.blobs.filter((b) => b !== image.manifest)) assert.ok(files.includes(blob.digest.slice('sha256:'.length)))
  assert.equal(sha256(await readFile(path.join(dest, 'manifest.json'))), image.manifest.digest)
  assert.deepEqual(mirror.log.slice(0, 2).map((r) => `${r.method} ${r.url}`), ['GET /v2/', 'GET /v2/team/app/manifests/v1'])
  assert.ok(!mirror.log.some((r) => r.url.includes('ns=')))
})
