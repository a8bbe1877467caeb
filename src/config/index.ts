import { readFileSync } from 'node:fs'
import type { TSchema, TObject } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { parse as parseYaml } from 'yaml'
import { ConfigError } from '../errors.ts'
import { parseDialAddress } from '../p2p/address.ts'
import { PeerConfig, SchedulerConfig, type PeerConfigInput, type SchedulerConfigInput } from './schema.ts'

export { PeerConfig, SchedulerConfig }

/**
 * Where settings come from, lowest precedence first: schema defaults, the
 * YAML file, environment variables, flags. Only this module (and the CLI,
 * which hands it argv) reads the environment.
 */
export interface ConfigSources {
  /** Path of a YAML file. */
  file?: string | undefined
  /** The environment; `DAMSELFLY_*` variables are read from it. */
  env?: Record<string, string | undefined>
  /** Parsed flags keyed by flag name without dashes (`cache-size`). */
  flags?: Record<string, string | boolean | string[] | undefined>
}

/** One setting: its key path and its three names. */
export interface Setting {
  path: string[]
  key: string
  flag: string
  env: string
  schema: TSchema
  description: string
}

const ENV_PREFIX = 'DAMSELFLY_'
/** Objects whose children are set without the parent's name (`--cluster-secret`, not `--swarm-cluster-secret`). */
const FLATTENED = new Set(['labels', 'swarm'])

/** Every leaf setting of a schema. */
export function settingsOf (schema: TObject): Setting[] {
  const out: Setting[] = []
  const walk = (obj: TObject, path: string[]): void => {
    for (const [name, child] of Object.entries(obj.properties)) {
      const childPath = [...path, name]
      if (child.type === 'object' && child.properties !== undefined) {
        walk(child as TObject, childPath)
        continue
      }
      const named = path.length > 0 && FLATTENED.has(path[0] as string) ? [name] : childPath
      const words = named.flatMap(splitWords)
      out.push({
        path: childPath,
        key: childPath.join('.'),
        flag: words.join('-'),
        env: ENV_PREFIX + words.join('_').toUpperCase(),
        schema: child,
        description: String(child.description ?? '')
      })
    }
  }
  walk(schema, [])
  return out
}

/** Validated peer configuration with sizes in bytes and durations in milliseconds. */
export interface ResolvedPeerConfig extends Omit<PeerConfigInput, 'cacheSize' | 'memoryCacheSize' | 'authCacheTtl' | 'authStaleIfError' | 'cacheTtl' | 'uploadRateLimit' | 'originRateLimit' | 'downloadRateLimit' | 'prefetchRateLimit'> {
  /** `scheduler` split at its commas, each address checked (names not resolved); empty: run an embedded scheduler. */
  schedulers: string[]
  cacheSize: number
  memoryCacheSize: number
  authCacheTtl: number
  authStaleIfError: number
  cacheTtl: number
  uploadRateLimit: number
  originRateLimit: number
  downloadRateLimit: number
  prefetchRateLimit: number
  /** The cluster secret itself (read from `swarm.clusterSecretFile` when that is set). */
  clusterSecret: string
}

export interface ResolvedSchedulerConfig extends SchedulerConfigInput {
  clusterSecret: string
  /** The Redis password itself (read from `statePasswordFile`); undefined without one. */
  statePassword: string | undefined
  /** The PEM CA bundle itself (read from `stateCaFile`). */
  stateCa: string | undefined
  /** The API token itself (read from `api.tokenFile` when that is set); empty when the API is open. */
  apiToken: string
}

