import assert from 'node:assert/strict'
import { mkdir, readdir, readFile, stat, writeFile, chmod } from 'node:fs/promises'
import path from 'node:path'
import { describe, test } from 'node:test'
import { containerdHostsFile, renderContainerdHostsToml } from '../../cli/clients/containerd.ts'
import { mergeDaemonJson } from '../../cli/clients/docker.ts'
import { childPath, writeConfigFile } from '../../cli/clients/files.ts'
import { renderNydusdConfig, renderSnapshotterHostsToml } from '../../cli/clients/nydus.ts'
import { renderRegistriesConf } from '../../cli/clients/registries-conf.ts'
import { parseClientRegistry, parseEndpoint } from '../../cli/clients/registry.ts'
import { createProgressRenderer } from '../../cli/progress.ts'
import { ConfigError } from '../../src/errors.ts'
import { runCli } from '../helpers/cli.ts'
import { tmpDir } from '../helpers/tmp.ts'

const PEER = parseEndpoint('http://127.0.0.1:4001', '--mirror')
// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[/

describe('registry and mirror arguments', () => {
  test('host[:port] is https, a scheme is kept, Docker Hub has one name', () => {
    assert.deepEqual(parseClientRegistry('Harbor.Example'), { name: 'harbor.example', server: 'https://harbor.example', scheme: 'https', dockerHub: false })
    assert.deepEqual(parseClientRegistry('http://127.0.0.1:5000/'), { name: '127.0.0.1:5000', server: 'http://127.0.0.1:5000', scheme: 'http', dockerHub: false })
    assert.deepEqual(parseClientRegistry('registry.local:5443'), { name: 'registry.local:5443', server: 'https://registry.local:5443', scheme: 'https', dockerHub: false })
    assert.equal(parseClientRegistry('https://harbor.example:443').name, 'harbor.example')
    assert.equal(parseClientRegistry('[::1]:5000').name, '[::1]:5000')
    for (const hub of ['docker.io', 'index.docker.io', 'registry-1.docker.io']) {
      assert.deepEqual(parseClientRegistry(hub), { name: 'docker.io', server: 'https://registry-1.docker.io', scheme: 'https', dockerHub: true })
    }
  })

  test('anything that is not a host is refused, naming the flag', () => {
    const bad = ['', '../etc', '..', 'a/b', 'harbor.example/team', 'http://h/path', 'h?x=1', 'ftp://h', 'alice@h', 'h:0', 'h:99999', 'h:port', 'foo..bar', '-lead.example', 'a b', 'x\\y', '[::1', 'http://', 'a'.repeat(400)]
    for (const value of bad) {
      assert.throws(() => parseClientRegistry(value), (err: unknown) => {
        assert.ok(err instanceof ConfigError, `${JSON.stringify(value)} throws a ConfigError`)
        assert.equal(err.key, '--registry')
        assert.match(err.message, /^--registry: .* is not host\[:port\] or http\(s\):\/\/host\[:port\]: /)
        return true
      })
    }
    assert.throws(() => parseEndpoint('127.0.0.1:4001/v2', '--mirror'), /^ConfigError: --mirror: /)
  })

  test('a mirror without a scheme is plain http, the peer\'s default', () => {
    assert.deepEqual(parseEndpoint('127.0.0.1:4001', '--mirror'), { url: 'http://127.0.0.1:4001', scheme: 'http', host: '127.0.0.1:4001', hostname: '127.0.0.1' })
  })
})

describe('containerd hosts.toml', () => {
  test('the peer first, with the origin named twice over, and the origin as server', () => {
    assert.equal(renderContainerdHostsToml(parseClientRegistry('docker.io'), PEER), [
      '# Pulls of docker.io go through the damselfly peer at http://127.0.0.1:4001;',
      '# the server below stays the fallback. Written by `damselfly config containerd`.',
      'server = "https://registry-1.docker.io"',
      '',
      '[host."http://127.0.0.1:4001"]',
      '  capabilities = ["pull", "resolve"]',
      '',
      '[host."http://127.0.0.1:4001".header]',
      '  X-Dragonfly-Registry = ["https://registry-1.docker.io"]',
      ''
    ].join('\n'))
    const plain = renderContainerdHostsToml(parseClientRegistry('http://127.0.0.1:5000'), parseEndpoint('http://10.0.0.7:4001', '--mirror'))
    assert.match(plain, /^server = "http:\/\/127\.0\.0\.1:5000"$/m)
    assert.match(plain, /^\[host\."http:\/\/10\.0\.0\.7:4001"\]$/m)
    assert.match(plain, /^ {2}X-Dragonfly-Registry = \["http:\/\/127\.0\.0\.1:5000"\]$/m)
  })

  test('files land in <hosts-dir>/<registry name>/ and nowhere else', () => {
    assert.equal(containerdHostsFile('/etc/containerd/certs.d', parseClientRegistry('docker.io')), '/etc/containerd/certs.d/docker.io/hosts.toml')
    assert.equal(containerdHostsFile('/tmp/h', parseClientRegistry('http://127.0.0.1:5000')), '/tmp/h/127.0.0.1:5000/hosts.toml')
    for (const name of ['..', '.', '', 'a/b', '../x', 'a\0b']) {
      assert.throws(() => childPath('/tmp/h', name, '--registry'), /^ConfigError: --registry: .* would be written outside \/tmp\/h$/)
    }
  })
})

