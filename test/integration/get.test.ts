import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { readdir, readFile } from 'node:fs/promises'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { runCli } from '../helpers/cli.ts'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, type TestPeer } from '../helpers/peer.ts'
import { run, waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { skopeoSandbox } from '../helpers/skopeo.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

const MIB = 1024 * 1024
const CLI = fileURLToPath(new URL('../../bin/damselfly.js', import.meta.url))
// eslint-disable-next-line no-control-regex
const ANSI = /\x1b[[\]]/

/** A stand-in for a peer that answers every request with `handler`. */
async function fakePeer (handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<{ url: string, close: () => Promise<void> }> {
  const server: Server = createServer(handler)
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

describe('damselfly get through a peer', () => {
  let work: TmpDir
  let registry: TestRegistry
  let privateRegistry: TestRegistry
  let peer: TestPeer
  let image: BuiltImage
  let secret: BuiltImage

  before(async () => {
    work = await tmpDir('df-get-it-')
    registry = await startRegistry()
    privateRegistry = await startRegistry({ auth: { username: 'alice', password: 's3cret-pass' } })
    image = await buildImage(path.join(work.path, 'image'), {
      layers: [4 * MIB + 77, 300 * 1024],
      seed: 'get-it',
      tag: 'v1',
      platforms: [{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }]
    })
    await pushImage(image, `${registry.host}/team/app:v1`)
    secret = await buildImage(path.join(work.path, 'secret'), { layers: [MIB + 5], seed: 'get-private', tag: 'v1' })
    await pushImage(secret, `${privateRegistry.host}/secret/app:v1`, { creds: 'alice:s3cret-pass' })
    // The default registry is neither: `get` names the registry with its header, and the peer
    // serves only registries it is configured for.
    peer = await startPeer({ registry: 'http://127.0.0.1:9', name: 'get', args: ['--registries', registry.url, '--registries', privateRegistry.url] })
  })

  after(async () => {
    await peer?.close()
    await privateRegistry?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('one blob: the bytes, verified, with plain progress lines when stderr is not a terminal', async () => {
    const layer = image.layers[0] as { digest: string, size: number }
    const out = path.join(work.path, 'blob-out', 'layer.tar')
    const before = await peer.metrics()
    const res = await runCli(['get', `${registry.url}/team/app@${layer.digest}`, '-o', out, '--peer', peer.url])
    assert.equal(res.code, 0, res.stderr)
    assert.ok((await readFile(out)).equals(readBlob(image, layer.digest)))
    assert.deepEqual(await readdir(path.dirname(out)), ['layer.tar'], 'no temporary file left beside it')
    assert.match(res.stdout, /layer\.tar: sha256:[0-9a-f]{64}, 4\.0 MiB, verified/)
    assert.doesNotMatch(res.stderr, ANSI)
    assert.doesNotMatch(res.stderr, /\r/)
    assert.match(res.stderr, /^blob sha256:[0-9a-f]{12} start \(4\.0 MiB\)$/m)
    assert.ok((res.stderr.match(/^blob sha256:[0-9a-f]{12} \d+% \(/gm) ?? []).length >= 3, `progress lines:\n${res.stderr}`)
    assert.match(res.stderr, /^blob sha256:[0-9a-f]{12} done, 4\.0 MiB verified$/m)
    const served = (await peer.metrics()).get('damselfly_served_bytes_total') - before.get('damselfly_served_bytes_total')
    assert.ok(served >= layer.size, 'the peer served it')
  })

  test('a whole image into an OCI layout that skopeo reads; a second run fetches nothing', async () => {
    const dir = path.join(work.path, 'layout')
    const res = await runCli(['get', `${registry.url}/team/app:v1`, '--oci', dir, '--platform', 'linux/arm64'], { env: { ...process.env, DAMSELFLY_PEER: peer.url } })
    assert.equal(res.code, 0, res.stderr)
    const armManifest = image.platformManifests[1] as { digest: string }
    assert.match(res.stdout, new RegExp(`manifest ${armManifest.digest}, 3 blobs \\(3 fetched, 0 already there\\)`))
    assert.match(res.stderr, /^manifest sha256:[0-9a-f]{64} \(application\/vnd\.oci\.image\.manifest\.v1\+json, linux\/arm64\)$/m)

    const sandbox = await skopeoSandbox()
    try {
      const { stdout } = await run('skopeo', [...sandbox.globalArgs, 'inspect', `oci:${dir}:v1`], { env: sandbox.env, timeoutMs: 60_000 })
      const inspected = JSON.parse(stdout) as { Architecture: string, Os: string, Layers: string[], Digest: string }
      assert.equal(inspected.Architecture, 'arm64')
      assert.equal(inspected.Digest, armManifest.digest)
      assert.deepEqual(inspected.Layers, image.layers.map(l => l.digest))
      const copied = path.join(work.path, 'layout-copy')
      await run('skopeo', [...sandbox.globalArgs, 'copy', '--quiet', `oci:${dir}:v1`, `dir:${copied}`], { env: sandbox.env, timeoutMs: 60_000 })
      for (const layer of image.layers) assert.ok((await readFile(path.join(copied, layer.digest.slice(7)))).equals(readBlob(image, layer.digest)))
      assert.ok((await readFile(path.join(copied, (image.platformConfigs[1] as { digest: string }).digest.slice(7)))).length > 0, 'the arm64 config')
    } finally {
      await sandbox.cleanup()
    }

    const again = await runCli(['get', `${registry.url}/team/app:v1`, '--oci', dir, '--platform', 'linux/arm64', '--peer', peer.url])
    assert.equal(again.code, 0, again.stderr)
    assert.match(again.stdout, /3 blobs \(0 fetched, 3 already there\)/)
    const index = JSON.parse(await readFile(path.join(dir, 'index.json'), 'utf8')) as { manifests: unknown[] }
    assert.equal(index.manifests.length, 1, 'the tag is replaced, not added twice')
  })

  test('a peer that sends the wrong bytes: exit 1, and no file left', async (t) => {
    const garbage = await fakePeer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(2 * MIB) })
      res.end(Buffer.alloc(2 * MIB, 0x5a))
    })
    t.after(() => garbage.close())
    const dir = path.join(work.path, 'garbage')
    const layer = image.layers[0] as { digest: string }
    const res = await runCli(['get', `${registry.url}/team/app@${layer.digest}`, '-o', path.join(dir, 'out'), '--peer', garbage.url])
    assert.equal(res.code, 1)
    assert.match(res.stderr, new RegExp(`damselfly get: blob ${layer.digest} hashed to sha256:[0-9a-f]{64}; nothing was kept \\(DF_ERR_BLOB_DIGEST_MISMATCH\\)`))
    assert.deepEqual(await readdir(dir), [])
  })

  test('a private image: works with credentials, fails clearly without or with wrong ones', async () => {
    const layer = secret.layers[0] as { digest: string }
    const ref = `${privateRegistry.url}/secret/app@${layer.digest}`
    const dir = path.join(work.path, 'private')
    const ok = await runCli(['get', ref, '-o', path.join(dir, 'ok'), '--peer', peer.url, '--username', 'alice', '--password-stdin'], { input: 's3cret-pass\n' })
    assert.equal(ok.code, 0, ok.stderr)
    assert.ok((await readFile(path.join(dir, 'ok'))).equals(readBlob(secret, layer.digest)))

    const anonymous = await runCli(['get', ref, '-o', path.join(dir, 'anon'), '--peer', peer.url])
    assert.equal(anonymous.code, 1)
    assert.match(anonymous.stderr, /damselfly get: .*secret\/app requires credentials; give --username and --password-stdin \(DF_ERR_UNAUTHORIZED\)/)
    const wrong = await runCli(['get', ref, '-o', path.join(dir, 'wrong'), '--peer', peer.url, '--username', 'alice', '--password-stdin'], { input: 'nope\n' })
    assert.equal(wrong.code, 1)
    assert.match(wrong.stderr, /the registry refused the credentials of "alice" for .*secret\/app \(DF_ERR_UNAUTHORIZED\)/)
    assert.deepEqual(await readdir(dir), ['ok'])

    const layout = path.join(work.path, 'private-layout')
    const whole = await runCli(['get', `${privateRegistry.url}/secret/app:v1`, '--oci', layout, '--peer', peer.url, '--username', 'alice', '--password-stdin'], { input: 's3cret-pass' })
    assert.equal(whole.code, 0, whole.stderr)
    assert.match(whole.stdout, /2 blobs \(2 fetched/)
  })

  test('a registry named without a scheme is what the peer lists it as; TLS meeting plain HTTP says how to name it', async (t) => {
    const layer = image.layers[1] as { digest: string }
    // No scheme: the peer decides, as for containerd's ns= and preheat jobs; it lists this registry as http.
    const bare = await runCli(['get', `${registry.host}/team/app@${layer.digest}`, '-o', path.join(work.path, 'bare', 'layer'), '--peer', peer.url])
    assert.equal(bare.code, 0, bare.stderr)
    assert.ok((await readFile(path.join(work.path, 'bare', 'layer'))).equals(readBlob(image, layer.digest)))

    // A peer told the plain-HTTP registry is https: the answer names the fix, not an OpenSSL code.
    const wrong = await startPeer({ registry: 'http://127.0.0.1:9', name: 'get-tls', args: ['--registries', `https://${registry.host}`] })
    t.after(async () => wrong.close())
    const res = await runCli(['get', `${registry.host}/team/app@${layer.digest}`, '-o', path.join(work.path, 'tls', 'layer'), '--peer', wrong.url])
    assert.notEqual(res.code, 0)
    assert.match(res.stderr, new RegExp(`answered a TLS handshake in plain HTTP: if it is a plain-HTTP registry, name it http://${registry.host.replaceAll('.', '\\.')}`))
    assert.doesNotMatch(res.stderr, /wrong version number|ERR_SSL/)
  })

  test('bad references and flags exit 2 with a message', async () => {
    const digest = (image.layers[0] as { digest: string }).digest
    const cases: Array<[string[], RegExp]> = [
      [['get', `${registry.host}/Team/App@${digest}`], /bad repository name "Team\/App"/],
      [['get', `${registry.host}/team/app@sha256:1234`], /invalid digest/],
      [['get', `ftp://${registry.host}/team/app@${digest}`], /bad registry/],
      [['get', `${registry.host}/team/app:v1`], /a tag names an image: add --oci DIR/],
      [['get', `${registry.host}/team/app:v1`, '--oci', work.path, '--platform', 'arm64'], /--platform: "arm64": expected os\/arch/],
      [['get', `${registry.host}/team/app@${digest}`, '--peer', 'http://127.0.0.1:4001/x'], /--peer: /],
      [['get'], /give exactly one reference/]
    ]
    for (const [args, message] of cases) {
      const res = await runCli(args)
      assert.equal(res.code, 2, `${args.join(' ')}: ${res.stderr}`)
      assert.match(res.stderr, message)
    }
  })

  test('Ctrl-C in the middle of a blob: exit 130, the partial file removed', async (t) => {
    let sent = false
    const stalling = await fakePeer((_req, res) => {
      res.writeHead(200, { 'content-length': String(8 * MIB) })
      res.write(Buffer.alloc(MIB, 1), () => { sent = true })
      // …and nothing more: the transfer hangs until the user gives up.
    })
    t.after(() => stalling.close())
    const dir = path.join(work.path, 'interrupted')
    const layer = image.layers[0] as { digest: string }
    const child = spawn(process.execPath, [CLI, 'get', `${registry.url}/team/app@${layer.digest}`, '-o', path.join(dir, 'out'), '--peer', stalling.url], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
    child.stdout.resume()
    const exited = once(child, 'exit')
    t.after(() => { if (child.exitCode === null) child.kill('SIGKILL') })
    await waitFor(async () => sent && (await readdir(dir).catch(() => [])).some(f => f.includes('.partial-')), { timeoutMs: 20_000, what: 'the partial file' })
    child.kill('SIGINT')
    const [code] = await exited
    assert.equal(code, 130, stderr)
    assert.match(stderr, /interrupted; partial files removed/)
    assert.deepEqual(await readdir(dir), [])
  })
})