export function loadPeerConfig (sources: ConfigSources): Readonly<ResolvedPeerConfig> {
  const raw = load(PeerConfig, sources) as PeerConfigInput
  const resolved: ResolvedPeerConfig = {
    ...raw,
    schedulers: parseSchedulerList(raw.scheduler),
    cacheSize: parseSize(raw.cacheSize, 'cacheSize'),
    memoryCacheSize: parseSize(raw.memoryCacheSize, 'memoryCacheSize'),
    authCacheTtl: parseDuration(raw.authCacheTtl, 'authCacheTtl'),
    authStaleIfError: parseDuration(raw.authStaleIfError, 'authStaleIfError'),
    cacheTtl: parseDuration(raw.cacheTtl, 'cacheTtl'),
    uploadRateLimit: parseSize(raw.uploadRateLimit, 'uploadRateLimit'),
    originRateLimit: parseSize(raw.originRateLimit, 'originRateLimit'),
    downloadRateLimit: parseSize(raw.downloadRateLimit, 'downloadRateLimit'),
    prefetchRateLimit: parseSize(raw.prefetchRateLimit, 'prefetchRateLimit'),
    clusterSecret: clusterSecret(raw.swarm)
  }
  if (resolved.diskLowWatermark >= resolved.diskHighWatermark) {
    throw new ConfigError('diskLowWatermark', `${resolved.diskLowWatermark} must be below diskHighWatermark (${resolved.diskHighWatermark}): eviction starts at the high one and stops at the low one, e.g. 90 and 80`)
  }
  resolved.p2pHost = swarmHost(resolved.p2pHost, 'p2pHost', resolved.clusterSecret, 'the p2p and upload ports would let anyone who can reach them download every cached piece and join the swarm')
  const ports = [['port', resolved.port], ['healthPort', resolved.healthPort], ['p2pPort', resolved.p2pPort], ...(resolved.pieceTransport === 'http' ? [['uploadPort', resolved.uploadPort]] : []), ...resolved.mirrors.map((m, i) => [`mirrors.${i}.port`, m.port])] as Array<[string, number]>
  if (resolved.proxy.intercept.length > 0 && (resolved.proxy.caCert === '' || resolved.proxy.caKey === '')) {
    throw new ConfigError(resolved.proxy.caCert === '' ? 'proxy.caCert' : 'proxy.caKey', 'intercepting CONNECT for proxy.intercept needs a CA certificate and key')
  }
  const seen = new Map<number, string>()
  for (const [key, port] of ports) {
    if (port === 0) continue
    const other = seen.get(port)
    if (other !== undefined) throw new ConfigError(key, `port ${port} is already used by ${other}`)
    seen.set(port, key)
  }
  return deepFreeze(resolved)
}

export function loadSchedulerConfig (sources: ConfigSources): Readonly<ResolvedSchedulerConfig> {
  const raw = load(SchedulerConfig, sources) as SchedulerConfigInput
  if (raw.port !== 0 && raw.port === raw.httpPort) throw new ConfigError('httpPort', `port ${raw.port} is already used by port`)
  const secret = clusterSecret(raw.swarm)
  const host = swarmHost(raw.host, 'host', secret, 'its p2p port would let anyone who can reach it join the swarm and read who holds what')
  if (raw.state !== 'memory') {
    let url: URL | undefined
    try { url = new URL(raw.state) } catch {}
    if (url === undefined || (url.protocol !== 'redis:' && url.protocol !== 'rediss:') || url.hostname === '' || !/^(\/\d*)?$/.test(url.pathname)) {
      throw new ConfigError('state', `expected ${acceptedForms(SchedulerConfig.properties.state) ?? 'memory'} (got ${JSON.stringify(raw.state.slice(0, 80))})`)
    }
    if (url.password !== '') throw new ConfigError('state', 'the URL holds a password: put it in statePasswordFile instead, so it stays out of process listings and logs')
  }
  if (raw.stateCaFile !== '' && !raw.state.startsWith('rediss://')) throw new ConfigError('stateCaFile', 'a CA bundle is for a TLS connection: use a rediss:// state URL')
  const statePassword = raw.statePasswordFile === '' ? undefined : readSetting('statePasswordFile', raw.statePasswordFile).trim()
  const stateCa = raw.stateCaFile === '' ? undefined : readSetting('stateCaFile', raw.stateCaFile)
  return deepFreeze({ ...raw, host, clusterSecret: secret, apiToken: apiToken(raw.api), statePassword, stateCa })
}

function readSetting (key: string, file: string): string {
  try {
    return readFileSync(file, 'utf8')
  } catch (err) {
    throw new ConfigError(key, `cannot read ${file}: ${(err as Error).message}`)
  }
}

/**
 * The peer's `scheduler` setting, comma-separated addresses, as a list. Each
 * entry is checked here, so a typo stops the peer at start rather than at the
 * reconnect that needs it.
 */
export function parseSchedulerList (value: string): string[] {
  const entries = value.split(',').map(s => s.trim()).filter(s => s !== '')
  for (const entry of entries) {
    const parsed = parseDialAddress(entry)
    if ('problem' in parsed) {
      throw new ConfigError('scheduler', `expected ${acceptedForms(PeerConfig.properties.scheduler) ?? 'host:port'} (got ${JSON.stringify(entry.slice(0, 80))}: ${parsed.problem})`)
    }
  }
  return [...new Set(entries)]
}

/** Whether binding `host` keeps a port to this machine (127.0.0.0/8, ::1, localhost). */
export function isLoopbackHost (host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase()
  return h === 'localhost' || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h) || /^::ffff:127\./.test(h)
}

