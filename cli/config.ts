import { parseArgs, type ParseArgsConfig } from 'node:util'
import { CONTAINERD_MARK, containerdDefaultHostsFile, containerdHostsFile, renderContainerdDefaultHostsToml, renderContainerdHostsToml } from './clients/containerd.ts'
import { mergeDaemonJson } from './clients/docker.ts'
import { childPath, readOptional, restoreConfigFile, writeConfigFile, type RestoreResult, type WriteResult } from './clients/files.ts'
import { nydusRegistryHost, renderNydusdConfig, renderSnapshotterHostsToml } from './clients/nydus.ts'
import { renderRegistriesConf } from './clients/registries-conf.ts'
import { parseClientRegistry, parseEndpoint, type ClientRegistry } from './clients/registry.ts'
import { ConfigError } from '../src/errors.ts'
import path from 'node:path'

/**
 * `damselfly config <client>`: writes or prints the configuration that points
 * a container client at the local peer. The renderers live in cli/clients/;
 * this module only reads flags, prints and reports what it wrote.
 */

const DEFAULT_MIRROR = 'http://127.0.0.1:4001'

interface Subcommand {
  summary: string
  usage: string
  options: NonNullable<ParseArgsConfig['options']>
  help: string
  run: (values: Values) => Promise<number>
}

type Values = Record<string, string | boolean | string[] | undefined>

const SUBCOMMANDS: Record<string, Subcommand> = {
  containerd: {
    summary: 'Write hosts.toml files so containerd pulls through the peer, the origin kept as fallback',
    usage: 'damselfly config containerd (--registry HOST [...] | --all-registries) [--mirror URL] [--hosts-dir DIR] [--remove] [--dry-run]',
    options: { registry: { type: 'string', multiple: true }, 'all-registries': { type: 'boolean' }, mirror: { type: 'string' }, 'hosts-dir': { type: 'string' }, remove: { type: 'boolean' }, 'dry-run': { type: 'boolean' } },
    help: [
      '  --registry HOST    registry as image references name it: host[:port], or http://host:port for a',
      '                     plain-http registry; docker.io means Docker Hub (repeatable)',
      '  --all-registries   also write _default/hosts.toml: every registry without its own file goes',
      '                     through the peer (which serves those its registries list names)',
      `  --mirror URL       the peer [default ${DEFAULT_MIRROR}]`,
      '  --hosts-dir DIR    containerd\'s config_path [default /etc/containerd/certs.d]',
      '  --remove           undo: put back what each file replaced, or remove it (files changed since',
      '                     by someone else are left alone)',
      '  --dry-run          print the files (or what --remove would do) instead of writing',
      '',
      'A changed hosts.toml is first copied to hosts.toml.bak-<time>. containerd reads the directory',
      'when the CRI plugin\'s registry config_path names it (ctr: --hosts-dir).'
    ].join('\n'),
    run: runContainerd
  },
  nydusd: {
    summary: 'Print a nydusd configuration (or nydus-snapshotter mirror file) that reads through the peer',
    usage: 'damselfly config nydusd --registry HOST [--mirror URL] [--snapshotter [--mirrors-dir DIR [--dry-run]]]',
    options: { registry: { type: 'string', multiple: true }, mirror: { type: 'string' }, snapshotter: { type: 'boolean' }, 'mirrors-dir': { type: 'string' }, 'dry-run': { type: 'boolean' } },
    help: [
      '  --registry HOST    the registry of the nydus images (host[:port] or http://host:port)',
      `  --mirror URL       the peer [default ${DEFAULT_MIRROR}]`,
      '  --snapshotter      print the nydus-snapshotter mirror file (<mirrors_config.dir>/<host>/hosts.toml)',
      '                     instead of the nydusd JSON',
      '  --mirrors-dir DIR  write that file under DIR (the snapshotter\'s [remote.mirrors_config] dir)',
      '  --dry-run          with --mirrors-dir: print instead of writing',
      '',
      'nydusd honours `mirrors` in v2.1 to v2.3.4 only. Newer nydus-snapshotter versions pick the first',
      'mirror whose ping_url answers and send it no headers: run the peer with',
      '--mirrors PORT=REGISTRY_URL and give that port as --mirror.'
    ].join('\n'),
    run: runNydusd
  },
  'registries-conf': {
    summary: 'Print or write a containers-registries.conf (skopeo, podman, CRI-O) with the peer as mirror',
    usage: 'damselfly config registries-conf --registry HOST[=MIRROR] [...] [--mirror HOST:PORT] [--insecure-mirror] [--output FILE]',
    options: { registry: { type: 'string', multiple: true }, mirror: { type: 'string' }, 'insecure-mirror': { type: 'boolean' }, output: { type: 'string' } },
    help: [
      '  --registry HOST[=MIRROR]  registry to mirror (repeatable); =MIRROR gives it its own peer port',
      '  --mirror HOST:PORT        the peer for registries without one [default 127.0.0.1:4001]',
      '  --insecure-mirror         plain http to a peer that is not on loopback',
      '  --output FILE             write FILE (e.g. /etc/containers/registries.conf.d/50-damselfly.conf)',
      '',
      'These clients send the mirror no registry name: a peer port serves the peer\'s --registry, or',
      'the registry of a --mirrors PORT=URL listener. For private images add the mirror host to',
      'auth.json with the registry\'s credentials.'
    ].join('\n'),
    run: runRegistriesConf
  },
  docker: {
    summary: 'Print or merge a daemon.json with the peer in registry-mirrors (Docker Hub only)',
    usage: 'damselfly config docker [--mirror URL] [--daemon-json FILE [--dry-run]]',
    options: { mirror: { type: 'string' }, 'daemon-json': { type: 'string' }, 'dry-run': { type: 'boolean' } },
    help: [
      `  --mirror URL          the peer [default ${DEFAULT_MIRROR}]`,
      '  --daemon-json FILE    merge into FILE (usually /etc/docker/daemon.json), keeping every other key',
      '  --dry-run             print the merged file instead of writing it',
      '',
      'Docker uses registry-mirrors for Docker Hub only, and names no registry to the mirror: the peer',
      '(or its --mirrors port) must have Docker Hub as its registry. Restart dockerd afterwards.'
    ].join('\n'),
    run: runDocker
  }
}

