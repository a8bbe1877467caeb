import { fileURLToPath } from 'node:url'
import { run } from '../../test/helpers/process.ts'
import { round, type Row, type Scenario } from '../lib.ts'

const SIM = fileURLToPath(new URL('../sim-scheduler.ts', import.meta.url))

/**
 * The scheduler's state and parent selection with simulated hosts, in a
 * process of its own (so RSS is the scheduler's): memory at 10,000 hosts ×
 * 1,000 tasks, then selection paced at 5,000 requests/s with announcements
 * interleaved. Measured in-process: the wire (libp2p, one stream per request)
 * is not part of these figures.
 */
export const scheduler: Scenario = {
  name: 'scheduler',
  async run ({ quick, log }) {
    const hosts = quick ? 2_000 : 10_000
    const tasks = quick ? 200 : 1_000
    const { stdout } = await run(process.execPath, ['--expose-gc', SIM, String(hosts), String(tasks), '5000', quick ? '3' : '10'], { timeoutMs: 600_000 })
    const r = JSON.parse(stdout.trim().split('\n').pop() as string) as { rssMiB: number, heapMiB: number, rps: number, p50ms: number, p99ms: number, loadMs: number, holdingsPerHost: number }
    log(`scheduler: ${JSON.stringify(r)}`)
    return [
      { scenario: 'scheduler', metric: `RSS at ${hosts} hosts × ${tasks} tasks`, value: r.rssMiB, unit: 'MiB', target: quick ? undefined : { op: '<=', value: 1024 }, detail: r },
      { scenario: 'scheduler', metric: 'parent selection p99 at 5,000 req/s', value: round(r.p99ms, 3), unit: 'ms', target: { op: '<=', value: 2 }, detail: r },
      { scenario: 'scheduler', metric: 'parent selection requests/s achieved', value: r.rps, unit: 'req/s', target: { op: '>=', value: 4_900 }, detail: r }
    ] satisfies Row[]
  }
}
