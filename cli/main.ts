#!/usr/bin/env node
import { readFileSync } from 'node:fs'
import { parseArgs, type ParseArgsConfig } from 'node:util'
import type { TObject } from '@sinclair/typebox'
import { join } from 'node:path'
import { PeerConfig, SchedulerConfig, loadPeerConfig, loadSchedulerConfig, settingsOf, type Setting } from '../src/config/index.ts'
import { ConfigError, isDamselflyError } from '../src/errors.ts'
import { createLogger, type Logger } from '../src/logger.ts'
import { VERSION } from '../src/version.ts'

/**
 * The `damselfly` command. The only module that reads argv and the
 * environment, prints to the terminal or exits the process; everything it
 * runs is handed its configuration.
 */

interface Command {
  summary: string
  usage: string
  run: (argv: string[]) => Promise<number>
}

const COMMANDS: Record<string, Command> = {
  peer: {
    summary: 'Run a peer: the registry mirror and piece exchange of one node',
    usage: 'damselfly peer --data-dir DIR --port MIRROR_PORT --p2p-port P2P_PORT --registry URL [--scheduler HOST:PORT[,HOST:PORT...]] [--seed] [--host ADDR]',
    run: runPeer
  },
  scheduler: {
    summary: 'Run the scheduler: who holds which pieces, and where each peer should fetch from',
    usage: 'damselfly scheduler --port P2P_PORT --http-port HTTP_PORT --data-dir DIR',
    run: runScheduler
  },
  preheat: {
    summary: 'Have the seed peers fetch every blob of an image before anyone asks',
    usage: 'damselfly preheat IMAGE_REF --scheduler HOST:HTTP_PORT [--platform os/arch] [--username U --password-stdin]',
    run: runPreheat
  },
  config: {
    summary: 'Point containerd, nydusd, skopeo/podman/CRI-O or Docker at the peer',
    usage: 'damselfly config containerd|nydusd|registries-conf|docker [options]',
    run: async (argv) => (await import('./config.ts')).runConfig(argv)
  },
  get: {
    summary: 'Fetch a blob, or a whole image into an OCI layout, through the peer, verified',
    usage: 'damselfly get REGISTRY/REPO@DIGEST [-o FILE] | damselfly get REGISTRY/REPO:TAG --oci DIR [--platform os/arch]',
    run: async (argv) => (await import('./get.ts')).runGet(argv)
  }
}

export async function main (argv: string[]): Promise<number> {
  const [name, ...rest] = argv
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(topHelp())
    return name === undefined ? 1 : 0
  }
  if (name === '--version' || name === '-v') {
    process.stdout.write(`damselfly ${VERSION}\n`)
    return 0
  }
  const command = COMMANDS[name]
  if (command === undefined) {
    process.stderr.write(`damselfly: unknown command ${JSON.stringify(name)}\n\n${topHelp()}`)
    return 2
  }
  try {
    return await command.run(rest)
  } catch (err) {
    return reportStartupError(err)
  }
}

async function runPeer (argv: string[]): Promise<number> {
  const flags = parseFlags(PeerConfig, argv, COMMANDS.peer as Command)
  if (flags === undefined) return 0
  const config = loadPeerConfig({ file: flags.config as string | undefined, env: process.env, flags })
  const logger = createLogger({ level: config.logLevel, base: { service: 'peer' } })
  const { createPeer } = await import('../peer/main.ts')
  const faults = testFaults(logger)
  if (config.schedulers.length > 0) {
    const peer = await createPeer(config, { logger, faults })
    return runUntilSignal(logger, peer)
  }
  // No scheduler named: run one in this process, on loopback, for this peer alone.
  const { createScheduler } = await import('../scheduler/main.ts')
  const scheduler = await createScheduler({
    dataDir: join(config.dataDir, 'scheduler'),
    host: '127.0.0.1',
    port: 0,
    httpHost: '127.0.0.1',
    httpPort: undefined,
    announce: [],
    swarm: config.swarm,
    clusterSecret: config.clusterSecret,
    logLevel: config.logLevel
  }, { logger: logger.child({ embedded: 'scheduler' }) })
  let peer: Awaited<ReturnType<typeof createPeer>> | undefined
  return runUntilSignal(logger, {
    async start () {
      await scheduler.start()
      peer = await createPeer(config, { logger, faults, scheduler: scheduler.addresses.p2p[0] })
      await peer.start()
    },
    async stop () {
      await peer?.stop()
      await scheduler.stop()
    }
  })
}