/**
 * The address a swarm port binds: the one given, or — when none is — every
 * interface with a cluster secret and loopback without one. Without a
 * secret nothing tells a member from a stranger, so a non-loopback address
 * is refused rather than opened.
 */
function swarmHost (given: string, key: string, secret: string, why: string): string {
  const host = given === '' ? (secret === '' ? '127.0.0.1' : '0.0.0.0') : given
  if (secret === '' && !isLoopbackHost(host)) {
    throw new ConfigError(key, `binding ${host} without swarm.clusterSecret: ${why}. Set swarm.clusterSecret (or swarm.clusterSecretFile, at least 16 characters) on every node, or bind 127.0.0.1`)
  }
  return host
}

function load (schema: TObject, sources: ConfigSources): unknown {
  let value: Record<string, unknown> = {}
  if (sources.file !== undefined) value = readYaml(sources.file)
  const settings = settingsOf(schema)
  for (const s of settings) {
    const fromEnv = sources.env?.[s.env]
    if (fromEnv !== undefined && fromEnv !== '') setPath(value, s.path, convert(s, fromEnv, s.env))
  }
  for (const s of settings) {
    const fromFlag = sources.flags?.[s.flag]
    if (fromFlag !== undefined) setPath(value, s.path, convert(s, fromFlag, `--${s.flag}`))
  }
  const withDefaults = Value.Default(schema, value) as Record<string, unknown>
  const first = Value.Errors(schema, withDefaults).First()
  if (first !== undefined) {
    const key = first.path.split('/').filter(Boolean).join('.') || '(root)'
    if (first.schema.additionalProperties === false || /additional|unexpected/i.test(first.message)) {
      throw new ConfigError(key, 'unknown key')
    }
    const got = JSON.stringify(first.value)
    const forms = acceptedForms(first.schema)
    throw new ConfigError(key, `${forms === undefined ? first.message : `expected ${forms}`} (got ${got === undefined ? 'nothing' : got.slice(0, 80)})`)
  }
  return withDefaults
}

/** A setting's accepted values in words: its `accepts`, or the list of its literals. */
function acceptedForms (schema: TSchema): string | undefined {
  if (typeof schema.accepts === 'string') return schema.accepts
  const options = (schema.anyOf as TSchema[] | undefined)?.map(o => o.const as unknown)
  if (options !== undefined && options.length > 0 && options.every(o => typeof o === 'string')) return `one of ${options.join(', ')}`
  return undefined
}

function readYaml (file: string): Record<string, unknown> {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (err) {
    throw new ConfigError('config', `cannot read ${file}: ${(err as Error).message}`)
  }
  let parsed: unknown
  try {
    parsed = parseYaml(text, { maxAliasCount: 100 })
  } catch (err) {
    throw new ConfigError('config', `${file} is not valid YAML: ${yamlProblem(err, text)}`)
  }
  if (parsed === null || parsed === undefined) return {}
  if (typeof parsed !== 'object' || Array.isArray(parsed)) throw new ConfigError('config', `${file} must hold a mapping of settings`)
  return parsed as Record<string, unknown>
}

/** The parser's reason, where it is, and the line itself with a caret under the spot. */
function yamlProblem (err: unknown, text: string): string {
  const reason = ((err as Error).message.split('\n')[0] ?? '').replace(/ at line \d+, column \d+:?$/, '')
  const at = (err as { linePos?: Array<{ line: number, col: number }> }).linePos?.[0]
  if (at === undefined) return reason
  const line = (text.split(/\r?\n/)[at.line - 1] ?? '').slice(0, 160)
  return `${reason} (line ${at.line}, column ${at.col}):\n  ${at.line} | ${line}\n  ${' '.repeat(String(at.line).length)} | ${' '.repeat(Math.max(0, at.col - 1))}^`
}

/** Turns a string from the environment or argv into the setting's type. */
function convert (setting: Setting, raw: string | boolean | string[], source: string): unknown {
  const { schema } = setting
  const fail = (why: string): never => { throw new ConfigError(setting.key, `${source}: ${why}`) }
  if (schema.type === 'boolean') {
    if (typeof raw === 'boolean') return raw
    const v = String(raw).toLowerCase()
    if (['true', '1', 'yes', 'on'].includes(v)) return true
    if (['false', '0', 'no', 'off'].includes(v)) return false
    return fail(`expected true or false, got ${JSON.stringify(raw)}`)
  }
  if (schema.type === 'integer') {
    const v = String(raw).trim()
    if (!/^-?\d+$/.test(v)) return fail(`expected an integer, got ${JSON.stringify(raw)}`)
    return Number(v)
  }
  if (schema.type === 'array') {
    const items = (Array.isArray(raw) ? raw : String(raw).split(',')).map(s => s.trim()).filter(s => s !== '')
    if (setting.key === 'mirrors') {
      return items.map(item => {
        const m = /^(\d+)=(.+)$/.exec(item)
        if (m === null) return fail(`expected PORT=REGISTRY_URL, got ${JSON.stringify(item)}`)
        return { port: Number(m[1]), registry: m[2] }
      })
    }
    return items
  }
  if (typeof raw !== 'string') return fail('expected a value')
  return raw
}