export const CONFIG_USAGE = 'damselfly config containerd|nydusd|registries-conf|docker [options]'

export async function runConfig (argv: string[]): Promise<number> {
  const [name, ...rest] = argv
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(overview())
    return name === undefined ? 2 : 0
  }
  const sub = SUBCOMMANDS[name]
  if (sub === undefined) {
    process.stderr.write(`damselfly config: unknown client ${JSON.stringify(name)}\n\n${overview()}`)
    return 2
  }
  let values: Values
  try {
    ({ values } = parseArgs({ args: rest, options: { ...sub.options, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: false }))
  } catch (err) {
    throw new ConfigError('flags', (err as Error).message)
  }
  if (values.help === true) {
    process.stdout.write(`${sub.summary}\n\nUsage: ${sub.usage}\n\n${sub.help}\n`)
    return 0
  }
  return sub.run(values)
}

function overview (): string {
  const rows = Object.entries(SUBCOMMANDS).map(([n, s]) => `  ${n.padEnd(16)} ${s.summary}`)
  return `Usage: ${CONFIG_USAGE}\n\n${rows.join('\n')}\n\nRun damselfly config <client> --help for its options.\n`
}

function registries (values: Values, atMostOne = false): ClientRegistry[] {
  const given = (values.registry as string[] | undefined) ?? []
  if (given.length === 0) throw new ConfigError('--registry', 'name at least one registry, e.g. --registry docker.io')
  if (atMostOne && given.length > 1) throw new ConfigError('--registry', 'give one registry')
  const byName = new Map<string, ClientRegistry>()
  for (const value of given) {
    const r = parseClientRegistry(value)
    byName.set(r.name, r)
  }
  return [...byName.values()]
}

function report (result: WriteResult): void {
  if (result.action === 'unchanged') process.stdout.write(`unchanged ${result.file}\n`)
  else if (result.backup === undefined) process.stdout.write(`created   ${result.file}\n`)
  else process.stdout.write(`updated   ${result.file} (previous version kept as ${result.backup})\n`)
}

