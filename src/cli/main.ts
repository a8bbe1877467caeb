#!/usr/bin/env node
import { parseArgs, type ParseArgsConfig } from 'node:util'
import type { TObject } from '@sinclair/typebox'
import { PeerConfig, loadPeerConfig, settingsOf, type Setting } from '../config/index.ts'
import { ConfigError, isDamselflyError } from '../errors.ts'
import { createLogger, type Logger } from '../logger.ts'
import { VERSION } from '../version.ts'

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
    usage: 'damselfly peer --data-dir DIR --port MIRROR_PORT --p2p-port P2P_PORT --registry URL [--scheduler HOST:PORT] [--seed] [--host ADDR]',
    run: runPeer
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
  const { createPeer } = await import('../../peer/main.ts')
  const peer = await createPeer(config, { logger })
  return runUntilSignal(logger, peer)
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