async function runScheduler (argv: string[]): Promise<number> {
  const flags = parseFlags(SchedulerConfig, argv, COMMANDS.scheduler as Command)
  if (flags === undefined) return 0
  const config = loadSchedulerConfig({ file: flags.config as string | undefined, env: process.env, flags })
  const logger = createLogger({ level: config.logLevel, base: { service: 'scheduler' } })
  const { createScheduler } = await import('../scheduler/main.ts')
  const scheduler = await createScheduler(config, { logger })
  return runUntilSignal(logger, scheduler)
}

async function runPreheat (argv: string[]): Promise<number> {
  let values: Record<string, string | boolean | undefined>
  let positionals: string[]
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: { scheduler: { type: 'string' }, platform: { type: 'string' }, username: { type: 'string' }, 'password-stdin': { type: 'boolean' }, 'api-token-file': { type: 'string' }, timeout: { type: 'string' }, help: { type: 'boolean', short: 'h' } }
    }))
  } catch (err) {
    throw new ConfigError('flags', (err as Error).message)
  }
  const command = COMMANDS.preheat as Command
  if (values.help === true) {
    process.stdout.write(`${command.summary}\n\nUsage: ${command.usage}\n\n` +
      '  --scheduler ADDR   the scheduler\'s HTTP API (host:port or URL) [env DAMSELFLY_SCHEDULER_HTTP]\n' +
      '  --platform P       only this platform of a multi-platform image (os/arch[/variant])\n' +
      '  --username U       registry user for private images; the password is read from stdin with --password-stdin\n' +
      '  --api-token-file F the scheduler\'s API token (api.token), when it has one [env DAMSELFLY_API_TOKEN]\n' +
      '  --timeout SECONDS  give up waiting after this long [default 3600]\n')
    return 0
  }
  const image = positionals[0]
  if (image === undefined || positionals.length > 1) throw new ConfigError('image', 'give exactly one image reference, e.g. harbor.local/library/nginx:1.27')
  const target = (values.scheduler as string | undefined) ?? process.env.DAMSELFLY_SCHEDULER_HTTP
  if (target === undefined || target === '') throw new ConfigError('scheduler', 'name the scheduler HTTP API with --scheduler HOST:PORT')
  const base = /^https?:\/\//.test(target) ? target.replace(/\/$/, '') : `http://${target}`
  let password: string | undefined
  if (values['password-stdin'] === true) {
    const chunks: Buffer[] = []
    for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
    password = Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '')
  }
  const timeoutMs = Number(values.timeout ?? 3600) * 1000
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) throw new ConfigError('timeout', 'expected a number of seconds')
  const tokenFile = values['api-token-file'] as string | undefined
  let token = process.env.DAMSELFLY_API_TOKEN
  if (tokenFile !== undefined) {
    try {
      token = readFileSync(tokenFile, 'utf8').trim()
    } catch (err) {
      throw new ConfigError('api-token-file', `cannot read ${tokenFile}: ${(err as Error).message}`)
    }
  }
  const { preheat } = await import('./preheat.ts')
  const job = await preheat(base, { image, platform: values.platform as string | undefined, username: values.username as string | undefined, password }, timeoutMs, line => { process.stdout.write(`${line}\n`) }, token)
  return job.status === 'SUCCESS' ? 0 : 1
}

/** DAMSELFLY_TEST_FAULTS=corrupt-pieces: used by the test suite only, and loud about it. */
function testFaults (logger: Logger): { corruptPieces?: boolean } | undefined {
  const raw = process.env.DAMSELFLY_TEST_FAULTS
  if (raw === undefined || raw === '') return undefined
  const faults = new Set(raw.split(',').map(s => s.trim()))
  logger.warn({ faults: [...faults] }, 'test fault switches are on; this node misbehaves on purpose')
  return { corruptPieces: faults.has('corrupt-pieces') }
}

