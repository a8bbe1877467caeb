import { mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { lowerBound, startCluster, type Cluster, type ClusterNode } from '../../test/helpers/cluster.ts'
import { compiledTree } from '../../test/helpers/compiled.ts'
import { buildImage } from '../../test/helpers/image.ts'
import { netnsUnavailable, type LinkShape } from '../../test/helpers/netns.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
import { MIB, deployedPeerEnv, percentile, round, type Row, type Scenario } from '../lib.ts'
import { finishPlot, type Curve } from '../sim/plot.ts'

const RESULTS = fileURLToPath(new URL('../results/', import.meta.url))

/**
 * Links sized so that the network, not the two cores, is the limit: a
 * relaying peer costs about 9 ms of CPU per MiB here, and N nodes pulling at
 * the origin's pace move N × u₀ = 32 MiB/s at N = 32. The delay needs sch_netem
 * (left out when the kernel has none; the rows say which).
 */
const LINK: LinkShape = { up: 2 * MIB, down: 2 * MIB, delayMs: 2 }
const ORIGIN: LinkShape = { up: 1 * MIB, down: 16 * MIB, delayMs: 2 }
/** The heterogeneous case's slow quarter: a fifth of the bandwidth. */
const SLOW: LinkShape = { up: 0.4 * MIB, down: 0.4 * MIB, delayMs: 2 }
/** Where the two nodes die in the churn case, as a share of T*. */
const KILL_AT = 0.4
/** How long to wait, at most, for the peers to stop fetching between cases. */
const QUIET_MAX_S = 45

interface Case {
  name: string
  nodes: number
  /** Layer sizes in MiB (the manifest and config come on top). */
  layers: number[]
  /** Every node straight from the origin, no peer in between. */
  direct?: boolean
  /** Every fourth node (index 3, 7, …) on SLOW links. */
  slowQuarter?: boolean
  /** Nodes SIGKILLed at KILL_AT × T*. */
  kill?: number[]
  /** Readers still pulling at this many T* are stopped and count as failed. */
  deadline: number
  targets: { slowest?: number, origin?: number }
}

interface Measured {
  c: Case
  tStar: number
  /** Finish times of the nodes that were not killed, in seconds, ascending (finished ones only). */
  finished: number[]
  pulling: number
}

/**
 * Real peers, scheduler, seed and origin registry, each in its own network
 * namespace with tc-shaped links (test/helpers/netns.ts, cluster.ts), pulling
 * a cold image at once; every figure is against T* = max(S/u₀, S/min dᵢ,
 * N·S/(u₀ + Σuᵢ)). Without the swarm, every node pulls straight from the
 * origin through the same links (a smaller image: that takes N times as long,
 * and its ratio does not depend on S). Readers still pulling at the case's
 * deadline (a multiple of T*) are stopped; the peers are then left to go
 * quiet before the next case. Needs root; --quick runs six nodes.
 */
export const cluster: Scenario = {
  name: 'cluster',
  async run ({ quick, log }) {
    const unavailable = await netnsUnavailable()
    if (unavailable !== undefined) throw new Error(`the emulated cluster cannot run here: ${unavailable}`)
    const cases: Case[] = quick
      ? [
          { name: 'N=6, swarm', nodes: 6, layers: [4, 2, 1, 1], deadline: 6, targets: {} },
          { name: 'N=6, no swarm', nodes: 6, layers: [1, 1], direct: true, deadline: 12, targets: {} }
        ]
      : [
          { name: 'N=16, swarm', nodes: 16, layers: [4, 3, 2, 2, 1], deadline: 8, targets: {} },
          { name: 'N=16, no swarm', nodes: 16, layers: [1, 1], direct: true, deadline: 32, targets: {} },
          // One layer the seed takes 48 s to read from the origin: long past a child's patience with parents that
          // have not got a piece yet, which used to send the crowd to the origin beside the seed.
          { name: 'N=16, one 48 MiB layer', nodes: 16, layers: [48], deadline: 6, targets: {} },
          { name: 'N=32, one 48 MiB layer', nodes: 32, layers: [48], deadline: 6, targets: {} },
          { name: 'N=32, swarm', nodes: 32, layers: [4, 3, 2, 2, 1], deadline: 8, targets: { slowest: 1.3, origin: 1.05 } },
          { name: 'N=32, no swarm', nodes: 32, layers: [1, 1], direct: true, deadline: 64, targets: {} },
          { name: 'N=32, a quarter at a fifth of the bandwidth', nodes: 32, layers: [3, 2, 1], slowQuarter: true, deadline: 6, targets: {} },
          { name: 'N=32, two nodes killed mid-pull', nodes: 32, layers: [4, 3, 2, 2, 1], kill: [5, 22], deadline: 8, targets: { slowest: 1.5, origin: 1.05 } }
        ]
    const work = await tmpDir('df-bench-cluster-')
    const rows: Row[] = []
    const measured: Measured[] = []
    let c: Cluster | undefined
    try {
      c = await startCluster({
        nodes: Math.max(...cases.map(k => k.nodes)),
        // As the image runs them: compiled to JavaScript, so no process keeps the TypeScript stripper.
        cli: await compiledTree(path.join(work.path, 'dist')),
        link: LINK,
        origin: ORIGIN,
        peerEnv: deployedPeerEnv(),
        // As deploy/kubernetes/base/config/seed-peer.yaml runs it.
        seedArgs: ['--memory-cache-size', '128MiB'],
        log
      })
      await warmUp(c, path.join(work.path, 'warm-up'), log)
      for (const [k, kase] of cases.entries()) {
        const m = await runCase(c, kase, path.join(work.path, `image-${k}`), `bench-cluster-${k}-${Date.now()}`, log, rows)
        measured.push(m)
      }
      rows.push({ scenario: 'cluster', metric: 'added latency per link end (ms)', value: c.network.latency === 'netem' ? LINK.delayMs ?? 0 : 0, unit: 'ms', detail: { latency: c.network.latency, note: c.network.latency === 'netem' ? undefined : 'this kernel has no sch_netem: links are shaped in rate only' } })
    } finally {
      await c?.close()
      await work.cleanup()
    }
    if (!quick) await writePlots(measured)
    return rows
  }
}

async function runCase (c: Cluster, kase: Case, dir: string, seedName: string, log: (line: string) => void, rows: Row[]): Promise<Measured> {
  const pulling = c.nodes.slice(0, kase.nodes)
  const slow = (n: ClusterNode): boolean => kase.slowQuarter === true && n.index % 4 === 3
  const image = await buildImage(dir, { layers: kase.layers.map(l => l * MIB), seed: seedName, tag: 'v1' })
  const repo = `bench/cluster-${seedName}`
  await c.push(image, repo)
  const S = image.totalBytes
  const killed = new Set(kase.kill ?? [])
  const staying = pulling.filter(n => !killed.has(n.index))
  const tStar = lowerBound(S, ORIGIN.up as number, staying.map(n => slow(n) ? SLOW : LINK))
  for (const n of pulling) if (slow(n)) await n.node.reshape(SLOW)
  const before = await swarmCounters(c, pulling.filter(n => !killed.has(n.index)))
  const deadlineMs = kase.deadline * tStar * 1000
  let report
  try {
    report = await c.pull(repo, 'v1', pulling, {
      ...(kase.direct === true ? { direct: true } : {}),
      deadlineMs,
      during: async () => {
        if (killed.size === 0) return
        await sleep(KILL_AT * tStar * 1000)
        await Promise.all(pulling.filter(n => killed.has(n.index)).map(async n => { await n.peer.kill() }))
        log(`cluster ${kase.name}: killed ${[...killed].map(i => `n${i}`).join(' and ')} at ${KILL_AT}× T*`)
      }
    })
  } finally {
    for (const n of pulling) if (slow(n)) await n.node.reshape(LINK)
    // Killed peers come back (empty-handed: their readers never finished) for the cases after.
    for (const n of pulling) if (killed.has(n.index)) await n.peer.start()
  }
  const counters = difference(await swarmCounters(c, pulling.filter(n => !killed.has(n.index))), before)
  // Peers go on with pieces their stopped readers had asked for: wait for that to end before the next case.
  const quiet = await quiesce(c)
  if (quiet > 1) log(`cluster ${kase.name}: the peers went quiet ${quiet.toFixed(0)} s after the pull`)
  const seedSent = counters.seedUploaded ?? 0
  const outcomes = report.outcomes.filter(o => !killed.has(o.index))
  const unfinished = outcomes.filter(o => o.unfinished)
  const failed = outcomes.filter(o => !o.ok && !o.unfinished)
  const seconds = outcomes.filter(o => o.ok).map(o => o.ms / 1000).sort((a, b) => a - b)
  const ratio = (s: number): number => Number.isFinite(s) ? round(s / tStar, 3) : Infinity
  const slowest = failed.length + unfinished.length > 0 ? Infinity : Math.max(...seconds)
  const p50 = percentile(outcomes.map(o => o.ok ? o.ms / 1000 : Infinity), 50)
  const slowTimes = outcomes.filter(o => o.ok && kase.slowQuarter === true && o.index % 4 === 3).map(o => o.ms / 1000)
  const detail = {
    nodes: kase.nodes,
    imageBytes: S,
    tStarSeconds: round(tStar, 3),
    slowestSeconds: round(slowest, 2),
    originBytes: report.originBytes,
    seedUploadedBytes: seedSent,
    failed: failed.map(o => ({ node: `n${o.index}`, error: o.error?.slice(0, 300) })),
    unfinishedAtDeadline: unfinished.map(o => `n${o.index}`),
    deadlineTStar: kase.deadline,
    killed: [...killed].map(i => `n${i}`),
    cpuIdle: round(report.cpuIdle, 3),
    clusterCores: round(report.clusterCpuSeconds / (report.wallMs / 1000), 3),
    counters,
    links: { nodeUp: LINK.up, nodeDown: LINK.down, originUp: ORIGIN.up, slow: kase.slowQuarter === true ? SLOW : undefined },
    ...(slowTimes.length > 0 ? { slowNodesSlowestSeconds: round(Math.max(...slowTimes), 2), fastNodesSlowestSeconds: round(Math.max(...outcomes.filter(o => o.ok && o.index % 4 !== 3).map(o => o.ms / 1000)), 2) } : {}),
    times: seconds.map(s => round(s, 2))
  }
  log(`cluster ${kase.name}: S ${(S / MIB).toFixed(1)} MiB, T* ${tStar.toFixed(1)} s, slowest ${ratio(slowest)}× T*, p50 ${ratio(p50)}×, origin ${round(report.originBytes / S, 3)}× S, seed sent ${round(seedSent / S, 2)}× S, ${failed.length} failed, ${unfinished.length} unfinished at ${kase.deadline}× T*, CPU idle ${Math.round(report.cpuIdle * 100)}% (the cluster's processes ${round(report.clusterCpuSeconds / (report.wallMs / 1000), 2)} cores), ${JSON.stringify(counters)}`)
  const scenario = 'cluster'
  const target = (v: number | undefined): Row['target'] => v === undefined ? undefined : { op: '<=', value: v }
  rows.push(
    { scenario, metric: `${kase.name}: slowest ÷ T*`, value: ratio(slowest), unit: 'x', target: target(kase.targets.slowest), detail },
    { scenario, metric: `${kase.name}: p50 ÷ T*`, value: ratio(p50), unit: 'x', detail },
    { scenario, metric: `${kase.name}: origin ÷ S`, value: round(report.originBytes / S, 3), unit: 'x', target: target(kase.targets.origin), detail },
    { scenario, metric: `${kase.name}: failed pulls (killed nodes not counted)`, value: failed.length, unit: 'pulls', target: { op: '<=', value: 0 }, detail },
    ...(unfinished.length === 0 ? [] : [{ scenario, metric: `${kase.name}: pulls unfinished at ${kase.deadline}× T* (stopped)`, value: unfinished.length, unit: 'pulls', detail }]),
    ...(kase.direct === true ? [] : [{ scenario, metric: `${kase.name}: the seed's upload ÷ S`, value: round(seedSent / S, 3), unit: 'x', detail }]),
    { scenario, metric: `${kase.name}: CPU idle during the pull (other work on the machine included)`, value: Math.round(report.cpuIdle * 100), unit: '%', detail },
    { scenario, metric: `${kase.name}: cores the cluster's processes used (of 2)`, value: round(report.clusterCpuSeconds / (report.wallMs / 1000), 2), unit: 'cores', detail }
  )
  return { c: kase, tStar, finished: seconds, pulling: staying.length }
}

/**
 * Every node pulls a small image once before anything is timed. Fresh
 * processes spend their first pull compiling: V8 optimising the peers' code
 * and undici's WebAssembly HTTP parser, 32 at once on two cores. A
 * DaemonSet's peers have been up long before a crowd pulls through them.
 */
async function warmUp (c: Cluster, dir: string, log: (line: string) => void): Promise<void> {
  const image = await buildImage(dir, { layers: [MIB, MIB], seed: `bench-cluster-warm-up-${Date.now()}`, tag: 'v1' })
  const repo = 'bench/cluster-warm-up'
  await c.push(image, repo)
  const started = Date.now()
  const report = await c.pull(repo, 'v1', c.nodes, { deadlineMs: 300_000 })
  const failed = report.outcomes.filter(o => !o.ok).length
  if (failed > 0) throw new Error(`cluster warm-up: ${failed} of ${c.nodes.length} pulls failed: ${report.outcomes.find(o => !o.ok)?.error ?? ''}`)
  await quiesce(c)
  log(`cluster: warm-up pull of ${(image.totalBytes / MIB).toFixed(1)} MiB by ${c.nodes.length} nodes in ${((Date.now() - started) / 1000).toFixed(1)} s`)
}

type Counters = Record<string, number>

/**
 * Swarm counters summed over the pulling peers (bytes fetched by source,
 * origin fallbacks by reason, hedged pieces, piece requests they answered by
 * answer, hints followed, busy pauses) and the seed's upload.
 */
async function swarmCounters (c: Cluster, nodes: readonly ClusterNode[]): Promise<Counters> {
  const seed = await c.seed.metrics()
  const out: Counters = { seedUploaded: seed.get('damselfly_uploaded_bytes_total') }
  const add = (key: string, v: number): void => { out[key] = (out[key] ?? 0) + v }
  for (const [answer, v] of Object.entries(seed.byLabel('damselfly_piece_requests_total', 'status'))) add(`seed requests answered ${answer}`, v)
  for (const n of nodes) {
    const m = await n.peer.metrics()
    for (const [source, v] of Object.entries(m.byLabel('damselfly_fetched_bytes_total', 'source'))) add(`fetched from ${source}`, v)
    for (const [reason, v] of Object.entries(m.byLabel('damselfly_swarm_origin_fallbacks_total', 'reason'))) add(`origin fallbacks: ${reason}`, v)
    add('hedged pieces', m.get('damselfly_pieces_hedged_total'))
    add('peers uploaded', m.get('damselfly_uploaded_bytes_total'))
    // The swarm's own chatter: every busy answer is a request and a reply that moved no piece.
    for (const [answer, v] of Object.entries(m.byLabel('damselfly_piece_requests_total', 'status'))) add(`piece requests answered ${answer}`, v)
    add('hints followed', m.get('damselfly_piece_hints_followed_total'))
    add('busy pauses', m.get('damselfly_parents_busy_total'))
  }
  return out
}

/** Waits until no peer fetches anything for two polls in a row (at most QUIET_MAX_S); returns the seconds waited. */
async function quiesce (c: Cluster): Promise<number> {
  const started = Date.now()
  const fetched = async (): Promise<number> => {
    let sum = 0
    for (const n of c.nodes) {
      if (n.peer.pid === undefined) continue
      sum += (await n.peer.metrics()).get('damselfly_fetched_bytes_total')
    }
    return sum
  }
  let last = await fetched()
  let still = 0
  while (still < 2 && Date.now() - started < QUIET_MAX_S * 1000) {
    await sleep(1_000)
    const now = await fetched()
    still = now === last ? still + 1 : 0
    last = now
  }
  return (Date.now() - started) / 1000
}

function difference (after: Counters, before: Counters): Counters {
  const out: Counters = {}
  for (const [k, v] of Object.entries(after)) if (v - (before[k] ?? 0) !== 0) out[k] = v - (before[k] ?? 0)
  return out
}

/** One plot per N: nodes finished over time ÷ T* (each case against its own T*), the no-swarm slowest in the legend. */
async function writePlots (measured: Measured[]): Promise<void> {
  await mkdir(RESULTS, { recursive: true })
  for (const n of new Set(measured.map(m => m.c.nodes))) {
    const at = measured.filter(m => m.c.nodes === n)
    const direct = at.find(m => m.c.direct === true)
    const directSlowest = direct === undefined || direct.finished.length < direct.pulling ? undefined : Math.max(...direct.finished) / direct.tStar
    const curves: Curve[] = at.filter(m => m.c.direct !== true).map(m => ({
      label: `${m.c.name.replace(/^N=\d+, /, '')}: ${m.finished.length} of ${m.pulling} (T* ${m.tStar.toFixed(1)} s)`,
      finished: m.finished.map(s => s / m.tStar),
      nodes: m.pulling
    }))
    const title = `Emulated cluster, N=${n}${directSlowest === undefined ? '' : ` (without the swarm: slowest ${directSlowest.toFixed(1)}× T*)`}`
    await writeFile(path.join(RESULTS, `cluster-${n}.svg`), finishPlot(title, 1, curves, { xLabel: 'time since the pull started ÷ T*' }))
  }
}
