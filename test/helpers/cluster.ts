import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { request } from 'undici'
import { pushImage, type BuiltImage } from './image.ts'
import { cpuTimes, createNetwork, type EmulatedNetwork, type LinkShape, type NetnsNode } from './netns.ts'
import { Metrics, startPeer, startScheduler, type PeerOptions, type TestPeer, type TestScheduler } from './peer.ts'
import { run } from './process.ts'
import { startRegistry, type TestRegistry } from './registry.ts'
import type { ReaderInit, ReaderResult } from './cluster-reader.ts'

/**
 * Real processes on an emulated network (test/helpers/netns.ts): the origin
 * registry and a seed peer in one namespace (the origin's uplink is that
 * namespace's link), the scheduler in another, and one peer per node in a
 * namespace of its own, every link shaped with tc. Readers run in the nodes'
 * namespaces and pull through their node's mirror (or, `direct`, straight
 * from the origin over the same links).
 */
export interface ClusterInit {
  nodes: number
  /** Every node's link unless `links` says otherwise. */
  link: LinkShape
  /** Per node (by index), overriding `link`. */
  links?: Array<LinkShape | undefined>
  /** The origin namespace's link (registry and seed): its `up` is u₀. */
  origin: LinkShape
  /** The launcher peers and scheduler run (e.g. compiled as the image holds it: test/helpers/compiled.ts); default the sources. */
  cli?: string
  /** Extra environment of every peer (e.g. the deployed malloc tuning). */
  peerEnv?: Record<string, string>
  /** Extra flags of every peer and the seed. */
  peerArgs?: string[]
  /** Extra flags of the seed alone (after peerArgs). */
  seedArgs?: string[]
  log?: (line: string) => void
}

export interface ClusterNode {
  readonly index: number
  readonly node: NetnsNode
  readonly peer: TestPeer
}

export interface PullOptions {
  /** Straight from the origin registry, no peer in between. */
  direct?: boolean
  /** Readers still pulling after this long are killed and count as failed. Default 10 minutes. */
  deadlineMs?: number
  /** Called once every reader has been told to start (e.g. to kill nodes mid-pull). */
  during?: (startedAt: number) => Promise<void>
}

export interface PullOutcome {
  index: number
  ok: boolean
  /** Milliseconds from the common start to the last verified byte (or the failure). */
  ms: number
  bytes: number
  /** Still pulling at the deadline (then also not ok). */
  unfinished: boolean
  error?: string | undefined
}

export interface PullReport {
  outcomes: PullOutcome[]
  /** Bytes the origin registry sent while the readers pulled (response bodies, as its own metrics count them). */
  originBytes: number
  /** Share of the machine's CPU time left idle while the readers pulled (other work on the machine included). */
  cpuIdle: number
  /** CPU seconds the cluster's own processes (peers, seed, scheduler, registry, readers) used while the readers pulled. */
  clusterCpuSeconds: number
  wallMs: number
}

export interface Cluster {
  readonly network: EmulatedNetwork
  readonly registry: TestRegistry
  readonly scheduler: TestScheduler
  readonly seed: TestPeer
  readonly nodes: readonly ClusterNode[]
  /** The origin registry as `host:port` (containerd's `ns=`). */
  readonly originHost: string
  /** Pushes an image to the origin (over the unshaped control link). */
  push: (image: BuiltImage, repo: string) => Promise<void>
  /** Every given node pulls `repo:tag` at once; resolves when all have finished or failed. */
  pull: (repo: string, tag: string, nodes: readonly ClusterNode[], options?: PullOptions) => Promise<PullReport>
  /** Stops every process, then removes the network. Never throws. */
  close: () => Promise<void>
}

const READER = fileURLToPath(new URL('./cluster-reader.ts', import.meta.url))
const REGISTRY_PORT = 5000
const SCHEDULER_PORTS: [number, number] = [8002, 8080]
const PEER_PORTS: [number, number, number] = [4001, 4000, 4002]
const SEED_PORTS: [number, number, number] = [4101, 4100, 4102]
/** Peers started at once: a dozen Node processes compiling together on two cores miss their start deadline. */
const START_BATCH = 4
const REGISTRY_METRICS_PORT = 5001

