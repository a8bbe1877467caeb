import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { loadPeerConfig, loadSchedulerConfig } from '../../src/config/index.ts'
import { ConfigError } from '../../src/errors.ts'
import { runCli } from '../helpers/cli.ts'

describe('configuration: one YAML file, environment and flags over it, checked at start', () => {
  let dir: string
  const file = async (name: string, text: string): Promise<string> => {
    const path = join(dir, name)
    await writeFile(path, text)
    return path
  }
  /** The key a bad configuration is reported under, or undefined when it loads. */
  const failingKey = (load: () => unknown): string | undefined => {
    try {
      load()
      return undefined
    } catch (err) {
      assert.ok(err instanceof ConfigError, `a ConfigError, not ${String(err)}`)
      return err.key
    }
  }

  before(async () => { dir = await mkdtemp(join(tmpdir(), 'df-config-')) })
  after(async () => { await rm(dir, { recursive: true, force: true }) })

  test('the defaults are what a node needs', () => {
    const c = loadPeerConfig({})
    assert.equal(c.port, 4001)
    assert.equal(c.p2pPort, 4000)
    assert.equal(c.uploadPort, 4002)
    assert.equal(c.dataDir, '/var/lib/damselfly')
    assert.equal(c.cacheSize, 10 * 1024 ** 3)
    assert.equal(c.uploadConcurrency, 8)
    assert.equal(c.pieceTransport, 'http')
    for (const limit of [c.uploadRateLimit, c.originRateLimit, c.downloadRateLimit, c.prefetchRateLimit]) assert.equal(limit, 0, 'no bandwidth limit by default')
    const limited = loadPeerConfig({ flags: { 'origin-rate-limit': '50MiB', 'download-rate-limit': '1GB', 'prefetch-rate-limit': '10485760' } })
    assert.deepEqual([limited.originRateLimit, limited.downloadRateLimit, limited.prefetchRateLimit], [50 * 1024 ** 2, 1e9, 10 * 1024 ** 2])
    const s = loadSchedulerConfig({})
    assert.equal(s.port, 8002)
    assert.equal(s.httpPort, 8080)
  })

  test('YAML sets nested keys; the environment wins over it and flags over both', async () => {
    const yaml = await file('peer.yaml', [
      'port: 5001',
      'cacheSize: 2GiB',
      'registry: https://harbor.example',
      'labels:',
      '  location: eu|eu-west',
      'proxy:',
      '  allowedHosts: [harbor.example]',
      'mirrors:',
      '  - port: 5011',
      '    registry: https://quay.example'
    ].join('\n'))
    const fromFile = loadPeerConfig({ file: yaml })
    assert.equal(fromFile.port, 5001)
    assert.equal(fromFile.cacheSize, 2 * 1024 ** 3)
    assert.equal(fromFile.labels.location, 'eu|eu-west')
    assert.deepEqual(fromFile.proxy.allowedHosts, ['harbor.example'])
    assert.deepEqual(fromFile.mirrors, [{ port: 5011, registry: 'https://quay.example' }])
    const layered = loadPeerConfig({ file: yaml, env: { DAMSELFLY_PORT: '6001', DAMSELFLY_CACHE_SIZE: '1GiB', DAMSELFLY_LOCATION: 'us' }, flags: { port: '7001' } })
    assert.equal(layered.port, 7001, 'flag over env over file')
    assert.equal(layered.cacheSize, 1024 ** 3, 'env over file')
    assert.equal(layered.labels.location, 'us', 'flattened labels take their own names')
    assert.equal(layered.registry, 'https://harbor.example', 'file over default')
  })

  test('unknown keys, bad values and clashing ports fail with the key named', async () => {
    assert.equal(failingKey(() => loadPeerConfig({ file: join(dir, 'missing.yaml') })), 'config')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { port: '70000' } })), 'port')
    assert.equal(failingKey(() => loadPeerConfig({ env: { DAMSELFLY_P2P_PORT: 'four' } })), 'p2pPort')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { 'cache-size': 'lots' } })), 'cacheSize')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { 'piece-transport': 'carrier-pigeon' } })), 'pieceTransport')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { port: '4100', 'upload-port': '4100' } })), 'uploadPort')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { 'cluster-secret': 'short' } })), 'swarm.clusterSecret')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { 'disk-high-watermark': '80', 'disk-low-watermark': '85' } })), 'diskLowWatermark')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { 'disk-high-watermark': '101' } })), 'diskHighWatermark')
    assert.equal(loadPeerConfig({ flags: { 'cache-ttl': '6h' } }).cacheTtl, 6 * 3_600_000)
    assert.equal(failingKey(() => loadPeerConfig({ flags: { mirrors: ['4011=harbor.example'] } })), 'mirrors.0.registry')
    const typo = await file('typo.yaml', 'proxy:\n  intercpt: [harbor.example]\n')
    assert.equal(failingKey(() => loadPeerConfig({ file: typo })), 'proxy.intercpt')
    const topTypo = await file('top.yaml', 'prot: 4001\n')
    assert.equal(failingKey(() => loadPeerConfig({ file: topTypo })), 'prot')
    const notYaml = await file('bad.yaml', 'port: [\n')
    assert.equal(failingKey(() => loadPeerConfig({ file: notYaml })), 'config')
    assert.equal(failingKey(() => loadSchedulerConfig({ flags: { port: '8080' } })), 'httpPort')
  })

  test('a bad value is answered with the forms the key accepts, and bad YAML with the line it is on', async () => {
    const message = (f: () => unknown): string => {
      try {
        f()
      } catch (err) {
        assert.ok(err instanceof ConfigError)
        return err.message
      }
      assert.fail('no error')
    }
    assert.equal(message(() => loadPeerConfig({ flags: { 'cache-size': '10 gigs' } })),
      'cacheSize: expected a number of bytes, or a number and a unit: KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. "10GiB" or "512MB" (got "10 gigs")')
    assert.match(message(() => loadPeerConfig({ env: { DAMSELFLY_AUTH_CACHE_TTL: 'soon' } })), /^authCacheTtl: expected a number of milliseconds, or a number and a unit \(ms, s, m, h\), e\.g\. "30s" or "5m" \(got "soon"\)$/)
    assert.match(message(() => loadPeerConfig({ flags: { 'log-level': 'loud' } })), /^logLevel: expected one of fatal, error, warn, info, debug, trace, silent \(got "loud"\)$/)
    assert.match(message(() => loadPeerConfig({ flags: { 'piece-transport': 'carrier-pigeon' } })), /expected one of http, libp2p/)
    assert.match(message(() => loadPeerConfig({ flags: { port: '70000' } })), /^port: expected a port number from 0 to 65535/)
    assert.match(message(() => loadPeerConfig({ flags: { mirrors: ['4011=harbor.example'] } })), /^mirrors\.0\.registry: expected a registry URL: http:\/\/ or https:\/\/.*e\.g\. "https:\/\/harbor\.example"/)
    const bad = await file('indent.yaml', 'cacheSize: 10GiB\n  logLevel: debug\nport: 4001\n')
    const yaml = message(() => loadPeerConfig({ file: bad }))
    assert.match(yaml, /is not valid YAML: .+ \(line \d+, column \d+\):\n {2}\d+ \| .*(cacheSize: 10GiB|logLevel: debug)\n {2} {1,3}\| +\^$/)
  })

  test('the cluster secret can come from a file (a mounted Secret), never from both places', async () => {
    const secretFile = await file('secret', 'a-secret-of-enough-length\n')
    assert.equal(loadPeerConfig({ flags: { 'cluster-secret-file': secretFile } }).clusterSecret, 'a-secret-of-enough-length')
    assert.equal(failingKey(() => loadPeerConfig({ flags: { 'cluster-secret-file': secretFile, 'cluster-secret': 'another-secret-of-length' } })), 'swarm.clusterSecretFile')
  })

  test('swarm ports bind loopback without a cluster secret, everywhere with one; a public bind without a secret is refused', () => {
    const SECRET = 'a-secret-of-enough-length'
    assert.equal(loadPeerConfig({}).p2pHost, '127.0.0.1')
    assert.equal(loadPeerConfig({ flags: { 'cluster-secret': SECRET } }).p2pHost, '0.0.0.0')
    assert.equal(loadPeerConfig({ flags: { 'p2p-host': '10.1.2.3', 'cluster-secret': SECRET } }).p2pHost, '10.1.2.3')
    assert.equal(loadPeerConfig({ flags: { 'p2p-host': '::1' } }).p2pHost, '::1')
    for (const host of ['0.0.0.0', '10.1.2.3', '::']) assert.equal(failingKey(() => loadPeerConfig({ flags: { 'p2p-host': host } })), 'p2pHost', host)
    assert.throws(() => loadPeerConfig({ env: { DAMSELFLY_P2P_HOST: '0.0.0.0' } }), /p2pHost: binding 0\.0\.0\.0 without swarm\.clusterSecret/)
    assert.equal(loadSchedulerConfig({}).host, '127.0.0.1')
    assert.equal(loadSchedulerConfig({ flags: { 'cluster-secret': SECRET } }).host, '0.0.0.0')
    assert.equal(failingKey(() => loadSchedulerConfig({ flags: { host: '0.0.0.0' } })), 'host')
  })

  test('only configured registries are served unless unlisted ones are allowed; upload connections are bounded per address', async () => {
    assert.equal(loadPeerConfig({}).allowUnlistedRegistries, false)
    assert.equal(loadPeerConfig({ flags: { 'allow-unlisted-registries': true } }).allowUnlistedRegistries, true)
    // The old allow-list is gone: the configured registries are the list.
    const old = await file('old.yaml', 'allowedRegistries: [harbor.example]\n')
    assert.equal(failingKey(() => loadPeerConfig({ file: old })), 'allowedRegistries')
    assert.equal(loadPeerConfig({}).uploadConnectionsPerAddress, 256)
    assert.equal(failingKey(() => loadPeerConfig({ flags: { 'upload-connections-per-address': '0' } })), 'uploadConnectionsPerAddress')
  })

  test('the CLI refuses a bad file before starting anything, naming the key', async () => {
    const bad = await file('cli.yaml', `dataDir: ${join(dir, 'data')}\nupload-port: 1\n`)
    const res = await runCli(['peer', '--config', bad])
    assert.equal(res.code, 2)
    assert.match(res.stderr, /bad configuration: upload-port: unknown key/)
  })
})