describe('writing a configuration file', () => {
  test('created, then unchanged without a backup, then updated with one that is never overwritten', async (t) => {
    const dir = await tmpDir('df-cfg-write-')
    t.after(() => dir.cleanup())
    const file = path.join(dir.path, 'sub', 'hosts.toml')
    const now = new Date('2025-03-04T05:06:07.890Z')

    assert.deepEqual(await writeConfigFile(file, 'one\n', { now }), { file, action: 'created' })
    assert.deepEqual(await writeConfigFile(file, 'one\n', { now }), { file, action: 'unchanged' })
    assert.deepEqual((await readdir(path.dirname(file))).sort(), ['hosts.toml'])

    await chmod(file, 0o600)
    const first = await writeConfigFile(file, 'two\n', { now })
    assert.deepEqual(first, { file, action: 'updated', backup: `${file}.bak-20250304T050607Z` })
    assert.equal(await readFile(file, 'utf8'), 'two\n')
    assert.equal(await readFile(first.backup as string, 'utf8'), 'one\n')
    assert.equal((await stat(file)).mode & 0o777, 0o600, 'the file keeps its mode')

    // A second change within the same second keeps both earlier versions.
    const second = await writeConfigFile(file, 'three\n', { now })
    assert.equal(second.backup, `${file}.bak-20250304T050607Z-2`)
    assert.equal(await readFile(first.backup as string, 'utf8'), 'one\n')
    assert.equal(await readFile(second.backup as string, 'utf8'), 'two\n')
    assert.deepEqual((await readdir(path.dirname(file))).sort(), ['hosts.toml', 'hosts.toml.bak-20250304T050607Z', 'hosts.toml.bak-20250304T050607Z-2'], 'no temporary file is left')
  })

  test('a failed write leaves the old file and no temporary file', async (t) => {
    const dir = await tmpDir('df-cfg-fail-')
    t.after(() => dir.cleanup())
    // The target is a directory: it cannot be read as a file, let alone replaced.
    const file = path.join(dir.path, 'hosts.toml')
    await mkdir(file)
    await writeFile(path.join(file, 'keep'), 'x')
    await assert.rejects(writeConfigFile(file, 'new\n'), { code: 'DF_ERR_STORAGE' })
    assert.deepEqual(await readdir(dir.path), ['hosts.toml'])
  })
})

describe('nydus', () => {
  test('nydusd mirrors entry: the peer, its health URL and the origin with its scheme', () => {
    const config = JSON.parse(renderNydusdConfig({ registry: parseClientRegistry('docker.io'), mirror: PEER }))
    const backend = config.device.backend
    assert.equal(backend.type, 'registry')
    assert.equal(backend.config.host, 'index.docker.io')
    assert.equal(backend.config.scheme, 'https')
    assert.deepEqual(backend.config.mirrors, [{
      host: 'http://127.0.0.1:4001',
      auth_through: false,
      headers: { 'X-Dragonfly-Registry': 'https://index.docker.io' },
      ping_url: 'http://127.0.0.1:4001/healthy',
      health_check_interval: 5,
      failure_limit: 5
    }])
    const plain = JSON.parse(renderNydusdConfig({ registry: parseClientRegistry('http://127.0.0.1:5000'), mirror: PEER, failureLimit: 3 }))
    assert.equal(plain.device.backend.config.scheme, 'http')
    assert.equal(plain.device.backend.config.host, '127.0.0.1:5000')
    assert.equal(plain.device.backend.config.mirrors[0].headers['X-Dragonfly-Registry'], 'http://127.0.0.1:5000')
    assert.equal(plain.device.backend.config.mirrors[0].failure_limit, 3)
  })

  test('nydus-snapshotter mirror file: containerd host table plus the nydus keys', () => {
    const text = renderSnapshotterHostsToml({ registry: parseClientRegistry('harbor.example'), mirror: PEER })
    assert.match(text, /^\[host\."http:\/\/127\.0\.0\.1:4001"\]\n {2}ping_url = "http:\/\/127\.0\.0\.1:4001\/healthy"\n {2}health_check_interval = 5\n {2}failure_limit = 5\n/m)
    assert.match(text, /^\[host\."http:\/\/127\.0\.0\.1:4001"\.header\]\n {2}X-Dragonfly-Registry = \["https:\/\/harbor\.example"\]$/m)
    assert.doesNotMatch(text, /^server/m, 'the snapshotter reads only the host tables')
  })
})

