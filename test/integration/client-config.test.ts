import assert from 'node:assert/strict'
import { readdir, readFile } from 'node:fs/promises'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { runCli } from '../helpers/cli.ts'
import { startContainerd, type TestContainerd } from '../helpers/containerd.ts'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, type TestPeer } from '../helpers/peer.ts'
import { freePorts } from '../helpers/ports.ts'
import { run } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { skopeoCopyToDir } from '../helpers/skopeo.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

const MIB = 1024 * 1024

/**
 * The files `damselfly config` writes, used by the real clients. The peer's
 * default registry is one that does not exist, so the peer can only learn the
 * origin from what the generated configuration makes the client send.
 */
describe('client configuration from damselfly config, used by real clients', () => {
  let work: TmpDir
  let registry: TestRegistry
  let origin: ThrottleProxy
  let peer: TestPeer
  let containerd: TestContainerd
  let image: BuiltImage
  let mirrorPort: number
  let layerBytes: number

  before(async () => {
    work = await tmpDir('df-clientcfg-it-')
    registry = await startRegistry()
    origin = await startThrottleProxy({ targetPort: registry.port })
    image = await buildImage(path.join(work.path, 'image'), { layers: [3 * MIB + 101, 700 * 1024], seed: 'client-config-it', tag: 'v1' })
    layerBytes = image.layers.reduce((s, l) => s + l.size, 0)
    await pushImage(image, `${registry.host}/team/app:v1`)
    // Four distinct ports: the mirror's chosen apart from the peer's own, the OS may hand a closed probe's port out again.
    const [mirror, ...own] = await freePorts(4) as [number, number, number, number]
    mirrorPort = mirror
    peer = await startPeer({
      registry: 'http://127.0.0.1:9',
      name: 'client-config',
      ports: own as [number, number, number],
      // A header-less listener for skopeo, which names no registry to its mirror.
      args: ['--mirrors', `${mirrorPort}=${origin.url}`]
    })
    containerd = await startContainerd()
  })

  after(async () => {
    await containerd?.close()
    await peer?.close()
    await origin?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('containerd pulls through the peer with the hosts.toml the CLI wrote', async () => {
    const hosts = path.join(work.path, 'certs.d')
    const res = await runCli(['config', 'containerd', '--registry', origin.url, '--mirror', peer.url, '--hosts-dir', hosts])
    assert.equal(res.code, 0, res.stderr)
    assert.deepEqual(await readdir(hosts), [origin.host])

    const before = await peer.metrics()
    origin.reset()
    await containerd.fetch(`${origin.host}/team/app:v1`, { hostsDir: hosts })
    for (const layer of image.layers) assert.ok((await containerd.readContent(layer.digest)).equals(readBlob(image, layer.digest)), `layer ${layer.digest}`)
    const after = await peer.metrics()
    const served = after.get('damselfly_mirror_requests_total', { route: 'blob', status: '200' }) - before.get('damselfly_mirror_requests_total', { route: 'blob', status: '200' })
    assert.ok(served >= image.layers.length + 1, `the peer answered ${served} blob requests (layers and config)`)
    const viaPeer = after.get('damselfly_fetched_bytes_total', { source: 'origin' }) - before.get('damselfly_fetched_bytes_total', { source: 'origin' })
    assert.ok(viaPeer >= layerBytes, `the peer fetched the layers from the origin the header named (${viaPeer} bytes)`)
    // containerd did not also fetch them itself: the origin sent about one copy.
    assert.ok(origin.bytesDown() < layerBytes * 1.5, `origin sent ${origin.bytesDown()} bytes for ${layerBytes} bytes of layers`)
  })

  test('containerd pulls a registry with no file of its own through _default (--all-registries), and --remove takes it away', async () => {
    const hosts = path.join(work.path, 'certs.d-all')
    const res = await runCli(['config', 'containerd', '--all-registries', '--mirror', peer.url, '--hosts-dir', hosts])
    assert.equal(res.code, 0, res.stderr)
    assert.deepEqual(await readdir(hosts), ['_default'])
    await containerd.removeAll()
    const before = (await peer.metrics()).get('damselfly_mirror_requests_total', { route: 'blob', status: '200' })
    await containerd.fetch(`${origin.host}/team/app:v1`, { hostsDir: hosts })
    for (const layer of image.layers) assert.ok((await containerd.readContent(layer.digest)).equals(readBlob(image, layer.digest)), `layer ${layer.digest}`)
    const served = (await peer.metrics()).get('damselfly_mirror_requests_total', { route: 'blob', status: '200' }) - before
    assert.ok(served >= image.layers.length, `the peer answered ${served} blob requests, knowing the registry from ns=`)
    const removed = await runCli(['config', 'containerd', '--all-registries', '--hosts-dir', hosts, '--remove'])
    assert.equal(removed.code, 0, removed.stderr)
    assert.deepEqual(await readdir(hosts), [])
  })

  test('with the peer stopped, containerd still pulls, from the origin', async () => {
    const hosts = path.join(work.path, 'certs.d')
    await containerd.removeAll()
    await peer.stop()
    try {
      origin.reset()
      await containerd.fetch(`${origin.host}/team/app:v1`, { hostsDir: hosts })
      for (const layer of image.layers) assert.ok((await containerd.readContent(layer.digest)).equals(readBlob(image, layer.digest)))
      assert.ok(origin.bytesDown() >= layerBytes, `the origin sent the layers (${origin.bytesDown()} bytes)`)
    } finally {
      await peer.start()
    }
  })

  test('skopeo pulls through the peer with the registries.conf the CLI wrote', async () => {
    const conf = path.join(work.path, 'registries.conf')
    const res = await runCli(['config', 'registries-conf', '--registry', `${origin.url}=127.0.0.1:${mirrorPort}`, '--output', conf])
    assert.equal(res.code, 0, res.stderr)
    assert.match(await readFile(conf, 'utf8'), new RegExp(`location = "127\\.0\\.0\\.1:${mirrorPort}"\\ninsecure = true`))

    const before = await peer.metrics()
    const dest = path.join(work.path, 'skopeo-out')
    await skopeoCopyToDir(`docker://${origin.host}/team/app:v1`, dest, { registriesConf: conf })
    for (const layer of image.layers) {
      assert.ok((await readFile(path.join(dest, layer.digest.slice(7)))).equals(readBlob(image, layer.digest)), `layer ${layer.digest}`)
    }
    const after = await peer.metrics()
    const served = after.get('damselfly_mirror_requests_total', { route: 'blob', status: '200' }) - before.get('damselfly_mirror_requests_total', { route: 'blob', status: '200' })
    assert.ok(served >= image.layers.length + 1, `the peer answered ${served} blob requests`)
    const bytes = after.get('damselfly_served_bytes_total') - before.get('damselfly_served_bytes_total')
    assert.ok(bytes >= layerBytes, `the peer served ${bytes} bytes`)
  })
  test('podman (vfs storage) pulls through the peer with the same registries.conf', async (t) => {
    const podman = await run('podman', ['--version']).catch(() => undefined)
    if (podman === undefined) {
      t.skip('podman is not installed (test/setup/ensure-deps.sh installs it on Debian)')
      return
    }
    const conf = path.join(work.path, 'registries.conf')
    const sandbox = path.join(work.path, 'podman')
    const before = await peer.metrics()
    // Its own storage and state under the test's directory: nothing of the host's is read or written.
    const globals = ['--root', path.join(sandbox, 'root'), '--runroot', path.join(sandbox, 'run'), '--storage-driver', 'vfs', '--cgroup-manager', 'cgroupfs', '--events-backend', 'file']
    const env = { ...process.env, CONTAINERS_REGISTRIES_CONF: conf, HOME: sandbox, XDG_RUNTIME_DIR: path.join(sandbox, 'xdg') }
    await run('mkdir', ['-p', path.join(sandbox, 'xdg')])
    try {
      await run('podman', [...globals, 'pull', '--quiet', `${origin.host}/team/app:v1`], { env, timeoutMs: 120_000 })
      const { stdout } = await run('podman', [...globals, 'image', 'inspect', '--format', '{{json .RootFS.Layers}}', `${origin.host}/team/app:v1`], { env })
      assert.equal((JSON.parse(stdout) as string[]).length, image.layers.length)
    } finally {
      await run('podman', [...globals, 'system', 'reset', '--force'], { env, timeoutMs: 60_000 }).catch(() => {})
    }
    const after = await peer.metrics()
    const served = after.get('damselfly_mirror_requests_total', { route: 'blob', status: '200' }) - before.get('damselfly_mirror_requests_total', { route: 'blob', status: '200' })
    assert.ok(served >= image.layers.length + 1, `the peer answered ${served} blob requests to podman`)
  })
})