async function runContainerd (values: Values): Promise<number> {
  const all = values['all-registries'] === true
  const regs = all && values.registry === undefined ? [] : registries(values)
  const mirror = parseEndpoint((values.mirror as string | undefined) ?? DEFAULT_MIRROR, '--mirror')
  const hostsDir = (values['hosts-dir'] as string | undefined) ?? '/etc/containerd/certs.d'
  // Every name is checked before the first file is written.
  const files = regs.map(r => ({ file: containerdHostsFile(hostsDir, r), text: renderContainerdHostsToml(r, mirror) }))
  if (all) files.push({ file: containerdDefaultHostsFile(hostsDir), text: renderContainerdDefaultHostsToml(mirror) })
  if (values.remove === true) {
    for (const { file } of files) reportRestore(await restoreConfigFile(file, text => text.includes(CONTAINERD_MARK), { dryRun: values['dry-run'] === true }), values['dry-run'] === true)
    return 0
  }
  for (const { file, text } of files) {
    if (values['dry-run'] === true) process.stdout.write(`# ${file}\n${text}\n`)
    else report(await writeConfigFile(file, text))
  }
  return 0
}

function reportRestore (result: RestoreResult, dryRun: boolean): void {
  const why = {
    restored: `${dryRun ? 'would restore' : 'restored'} ${result.file} from ${result.backup ?? ''}`,
    removed: `${dryRun ? 'would remove' : 'removed'} ${result.file} (nothing was there before)`,
    kept: `kept ${result.file} (not written by damselfly, or changed since)`,
    absent: `absent ${result.file}`
  }
  process.stdout.write(`${why[result.action]}\n`)
}

async function runNydusd (values: Values): Promise<number> {
  const [registry] = registries(values, true) as [ClientRegistry]
  const mirror = parseEndpoint((values.mirror as string | undefined) ?? DEFAULT_MIRROR, '--mirror')
  const dir = values['mirrors-dir'] as string | undefined
  if (dir === undefined && values['dry-run'] === true) throw new ConfigError('--dry-run', 'only means something with --mirrors-dir')
  if (values.snapshotter !== true && dir === undefined) {
    process.stdout.write(renderNydusdConfig({ registry, mirror }))
    return 0
  }
  const text = renderSnapshotterHostsToml({ registry, mirror })
  if (dir === undefined) {
    process.stdout.write(text)
    return 0
  }
  const file = path.join(childPath(dir, nydusRegistryHost(registry), '--registry'), 'hosts.toml')
  if (values['dry-run'] === true) process.stdout.write(`# ${file}\n${text}`)
  else report(await writeConfigFile(file, text))
  return 0
}

async function runRegistriesConf (values: Values): Promise<number> {
  const given = (values.registry as string[] | undefined) ?? []
  if (given.length === 0) throw new ConfigError('--registry', 'name at least one registry, e.g. --registry harbor.example')
  const fallback = parseEndpoint((values.mirror as string | undefined) ?? '127.0.0.1:4001', '--mirror')
  const entries = new Map<string, { registry: ClientRegistry, mirror: typeof fallback }>()
  for (const value of given) {
    const eq = value.indexOf('=')
    const registry = parseClientRegistry(eq === -1 ? value : value.slice(0, eq))
    const mirror = eq === -1 ? fallback : parseEndpoint(value.slice(eq + 1), '--registry')
    entries.set(registry.name, { registry, mirror })
  }
  const shared = new Map<string, string[]>()
  for (const { registry, mirror } of entries.values()) shared.set(mirror.host, [...(shared.get(mirror.host) ?? []), registry.name])
  for (const [mirror, names] of shared) {
    if (names.length > 1) {
      process.stderr.write(`damselfly config: warning: ${names.join(', ')} share the mirror ${mirror}, which serves one registry only; ` +
        'give each its own peer port (peer --mirrors PORT=URL, here --registry HOST=127.0.0.1:PORT)\n')
    }
  }
  const text = renderRegistriesConf([...entries.values()], { insecureMirror: values['insecure-mirror'] === true })
  const output = values.output as string | undefined
  if (output === undefined) process.stdout.write(text)
  else report(await writeConfigFile(output, text))
  return 0
}

async function runDocker (values: Values): Promise<number> {
  const mirror = parseEndpoint((values.mirror as string | undefined) ?? DEFAULT_MIRROR, '--mirror')
  const file = values['daemon-json'] as string | undefined
  if (file === undefined) {
    process.stdout.write(mergeDaemonJson(undefined, mirror))
    return 0
  }
  const text = mergeDaemonJson(await readOptional(file), mirror)
  if (values['dry-run'] === true) process.stdout.write(text)
  else report(await writeConfigFile(file, text))
  return 0
}