describe('containers-registries.conf', () => {
  test('one [[registry]] per registry, the mirror insecure only when it is plain http on loopback or asked for', () => {
    const text = renderRegistriesConf([
      { registry: parseClientRegistry('docker.io'), mirror: parseEndpoint('127.0.0.1:4001', '--mirror') },
      { registry: parseClientRegistry('http://127.0.0.1:5000'), mirror: parseEndpoint('127.0.0.1:4011', '--registry') },
      { registry: parseClientRegistry('harbor.example'), mirror: parseEndpoint('https://peer.example:4001', '--mirror') }
    ])
    const blocks = text.split('[[registry]]\n').slice(1)
    assert.equal(blocks.length, 3)
    assert.equal(blocks[0], 'prefix = "docker.io"\nlocation = "docker.io"\n\n[[registry.mirror]]\nlocation = "127.0.0.1:4001"\ninsecure = true\n\n')
    assert.equal(blocks[1], 'prefix = "127.0.0.1:5000"\nlocation = "127.0.0.1:5000"\ninsecure = true\n\n[[registry.mirror]]\nlocation = "127.0.0.1:4011"\ninsecure = true\n\n')
    assert.equal(blocks[2], 'prefix = "harbor.example"\nlocation = "harbor.example"\n\n[[registry.mirror]]\nlocation = "peer.example:4001"\n')
    const forced = renderRegistriesConf([{ registry: parseClientRegistry('harbor.example'), mirror: parseEndpoint('10.1.2.3:4001', '--mirror') }], { insecureMirror: true })
    assert.match(forced, /location = "10\.1\.2\.3:4001"\ninsecure = true/)
    assert.match(text, /auth\.json/, 'the file says how private images work')
  })
})

