import { fileURLToPath } from 'node:url'
import path from 'node:path'
import { request } from 'undici'
import type { NetnsNode } from './netns.ts'
import { freePorts } from './ports.ts'
import { spawnProcess, waitFor, type Spawned } from './process.ts'
import { tmpDir } from './tmp.ts'

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')
const CLI = path.join(ROOT, 'bin', 'damselfly.js')

export interface PeerOptions {
  /** Default upstream registry URL. */
  registry: string
  /** Scheduler multiaddr or host:port; none runs the embedded scheduler. */
  scheduler?: string | undefined
  seed?: boolean
  dataDir?: string
  /** Extra flags, e.g. ['--cache-size', '64MiB']. */
  args?: string[]
  env?: NodeJS.ProcessEnv
  name?: string
  /** Address of every port (mirror, p2p, upload). Default 127.0.0.1; '::1' for IPv6. */
  host?: string
  /** Run inside this node's network namespace (test/helpers/netns.ts). */
  netns?: Pick<NetnsNode, 'command'>
  /** Mirror, p2p and upload ports; default: free ones (in a namespace of its own any port is free). */
  ports?: [number, number, number]
  /** The launcher to run; default the sources' `bin/damselfly.js` (a compiled one: deploy/build.ts). */
  cli?: string
}

export interface TestPeer {
  readonly name: string
  readonly url: string
  readonly port: number
  readonly p2pPort: number
  /** The HTTP upload port other peers fetch pieces from. */
  readonly uploadPort: number
  readonly dataDir: string
  /** The running process's id (for taskset and the like); undefined while stopped. */
  readonly pid: number | undefined
  /** Prometheus metrics of the peer, parsed. */
  metrics: () => Promise<Metrics>
  output: () => string
  /** SIGTERM and wait. */
  stop: () => Promise<void>
  /** SIGKILL: a node that dies without saying goodbye. */
  kill: () => Promise<void>
  /** Start again with the same ports and data dir. */
  start: () => Promise<void>
  close: () => Promise<void>
}

export interface TestScheduler {
  readonly address: string
  readonly httpUrl: string
  readonly dataDir: string
  /** The running process's id; undefined while stopped. */
  readonly pid: number | undefined
  output: () => string
  stop: () => Promise<void>
  kill: () => Promise<void>
  start: () => Promise<void>
  close: () => Promise<void>
}

/** Runs `damselfly peer` as its own process on loopback. */
export async function startPeer (options: PeerOptions): Promise<TestPeer> {
  // A free port can be taken by another process between our probe and the
  // peer's bind (test files and benchmarks run beside each other): try again with others.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startPeerOnce(options, options.ports ?? await freePorts(3) as [number, number, number])
    } catch (err) {
      if (attempt >= 3 || options.ports !== undefined || !String((err as Error).message).includes('EADDRINUSE')) throw err
    }
  }
}

async function startPeerOnce (options: PeerOptions, [port, p2pPort, uploadPort]: [number, number, number]): Promise<TestPeer> {
  const tmp = options.dataDir === undefined ? await tmpDir('df-peer-') : undefined
  const dataDir = options.dataDir ?? (tmp as { path: string }).path
  const name = options.name ?? `peer-${port}`
  const args = [
    options.cli ?? CLI, 'peer',
    '--data-dir', dataDir,
    '--host', options.host ?? '127.0.0.1',
    '--port', String(port),
    '--p2p-host', options.host ?? '127.0.0.1',
    '--p2p-port', String(p2pPort),
    '--upload-port', String(uploadPort),
    '--registry', options.registry,
    '--log-level', 'debug',
    ...(options.scheduler === undefined ? [] : ['--scheduler', options.scheduler]),
    ...(options.seed === true ? ['--seed'] : []),
    ...(options.args ?? [])
  ]
  let proc: Spawned | undefined
  const url = `http://${urlHost(options.host ?? '127.0.0.1')}:${port}`
  const start = async (): Promise<void> => {
    const started = spawnIn(options.netns, args, { ...process.env, ...options.env })
    proc = started
    await waitFor(async () => healthy(url), {
      timeoutMs: 30_000,
      what: `${name} to become healthy`,
      giveUpIf: () => started.child.exitCode !== null ? `${name} exited:\n${started.output().slice(-4000)}` : undefined
    }).catch((err: unknown) => {
      throw new Error(`${(err as Error).message}\n--- ${name} output ---\n${started.output().slice(-4000)}`, { cause: err })
    })
  }
  try {
    await start()
  } catch (err) {
    await proc?.stop()
    await tmp?.cleanup()
    throw err
  }
  return {
    name,
    url,
    port,
    p2pPort,
    uploadPort,
    dataDir,
    get pid () { return proc?.child.exitCode === null ? proc.child.pid : undefined },
    metrics: async () => scrape(`${url}/metrics`),
    output: () => proc?.output() ?? '',
    stop: async () => { await proc?.stop() },
    kill: async () => { await proc?.stop('SIGKILL') },
    start,
    close: async () => {
      await proc?.stop()
      await tmp?.cleanup()
    }
  }
}