function setPath (target: Record<string, unknown>, path: string[], value: unknown): void {
  let node = target
  for (const key of path.slice(0, -1)) {
    const next = node[key]
    if (next === undefined || next === null || typeof next !== 'object') node[key] = {}
    node = node[key] as Record<string, unknown>
  }
  node[path[path.length - 1] as string] = value
}

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1, k: 1e3, kb: 1e3, ki: 1024, kib: 1024, m: 1e6, mb: 1e6, mi: 1024 ** 2, mib: 1024 ** 2, g: 1e9, gb: 1e9, gi: 1024 ** 3, gib: 1024 ** 3, t: 1e12, tb: 1e12, ti: 1024 ** 4, tib: 1024 ** 4 }

/** "10GiB" → 10737418240; numbers are bytes. */
export function parseSize (value: string | number, key: string): number {
  if (typeof value === 'number') return value
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(value)
  const unit = SIZE_UNITS[(m?.[2] ?? '?').toLowerCase()]
  if (m === null || unit === undefined) throw new ConfigError(key, `not a size: ${JSON.stringify(value)} (try 512MiB or 10GiB)`)
  const bytes = Math.floor(Number(m[1]) * unit)
  if (!Number.isSafeInteger(bytes)) throw new ConfigError(key, `size too large: ${JSON.stringify(value)}`)
  return bytes
}

const DURATION_UNITS: Record<string, number> = { '': 1, ms: 1, s: 1000, m: 60_000, h: 3_600_000 }

/** "30s" → 30000; numbers are milliseconds. */
export function parseDuration (value: string | number, key: string): number {
  if (typeof value === 'number') return value
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(value)
  if (m === null) throw new ConfigError(key, `not a duration: ${JSON.stringify(value)} (try 500ms, 30s or 5m)`)
  return Math.round(Number(m[1]) * (DURATION_UNITS[m[2] ?? ''] ?? 1))
}

function clusterSecret (swarm: { clusterSecret: string, clusterSecretFile: string }): string {
  let secret = swarm.clusterSecret
  if (swarm.clusterSecretFile !== '') {
    if (secret !== '') throw new ConfigError('swarm.clusterSecretFile', 'set either clusterSecret or clusterSecretFile, not both')
    try {
      secret = readFileSync(swarm.clusterSecretFile, 'utf8').trim()
    } catch (err) {
      throw new ConfigError('swarm.clusterSecretFile', `cannot read ${swarm.clusterSecretFile}: ${(err as Error).message}`)
    }
  }
  if (secret !== '' && secret.length < 16) throw new ConfigError(swarm.clusterSecretFile !== '' ? 'swarm.clusterSecretFile' : 'swarm.clusterSecret', 'must be at least 16 characters')
  return secret
}

function apiToken (api: { token: string, tokenFile: string }): string {
  let token = api.token
  if (api.tokenFile !== '') {
    if (token !== '') throw new ConfigError('api.tokenFile', 'set either api.token or api.tokenFile, not both')
    try {
      token = readFileSync(api.tokenFile, 'utf8').trim()
    } catch (err) {
      throw new ConfigError('api.tokenFile', `cannot read ${api.tokenFile}: ${(err as Error).message}`)
    }
  }
  const key = api.tokenFile !== '' ? 'api.tokenFile' : 'api.token'
  if (token !== '' && token.length < 16) throw new ConfigError(key, 'must be at least 16 characters')
  if (!/^[\x21-\x7e]*$/.test(token)) throw new ConfigError(key, 'must be printable ASCII without spaces (it travels in an Authorization header)')
  return token
}

function splitWords (camel: string): string[] {
  return camel.replace(/([a-z0-9])([A-Z])/g, '$1 $2').toLowerCase().split(' ')
}

function deepFreeze<T> (value: T): T {
  if (value !== null && typeof value === 'object') {
    for (const v of Object.values(value)) deepFreeze(v)
    Object.freeze(value)
  }
  return value
}
