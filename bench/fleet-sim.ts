/**
 * One fleet simulation (bench/sim/fleet.ts) in a process of its own, its
 * result printed as one JSON line: `node bench/fleet-sim.ts <nodes>
 * [--seed n] [--leaving f] [--late f] [--horizon xT*] [--lookahead n]
 * [--inflight n] [--readahead n] [--blob-mib n] [--links even|max-min]
 * [--svg file] [--quiet]`. Progress goes to stderr once per simulated second.
 * --lookahead and --inflight are what-ifs of the reader's window (256) and
 * pieces under way (8); --lookahead 0 reads in order, --readahead ahead (the
 * reader before 2026-12-02: 4). --links max-min shares links max-min fairly
 * (exact, slower) instead of the default even shares.
 */
import { writeFile } from 'node:fs/promises'
import { parseArgs } from 'node:util'
import { FLEET_DEFAULTS, PEER_DEFAULTS, simulateFleet, type FleetResult } from './sim/fleet.ts'
import { finishPlot } from './sim/plot.ts'

/** The result as printed: times ÷ nothing (ms), `null` for a percentile some peers never reached. */
export type FleetSummary = Omit<FleetResult, 'times' | 'finishedAt' | 'p50' | 'p99' | 'slowest'> & {
  p50: number | null
  p99: number | null
  slowest: number | null
  /** Finish times since the start, ms, ascending: the plot. */
  curve: number[]
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    seed: { type: 'string', default: '1' },
    leaving: { type: 'string', default: '0' },
    late: { type: 'string', default: '0' },
    horizon: { type: 'string', default: String(FLEET_DEFAULTS.horizon) },
    readahead: { type: 'string', default: String(PEER_DEFAULTS.readahead) },
    lookahead: { type: 'string', default: String(PEER_DEFAULTS.lookahead) },
    inflight: { type: 'string', default: String(PEER_DEFAULTS.inflight) },
    'blob-mib': { type: 'string', default: String(FLEET_DEFAULTS.blobBytes / 1048576) },
    links: { type: 'string', default: 'even' },
    svg: { type: 'string' },
    quiet: { type: 'boolean', default: false }
  }
})
const nodes = Number(positionals[0] ?? 1000)
const result = simulateFleet({
  ...FLEET_DEFAULTS,
  nodes,
  seed: Number(values.seed),
  leaving: Number(values.leaving),
  late: Number(values.late),
  horizon: Number(values.horizon),
  blobBytes: Number(values['blob-mib']) * 1048576,
  network: values.links === 'max-min' ? 'max-min' : 'even',
  peer: { ...PEER_DEFAULTS, readahead: Number(values.readahead), lookahead: Number(values.lookahead), inflight: Number(values.inflight) },
  log: values.quiet === true ? undefined : (line) => { process.stderr.write(`${line}\n`) }
})
const finite = (v: number): number | null => Number.isFinite(v) ? v : null
const { times, finishedAt, ...rest } = result
void times
const summary: FleetSummary = { ...rest, p50: finite(result.p50), p99: finite(result.p99), slowest: finite(result.slowest), curve: finishedAt.map(ms => Math.round(ms)) }
if (values.svg !== undefined) {
  await writeFile(values.svg, finishPlot(`N=${nodes}: nodes finished over time (T* = ${(result.tStarMs / 1000).toFixed(2)} s)`, result.tStarMs / 1000, [
    { label: `${finishedAt.length} of ${result.stayed} finished`, finished: finishedAt.map(ms => ms / 1000), nodes: result.stayed }
  ]))
}
process.stdout.write(JSON.stringify(summary) + '\n')