describe('docker daemon.json', () => {
  test('the peer goes first, other keys and mirrors stay, and a second merge changes nothing', () => {
    const before = '{"debug": true, "registry-mirrors": ["https://mirror.gcr.io", "http://127.0.0.1:4001/"], "log-opts": {"max-size": "10m"}}'
    const merged = mergeDaemonJson(before, PEER)
    assert.deepEqual(JSON.parse(merged), { debug: true, 'registry-mirrors': ['http://127.0.0.1:4001', 'https://mirror.gcr.io'], 'log-opts': { 'max-size': '10m' } })
    assert.equal(mergeDaemonJson(merged, PEER), merged)
    const tidy = '{"registry-mirrors":["http://127.0.0.1:4001"]}'
    assert.equal(mergeDaemonJson(tidy, PEER), tidy, 'an already-right file is returned as it is, formatting included')
    assert.deepEqual(JSON.parse(mergeDaemonJson(undefined, PEER)), { 'registry-mirrors': ['http://127.0.0.1:4001'] })
    assert.deepEqual(JSON.parse(mergeDaemonJson('  \n', PEER)), { 'registry-mirrors': ['http://127.0.0.1:4001'] })
  })

  test('a broken daemon.json is refused, not overwritten', () => {
    assert.throws(() => mergeDaemonJson('{"debug": tru', PEER), /^ConfigError: --daemon-json: the file is not valid JSON/)
    assert.throws(() => mergeDaemonJson('[1]', PEER), /^ConfigError: --daemon-json: the file must hold a JSON object/)
    assert.throws(() => mergeDaemonJson('{"registry-mirrors": "http://x"}', PEER), /registry-mirrors" must be an array/)
  })
})

describe('the damselfly config command', () => {
  test('containerd: writes once, is idempotent, backs up a changed file, and --dry-run writes nothing', async (t) => {
    const dir = await tmpDir('df-cfg-cli-')
    t.after(() => dir.cleanup())
    const hosts = path.join(dir.path, 'certs.d')
    const args = ['config', 'containerd', '--registry', 'docker.io', '--registry', 'http://127.0.0.1:5000', '--hosts-dir', hosts]
    const first = await runCli(args)
    assert.equal(first.code, 0, first.stderr)
    assert.match(first.stdout, /^created {3}.*\/docker\.io\/hosts\.toml$/m)
    const again = await runCli(args)
    assert.equal(again.code, 0)
    assert.equal(again.stdout.match(/^unchanged /gm)?.length, 2)
    assert.deepEqual((await readdir(path.join(hosts, 'docker.io'))), ['hosts.toml'])

    const dry = await runCli([...args.slice(0, 4), '--mirror', 'http://127.0.0.1:4999', '--hosts-dir', hosts, '--dry-run'])
    assert.equal(dry.code, 0)
    assert.match(dry.stdout, /^# .*docker\.io\/hosts\.toml\n/m)
    assert.match(dry.stdout, /\[host\."http:\/\/127\.0\.0\.1:4999"\]/)
    assert.doesNotMatch(await readFile(path.join(hosts, 'docker.io', 'hosts.toml'), 'utf8'), /4999/)

    const changed = await runCli([...args.slice(0, 4), '--mirror', 'http://127.0.0.1:4999', '--hosts-dir', hosts])
    assert.equal(changed.code, 0)
    assert.match(changed.stdout, /^updated {3}.*docker\.io\/hosts\.toml \(previous version kept as .*hosts\.toml\.bak-\d{8}T\d{6}Z\)$/m)
    assert.equal((await readdir(path.join(hosts, 'docker.io'))).length, 2)
  })

  test('containerd --all-registries writes _default; --remove puts back what was there and removes the rest', async (t) => {
    const dir = await tmpDir('df-cfg-rm-')
    t.after(() => dir.cleanup())
    const hosts = path.join(dir.path, 'certs.d')
    // An operator's own file for docker.io, and one for a registry this command never touches.
    const operators = 'server = "https://registry-1.docker.io"\n[host."https://corp-mirror.example"]\n  capabilities = ["pull"]\n'
    await mkdir(path.join(hosts, 'docker.io'), { recursive: true })
    await writeFile(path.join(hosts, 'docker.io', 'hosts.toml'), operators)
    const base = ['config', 'containerd', '--registry', 'docker.io', '--all-registries', '--hosts-dir', hosts]
    const wrote = await runCli([...base, '--mirror', 'http://127.0.0.1:4001'])
    assert.equal(wrote.code, 0, wrote.stderr)
    const dflt = await readFile(path.join(hosts, '_default', 'hosts.toml'), 'utf8')
    assert.match(dflt, /^\[host\."http:\/\/127\.0\.0\.1:4001"\]$/m)
    assert.doesNotMatch(dflt, /^server|X-Dragonfly-Registry/m, 'no server (each registry is its own fallback) and no header (the peer reads ns=)')
    // A second write with another mirror leaves a backup that is ours: --remove must skip it.
    assert.equal((await runCli([...base, '--mirror', 'http://127.0.0.1:4999'])).code, 0)
    assert.equal((await readdir(path.join(hosts, 'docker.io'))).length, 3)

    const dry = await runCli([...base, '--remove', '--dry-run'])
    assert.match(dry.stdout, /^would restore .*docker\.io\/hosts\.toml from .*hosts\.toml\.bak-/m)
    assert.match(dry.stdout, /^would remove .*_default\/hosts\.toml/m)
    assert.match(await readFile(path.join(hosts, 'docker.io', 'hosts.toml'), 'utf8'), /4999/, 'a dry run changes nothing')

    const removed = await runCli([...base, '--remove'])
    assert.equal(removed.code, 0, removed.stderr)
    assert.equal(await readFile(path.join(hosts, 'docker.io', 'hosts.toml'), 'utf8'), operators, 'the operator\'s file is back')
    assert.deepEqual((await readdir(hosts)).sort(), ['docker.io'], '_default is gone with its directory')
    const again = await runCli([...base, '--remove'])
    assert.match(again.stdout, /^kept .*docker\.io\/hosts\.toml \(not written by damselfly/m, 'a file that is not ours is never touched')
    assert.match(again.stdout, /^absent .*_default\/hosts\.toml$/m)
    assert.equal(await readFile(path.join(hosts, 'docker.io', 'hosts.toml'), 'utf8'), operators)
  })

  test('a bad registry exits 2 naming the flag, and nothing at all is written', async (t) => {
    const dir = await tmpDir('df-cfg-bad-')
    t.after(() => dir.cleanup())
    const hosts = path.join(dir.path, 'certs.d')
    for (const bad of ['../../etc', 'harbor.example/x', 'ftp://h']) {
      const res = await runCli(['config', 'containerd', '--registry', 'docker.io', '--registry', bad, '--hosts-dir', hosts])
      assert.equal(res.code, 2, bad)
      assert.match(res.stderr, /--registry: .* is not host\[:port\] or http\(s\):\/\/host\[:port\]/)
    }
    assert.deepEqual(await readdir(dir.path), [], 'not even the good registry was written')
    const none = await runCli(['config', 'containerd', '--hosts-dir', hosts])
    assert.equal(none.code, 2)
    assert.match(none.stderr, /--registry: name at least one registry/)
    const unknown = await runCli(['config', 'podman'])
    assert.equal(unknown.code, 2)
    assert.match(unknown.stderr, /unknown client "podman"/)
  })

  test('registries-conf warns when registries share a peer port; docker merges a file with a backup', async (t) => {
    const dir = await tmpDir('df-cfg-rc-')
    t.after(() => dir.cleanup())
    const shared = await runCli(['config', 'registries-conf', '--registry', 'docker.io', '--registry', 'quay.io'])
    assert.equal(shared.code, 0)
    assert.match(shared.stderr, /docker\.io, quay\.io share the mirror 127\.0\.0\.1:4001/)
    const own = await runCli(['config', 'registries-conf', '--registry', 'docker.io', '--registry', 'quay.io=127.0.0.1:4011', '--output', path.join(dir.path, 'r.conf')])
    assert.equal(own.code, 0)
    assert.equal(own.stderr, '')
    assert.match(await readFile(path.join(dir.path, 'r.conf'), 'utf8'), /prefix = "quay\.io"\nlocation = "quay\.io"\n\n\[\[registry\.mirror\]\]\nlocation = "127\.0\.0\.1:4011"/)

    const daemon = path.join(dir.path, 'daemon.json')
    await writeFile(daemon, '{"data-root": "/srv/docker"}\n')
    const merged = await runCli(['config', 'docker', '--daemon-json', daemon])
    assert.equal(merged.code, 0, merged.stderr)
    assert.deepEqual(JSON.parse(await readFile(daemon, 'utf8')), { 'data-root': '/srv/docker', 'registry-mirrors': ['http://127.0.0.1:4001'] })
    assert.equal((await runCli(['config', 'docker', '--daemon-json', daemon])).stdout.trim(), `unchanged ${daemon}`)
    assert.equal((await readdir(dir.path)).filter(f => f.startsWith('daemon.json.bak-')).length, 1)
  })
})

describe('get progress', () => {
  const events = (r: ReturnType<typeof createProgressRenderer>, total: number, clock: { t: number }): void => {
    r({ type: 'start', digest: `sha256:${'ab'.repeat(32)}`, kind: 'layer', total })
    for (let b = 0; b <= total; b += total / 50) {
      clock.t += 50
      r({ type: 'progress', digest: `sha256:${'ab'.repeat(32)}`, bytes: b, total })
    }
    r({ type: 'done', digest: `sha256:${'ab'.repeat(32)}`, bytes: total, skipped: false })
  }

  test('without a terminal: start, every tenth and done as plain lines', () => {
    let text = ''
    const clock = { t: 0 }
    events(createProgressRenderer({ write: (s) => { text += s }, isTTY: false }, () => clock.t), 50 * 1024 * 1024, clock)
    assert.doesNotMatch(text, ANSI)
    assert.doesNotMatch(text, /\r/)
    const lines = text.trimEnd().split('\n')
    assert.match(lines[0] as string, /^layer sha256:abababababab start \(50\.0 MiB\)$/)
    assert.deepEqual(lines.slice(1, -1).map(l => /(\d+)% /.exec(l)?.[1]), ['10', '20', '30', '40', '50', '60', '70', '80', '90'])
    assert.match(lines.at(-1) as string, /^layer sha256:abababababab done, 50\.0 MiB verified$/)
  })

  test('on a terminal: one line redrawn in place, ended by a newline', () => {
    let text = ''
    const clock = { t: 0 }
    events(createProgressRenderer({ write: (s) => { text += s }, isTTY: true, columns: 120 }, () => clock.t), 1000, clock)
    assert.equal(text.split('\n').length, 2, 'one line, then the newline after done')
    assert.ok(text.endsWith('\n'))
    const draws = text.split('\r\x1b[2K').slice(1)
    assert.ok(draws.length >= 10 && draws.length <= 52, `${draws.length} redraws, throttled`)
    assert.match(draws.at(-1) as string, /^layer sha256:abababababab \[={24}\] 100% 1000 B \/ 1000 B .*\/s\n$/)
  })
})