export async function startCluster (init: ClusterInit): Promise<Cluster> {
  const log = init.log ?? (() => {})
  const network = await createNetwork()
  let registry: TestRegistry | undefined
  let scheduler: TestScheduler | undefined
  let seed: TestPeer | undefined
  const nodes: ClusterNode[] = []
  const close = async (): Promise<void> => {
    await Promise.allSettled(nodes.map(async n => { await n.peer.close() }))
    await seed?.close().catch(() => {})
    await scheduler?.close().catch(() => {})
    await registry?.close().catch(() => {})
    await network.close()
  }
  try {
    const secret = randomBytes(24).toString('hex')
    const env = { ...init.peerEnv, DAMSELFLY_CLUSTER_SECRET: secret }
    const originNode = await network.addNode('origin', init.origin)
    const schedulerNode = await network.addNode('scheduler', {})
    registry = await startRegistry({ netns: originNode, host: originNode.address, port: REGISTRY_PORT, metricsPort: REGISTRY_METRICS_PORT })
    const originUrl = registry.url
    scheduler = await startScheduler({ ...(init.cli === undefined ? {} : { cli: init.cli }), netns: schedulerNode, host: schedulerNode.address, ports: SCHEDULER_PORTS, env: { DAMSELFLY_CLUSTER_SECRET: secret }, args: ['--log-level', 'warn'] })
    const schedulerAddress = scheduler.address
    const peerOptions = (node: NetnsNode, ports: [number, number, number], seed: boolean): PeerOptions => ({
      name: seed ? 'seed' : node.name,
      ...(init.cli === undefined ? {} : { cli: init.cli }),
      netns: node,
      host: node.address,
      ports,
      seed,
      registry: originUrl,
      scheduler: schedulerAddress,
      env,
      args: ['--log-level', 'warn', ...(init.peerArgs ?? []), ...(seed ? init.seedArgs ?? [] : [])]
    })
    seed = await startPeer(peerOptions(originNode, SEED_PORTS, true))
    log(`cluster: network ${network.subnet} (latency: ${network.latency}), origin, scheduler and seed up`)
    const netnsNodes: NetnsNode[] = []
    for (let i = 0; i < init.nodes; i++) netnsNodes.push(await network.addNode(`n${i}`, init.links?.[i] ?? init.link))
    for (let first = 0; first < init.nodes; first += START_BATCH) {
      const batch = await Promise.allSettled(netnsNodes.slice(first, first + START_BATCH).map(async (node, k) => {
        const peer = await startPeer(peerOptions(node, PEER_PORTS, false))
        return { index: first + k, node, peer }
      }))
      for (const r of batch) if (r.status === 'fulfilled') nodes.push(r.value)
      const failed = batch.find(r => r.status === 'rejected')
      if (failed !== undefined) throw failed.reason
    }
    nodes.sort((a, b) => a.index - b.index)
    log(`cluster: ${nodes.length} peers up`)

    const metricsUrl = `http://${originNode.address}:${REGISTRY_METRICS_PORT}/metrics`
    const originBytes = async (): Promise<number> => {
      const res = await request(metricsUrl, { signal: AbortSignal.timeout(10_000) })
      return new Metrics(await res.body.text()).get('registry_http_response_size_bytes_sum')
    }

    return {
      network,
      registry,
      scheduler,
      seed,
      nodes,
      originHost: registry.host,
      async push (image, repo) {
        await pushImage(image, `${(registry as TestRegistry).host}/${repo}:${image.tag}`)
      },
      async pull (repo, tag, pulling, options = {}) {
        const readers = pulling.map(n => startReader(n.node, {
          base: options.direct === true ? originUrl : (n.peer.url),
          repo,
          tag,
          ...(options.direct === true ? {} : { ns: (registry as TestRegistry).host })
        }))
        try {
          await Promise.all(readers.map(async r => r.ready))
          const sentBefore = await originBytes()
          const pids = [registry?.pid, scheduler?.pid, seed?.pid, ...nodes.map(n => n.peer.pid)].filter(p => p !== undefined)
          const processCpuBefore = await processCpuSeconds(pids)
          const cpuBefore = await cpuTimes()
          const startedAt = Date.now()
          for (const r of readers) r.go()
          const deadline = setTimeout(() => { for (const r of readers) r.kill(true) }, options.deadlineMs ?? 600_000)
          let results: ReaderResult[]
          try {
            const during = options.during?.(startedAt)
            results = await Promise.all(readers.map(async r => r.result))
            await during
          } finally {
            clearTimeout(deadline)
          }
          const wallMs = Date.now() - startedAt
          const cpuAfter = await cpuTimes()
          const readersCpu = results.reduce((sum, r) => sum + (r.cpuMs ?? 0) / 1000, 0)
          const processCpu = await processCpuSeconds(pids)
          const sent = await originBytes() - sentBefore
          return {
            outcomes: results.map((r, k) => ({
              index: (pulling[k] as ClusterNode).index,
              ok: r.ok,
              ms: r.finishedAt - startedAt,
              bytes: r.bytes,
              unfinished: (readers[k] as Reader).stoppedAtDeadline,
              error: r.error
            })),
            originBytes: sent,
            cpuIdle: (cpuAfter.idle - cpuBefore.idle) / Math.max(1, cpuAfter.total - cpuBefore.total),
            clusterCpuSeconds: readersCpu + processCpu - processCpuBefore,
            wallMs
          }
        } finally {
          for (const r of readers) r.kill(false)
          await Promise.allSettled(readers.map(async r => r.result))
        }
      },
      close
    }
  } catch (err) {
    await close()
    throw err
  }
}