/** Runs `damselfly scheduler` as its own process on loopback. */
export async function startScheduler (options: { args?: string[], env?: NodeJS.ProcessEnv, host?: string, netns?: Pick<NetnsNode, 'command'>, ports?: [number, number], cli?: string } = {}): Promise<TestScheduler> {
  const [port, httpPort] = options.ports ?? await freePorts(2) as [number, number]
  const tmp = await tmpDir('df-scheduler-')
  const host = options.host ?? '127.0.0.1'
  const args = [options.cli ?? CLI, 'scheduler', '--data-dir', tmp.path, '--host', host, '--port', String(port), '--http-host', host, '--http-port', String(httpPort), '--log-level', 'debug', ...(options.args ?? [])]
  const httpUrl = `http://${urlHost(host)}:${httpPort}`
  let proc: Spawned | undefined
  const start = async (): Promise<void> => {
    const started = spawnIn(options.netns, args, { ...process.env, ...options.env })
    proc = started
    await waitFor(async () => healthy(httpUrl), {
      timeoutMs: 30_000,
      what: 'the scheduler to become healthy',
      giveUpIf: () => started.child.exitCode !== null ? `scheduler exited:\n${started.output().slice(-4000)}` : undefined
    })
  }
  await start()
  return {
    address: `${urlHost(host)}:${port}`,
    httpUrl,
    dataDir: tmp.path,
    get pid () { return proc?.child.exitCode === null ? proc.child.pid : undefined },
    output: () => proc?.output() ?? '',
    stop: async () => { await proc?.stop() },
    kill: async () => { await proc?.stop('SIGKILL') },
    start,
    close: async () => {
      await proc?.stop()
      await tmp.cleanup()
    }
  }
}

/** This Node running `args`, in a network namespace when one is given (`ip netns exec` execs in place: the pid is Node's). */
function spawnIn (netns: Pick<NetnsNode, 'command'> | undefined, args: string[], env: NodeJS.ProcessEnv): Spawned {
  const { cmd, args: argv } = netns?.command(process.execPath, args) ?? { cmd: process.execPath, args }
  return spawnProcess(cmd, argv, { env })
}

/** An address as a URL's host: IPv6 in brackets. */
function urlHost (host: string): string {
  return host.includes(':') ? `[${host}]` : host
}

async function healthy (url: string): Promise<boolean> {
  try {
    const res = await request(`${url}/healthy`, { signal: AbortSignal.timeout(1_000) })
    await res.body.dump()
    return res.statusCode === 200
  } catch {
    return false
  }
}

/** Prometheus text, parsed into `name{labels}` → value (labels sorted as exposed). */
export class Metrics {
  readonly #values = new Map<string, number>()

  constructor (text: string) {
    for (const line of text.split('\n')) {
      if (line.startsWith('#') || line.trim() === '') continue
      const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/.exec(line)
      if (m === null) continue
      this.#values.set(`${m[1] as string}${m[2] ?? ''}`, Number(m[3]))
    }
  }

  /** A metric's values summed per value of one label (series without that label are left out). */
  byLabel (name: string, label: string): Record<string, number> {
    const out: Record<string, number> = {}
    for (const [key, value] of this.#values) {
      if (!key.startsWith(`${name}{`)) continue
      const m = new RegExp(`[{,]${label}="([^"]*)"`).exec(key)
      if (m !== null) out[m[1] as string] = (out[m[1] as string] ?? 0) + value
    }
    return out
  }

  /** Sum of a metric over every label set matching `labels`. */
  get (name: string, labels: Record<string, string> = {}): number {
    let sum = 0
    for (const [key, value] of this.#values) {
      if (key !== name && !key.startsWith(`${name}{`)) continue
      if (Object.entries(labels).every(([k, v]) => key.includes(`${k}="${v}"`))) sum += value
    }
    return sum
  }
}

async function scrape (url: string): Promise<Metrics> {
  const res = await request(url, { signal: AbortSignal.timeout(5_000) })
  return new Metrics(await res.body.text())
}
