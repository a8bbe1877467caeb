import { mkdir, writeFile } from 'node:fs/promises'
import { cpus, totalmem } from 'node:os'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import { pass, type Row, type Scenario } from './lib.ts'
import { bittorrent } from './scenarios/bittorrent.ts'
import { cluster } from './scenarios/cluster.ts'
import { distribution } from './scenarios/distribution.ts'
import { fleet } from './scenarios/fleet.ts'
import { lazy } from './scenarios/lazy.ts'
import { memory } from './scenarios/memory.ts'
import { scheduler } from './scenarios/scheduler.ts'
import { sessions } from './scenarios/sessions.ts'
import { throughput } from './scenarios/throughput.ts'

/**
 * `npm run bench [-- --quick] [-- --only name,name]`: runs each scenario,
 * prints a table of ratios (each against a baseline measured in the same
 * run) and writes bench/results/latest.json — quick.json for --quick, and
 * partial.json when --only picks scenarios (neither is kept in git).
 */
const SCENARIOS: Scenario[] = [distribution, lazy, throughput, memory, scheduler, sessions, bittorrent, fleet, cluster]

const { values } = parseArgs({ options: { quick: { type: 'boolean', default: false }, only: { type: 'string' } } })
const quick = values.quick === true
const only = values.only === undefined ? undefined : new Set(values.only.split(','))
const rows: Row[] = []
const failures: Array<{ scenario: string, error: string }> = []
const started = Date.now()
for (const scenario of SCENARIOS) {
  if (only !== undefined && !only.has(scenario.name)) continue
  process.stderr.write(`— ${scenario.name}${quick ? ' (quick)' : ''}\n`)
  try {
    rows.push(...await scenario.run({ quick, log: line => { process.stderr.write(`  ${line}\n`) } }))
  } catch (err) {
    failures.push({ scenario: scenario.name, error: (err as Error).stack ?? String(err) })
    process.stderr.write(`  ${scenario.name} failed: ${(err as Error).message}\n`)
  }
}

const table = [['scenario', 'metric', 'value', 'target', 'result']]
for (const r of rows) table.push([r.scenario, r.metric, `${r.value} ${r.unit}`, r.target === undefined ? '' : `${r.target.op} ${r.target.value}`, pass(r)])
const widths = (table[0] as string[]).map((_, i) => Math.max(...table.map(row => (row[i] as string).length)))
for (const row of table) process.stdout.write(row.map((c, i) => c.padEnd(widths[i] as number)).join('  ').trimEnd() + '\n')
for (const f of failures) process.stdout.write(`FAILED ${f.scenario}: ${f.error.split('\n')[0] ?? ''}\n`)

const dir = fileURLToPath(new URL('./results/', import.meta.url))
await mkdir(dir, { recursive: true })
const result = {
  date: new Date().toISOString(),
  mode: quick ? 'quick' : 'full',
  machine: { cpus: cpus().length, memoryGiB: Math.round(totalmem() / 2 ** 30), node: process.version },
  seconds: Math.round((Date.now() - started) / 1000),
  rows: rows.map(r => ({ ...r, result: pass(r) })),
  failures
}
// Only a whole full run replaces the record kept in git; quick runs and runs of some scenarios (or with
// the distribution's counts or size set by hand) go beside it.
const adjusted = process.env.DAMSELFLY_BENCH_COUNTS !== undefined || process.env.DAMSELFLY_BENCH_MIB !== undefined
const file = only !== undefined || adjusted ? 'partial.json' : quick ? 'quick.json' : 'latest.json'
await writeFile(`${dir}/${file}`, JSON.stringify(result, null, 2) + '\n')
process.exitCode = failures.length > 0 ? 1 : 0