interface Reader {
  ready: Promise<void>
  result: Promise<ReaderResult>
  go: () => void
  /** SIGKILL, unless it has ended already; `deadline` marks it as stopped for being too slow. */
  kill: (deadline: boolean) => void
  readonly stoppedAtDeadline: boolean
}

/** A cluster-reader.ts process in the node's namespace, loaded and waiting for go(). */
function startReader (node: NetnsNode, init: ReaderInit): Reader {
  const { cmd, args } = node.command(process.execPath, [READER, JSON.stringify(init)])
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] })
  let stoppedAtDeadline = false
  let stderr = ''
  child.stderr.on('data', (chunk: Buffer) => { stderr = (stderr + chunk.toString()).slice(-4000) })
  child.stdin.on('error', () => {}) // a reader that died does not read its go
  const lines = createInterface({ input: child.stdout })
  let last = ''
  const ready = new Promise<void>((resolve, reject) => {
    lines.on('line', line => {
      if (line === 'ready') resolve()
      else last = line
    })
    child.once('exit', () => { reject(new Error(`reader in ${node.name} exited before it was ready:\n${stderr}`)) })
  })
  ready.catch(() => {}) // also awaited through result
  const result = new Promise<ReaderResult>(resolve => {
    child.once('close', (code, signal) => {
      try {
        resolve(JSON.parse(last) as ReaderResult)
      } catch {
        resolve({ ok: false, finishedAt: Date.now(), bytes: 0, blobs: 0, cpuMs: 0, error: stoppedAtDeadline ? 'still pulling at the deadline' : `reader in ${node.name} ended (${code ?? signal ?? '?'}) without a result:\n${stderr}` })
      }
    })
  })
  return {
    ready,
    result,
    go: () => { child.stdin.end('go\n') },
    kill: (deadline) => {
      if (child.exitCode !== null || child.signalCode !== null) return
      stoppedAtDeadline ||= deadline
      child.kill('SIGKILL')
    },
    get stoppedAtDeadline () { return stoppedAtDeadline }
  }
}

/** User and system CPU seconds of these processes so far (those that have exited count nothing). */
async function processCpuSeconds (pids: readonly number[]): Promise<number> {
  const ticks = await clockTicks()
  let sum = 0
  for (const pid of pids) {
    try {
      // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
      const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      sum += (Number(fields[11]) + Number(fields[12])) / ticks
    } catch {
      // Exited (a killed node): its time is lost, which only makes the figure smaller.
    }
  }
  return sum
}

let ticksPerSecond: number | undefined
async function clockTicks (): Promise<number> {
  ticksPerSecond ??= Number((await run('getconf', ['CLK_TCK'], { timeoutMs: 10_000 })).stdout.trim()) || 100
  return ticksPerSecond
}

/**
 * The lower bound on any schedule: T* = max(S/u₀, S/min dᵢ, N·S/(u₀ + Σuᵢ)),
 * in seconds, for S bytes, the origin's uplink u₀ and the nodes' links.
 */
export function lowerBound (bytes: number, originUp: number, links: readonly LinkShape[]): number {
  const downs = links.map(l => l.down ?? Infinity)
  const ups = links.reduce((sum, l) => sum + (l.up ?? Infinity), 0)
  return Math.max(bytes / originUp, bytes / Math.min(...downs), links.length * bytes / (originUp + ups))
}