/** Starts a service, then stops it once on SIGTERM/SIGINT; a second signal exits at once. */
async function runUntilSignal (logger: Logger, service: { start: () => Promise<void>, stop: () => Promise<void> }): Promise<number> {
  let stopping: Promise<void> | undefined
  let resolveDone!: (code: number) => void
  const done = new Promise<number>(resolve => { resolveDone = resolve })
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping !== undefined) {
      logger.warn({ signal }, 'second signal; exiting now')
      process.exit(1)
    }
    logger.info({ signal }, 'stopping')
    stopping = service.stop().then(() => { resolveDone(0) }, (err: unknown) => {
      logger.error({ err }, 'error while stopping')
      resolveDone(1)
    })
  }
  process.on('SIGTERM', onSignal)
  process.on('SIGINT', onSignal)
  try {
    await service.start()
  } catch (err) {
    await service.stop().catch(() => {})
    throw err
  }
  return done
}

/** Flags derived from a config schema, plus --config and --help. Returns undefined after printing help. */
function parseFlags (schema: TObject, argv: string[], command: Command): Record<string, string | boolean | string[] | undefined> | undefined {
  const settings = settingsOf(schema)
  const options: NonNullable<ParseArgsConfig['options']> = {
    config: { type: 'string' },
    help: { type: 'boolean', short: 'h' }
  }
  for (const s of settings) {
    options[s.flag] = s.schema.type === 'boolean'
      ? { type: 'boolean' }
      : s.schema.type === 'array' ? { type: 'string', multiple: true } : { type: 'string' }
  }
  let values: Record<string, string | boolean | Array<string | boolean> | undefined>
  try {
    ({ values } = parseArgs({ args: argv, options, strict: true, allowPositionals: false, allowNegative: true }))
  } catch (err) {
    throw new ConfigError('flags', (err as Error).message)
  }
  if (values.help === true) {
    process.stdout.write(commandHelp(command, settings))
    return undefined
  }
  return values as Record<string, string | boolean | string[] | undefined>
}

function commandHelp (command: Command, settings: Setting[]): string {
  const lines = [`${command.summary}\n`, `Usage: ${command.usage}\n`, 'Options (flag, environment variable, default):']
  lines.push('  --config FILE                 YAML file with any of the settings below (flags and environment win over it)')
  for (const s of settings) {
    const def = s.schema.default
    const shown = def === undefined || (Array.isArray(def) && def.length === 0) || def === '' ? '' : ` [default: ${JSON.stringify(def)}]`
    lines.push(`  --${s.flag.padEnd(28)} ${s.description}${shown}`)
    lines.push(`    ${''.padEnd(28)} env ${s.env}, config key ${s.key}`)
  }
  return `${lines.join('\n')}\n`
}

function topHelp (): string {
  const rows = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(12)} ${c.summary}`)
  return `damselfly ${VERSION}: P2P distribution of container images\n\nUsage: damselfly <command> [options]\n\nCommands:\n${rows.join('\n')}\n\nRun damselfly <command> --help for its options.\n`
}

function reportStartupError (err: unknown): number {
  if (err instanceof ConfigError) {
    process.stderr.write(`damselfly: bad configuration: ${err.message}\n`)
    return 2
  }
  if (isDamselflyError(err)) {
    process.stderr.write(`damselfly: ${err.message} (${err.code})\n`)
    return 1
  }
  const e = err as NodeJS.ErrnoException
  if (e.code === 'EADDRINUSE' || e.code === 'EACCES' || e.code === 'EADDRNOTAVAIL') {
    process.stderr.write(`damselfly: cannot listen: ${e.message}\n`)
    return 1
  }
  process.stderr.write(`damselfly: ${e.stack ?? String(err)}\n`)
  return 1
}

if (import.meta.main) {
  main(process.argv.slice(2)).then(code => { process.exitCode = code }, (err: unknown) => {
    process.stderr.write(`damselfly: ${(err as Error).stack ?? String(err)}\n`)
    process.exitCode = 1
  })
}
