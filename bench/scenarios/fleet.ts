import { mkdir, writeFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { run } from '../../test/helpers/process.ts'
import { round, type Row, type Scenario } from '../lib.ts'
import { finishPlot } from '../sim/plot.ts'
import type { FleetSummary } from '../fleet-sim.ts'

const SIM = fileURLToPath(new URL('../fleet-sim.ts', import.meta.url))
const RESULTS = fileURLToPath(new URL('../results/', import.meta.url))

interface Case {
  name: string
  nodes: number
  leaving: number
  late: number
  /** Stop there (in T*) and report what did not finish. */
  horizon: number
  targets: { p50?: number, p99?: number, slowest?: number, origin?: number }
}

/**
 * The scheduler's own state, event machine and parent selection driven by a
 * discrete-event simulation of a fleet pulling one 1 GiB blob at once
 * (bench/sim/fleet.ts: the peers' fetcher, uploads and announcements as
 * modelled there; links as fair shares). Each run is its own process, seeded,
 * so the same code gives the same figures. Times are each peer's pull time ÷
 * T*, the lower bound on any schedule; --quick runs N = 1,000 only.
 */
export const fleet: Scenario = {
  name: 'fleet',
  async run ({ quick, log }) {
    const cases: Case[] = [
      { name: 'N=1,000', nodes: 1_000, leaving: 0, late: 0, horizon: 40, targets: {} },
      ...(quick
        ? []
        : [
            { name: 'N=10,000', nodes: 10_000, leaving: 0, late: 0, horizon: 3, targets: { p50: 1.1, p99: 1.5, slowest: 2, origin: 1.05 } },
            { name: 'N=10,000, churn', nodes: 10_000, leaving: 0.1, late: 0.05, horizon: 3, targets: { p99: 2 } }
          ])
    ]
    const rows: Row[] = []
    await mkdir(RESULTS, { recursive: true })
    for (const c of cases) {
      const started = Date.now()
      const { stdout } = await run(process.execPath, ['--max-old-space-size=8192', SIM, String(c.nodes), '--leaving', String(c.leaving), '--late', String(c.late), '--horizon', String(c.horizon), '--quiet'], { timeoutMs: 3 * 3_600_000 })
      const r = JSON.parse(stdout.trim().split('\n').pop() as string) as FleetSummary
      const wall = Math.round((Date.now() - started) / 1000)
      const tStar = r.tStarMs
      const ratio = (ms: number | null): number => ms === null ? Infinity : round(ms / tStar, 3)
      const detail = { ...r, curve: undefined, wallSeconds: wall }
      log(`fleet ${c.name}: T* ${(tStar / 1000).toFixed(2)} s, p50 ${ratio(r.p50)}×, p99 ${ratio(r.p99)}×, slowest ${ratio(r.slowest)}×, unfinished ${r.unfinished} of ${r.stayed} at ${c.horizon}× T* (${Math.round(r.delivered * 100)}% of the bytes), origin ${round(r.originRatio, 3)}× S, plans ${Math.round(r.plansPerSecond)}/s (${round(r.plansPerNodeSecond, 3)}/node/s), ${wall} s of wall time`)
      const svg = `fleet-${c.nodes}${c.leaving > 0 ? '-churn' : ''}.svg`
      await writeFile(`${RESULTS}/${svg}`, finishPlot(`${c.name}: 1 GiB, nodes finished over time (T* = ${(tStar / 1000).toFixed(2)} s)`, tStar / 1000, [
        { label: `${r.curve.length} of ${r.stayed} finished`, finished: r.curve.map(ms => ms / 1000), nodes: r.stayed }
      ]))
      const target = (v: number | undefined): Row['target'] => v === undefined ? undefined : { op: '<=', value: v }
      const scenario = 'fleet'
      rows.push(
        { scenario, metric: `${c.name}: p50 ÷ T*`, value: ratio(r.p50), unit: 'x', target: target(c.targets.p50), detail },
        { scenario, metric: `${c.name}: p99 ÷ T*`, value: ratio(r.p99), unit: 'x', target: target(c.targets.p99), detail },
        { scenario, metric: `${c.name}: slowest ÷ T*`, value: ratio(r.slowest), unit: 'x', target: target(c.targets.slowest), detail },
        { scenario, metric: `${c.name}: origin ÷ S`, value: round(r.originRatio, 3), unit: 'x', target: target(c.targets.origin), detail },
        { scenario, metric: `${c.name}: plans asked of the scheduler`, value: Math.round(r.plansPerSecond), unit: 'req/s', detail },
        { scenario, metric: `${c.name}: plans per node`, value: round(r.plansPerNodeSecond, 3), unit: 'req/s', detail },
        { scenario, metric: `${c.name}: the scheduler's CPU (cores busy, plans and events)`, value: round(r.schedulerMs / r.makespanMs, 3), unit: 'x', detail },
        { scenario, metric: `${c.name}: piece requests sent to the seed`, value: round(r.toSeed, 3), unit: 'x', detail },
        { scenario, metric: `${c.name}: peers' upload capacity used`, value: round(r.peerUploadUse, 3), unit: 'x', detail },
        { scenario, metric: `${c.name}: of the blob, held at the end (1: all finished)`, value: round(r.delivered, 3), unit: 'x', detail }
      )
    }
    return rows
  }
}
