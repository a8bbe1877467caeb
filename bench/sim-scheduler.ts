/**
 * Runs in its own process so its RSS is the scheduler's alone: the
 * scheduler's state and parent selection with many simulated hosts and tasks,
 * then parent selection paced at a target rate while hosts keep announcing
 * pieces. Prints one JSON line.
 */
import { createHash, randomInt } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import { setImmediate as tick } from 'node:timers/promises'
import { createMemoryState } from '../scheduler/state/index.ts'
import { createScheduling } from '../scheduler/scheduling/index.ts'

const [hostsArg, tasksArg, rateArg, secondsArg] = process.argv.slice(2)
const HOSTS = Number(hostsArg ?? 10_000)
const TASKS = Number(tasksArg ?? 1_000)
const RATE = Number(rateArg ?? 5_000)
const SECONDS = Number(secondsArg ?? 10)
const PIECES = 64
const HOLDINGS_PER_HOST = Math.max(1, Math.round(TASKS / 10))

const baseline = process.memoryUsage().rss
const state = createMemoryState()
const scheduling = createScheduling(state)
const digests = Array.from({ length: TASKS }, (_, i) => `sha256:${createHash('sha256').update(`task-${i}`).digest('hex')}`)
const pieceHex = Array.from({ length: PIECES }, (_, i) => createHash('sha256').update(`piece-${i}`).digest('hex'))
const hosts = []
const load0 = performance.now()
for (let h = 0; h < HOSTS; h++) {
  const { host } = state.upsertHost({ peerId: `12D3KooSim${h.toString().padStart(8, '0')}`, addrs: [`/ip4/10.${(h >> 16) & 255}.${(h >> 8) & 255}.${h & 255}/tcp/4000`], hostname: `node-${h}`, seed: h < 4, location: `zone-${h % 8}`, idc: '', uploadCapacity: 32, version: 'sim' })
  hosts.push(host)
  // Each host holds a tenth of the tasks: most whole, some part-way.
  for (let k = 0; k < HOLDINGS_PER_HOST; k++) {
    const digest = digests[randomInt(TASKS)] as string
    const upTo = k % 5 === 0 ? randomInt(1, PIECES) : PIECES
    state.applyUpdate(host, { digest, size: PIECES * 1024 * 1024, add: pieceHex.slice(0, upTo).map((hex, i) => [i, hex]) })
  }
}
const loadMs = performance.now() - load0
global.gc?.()
const rssMiB = (process.memoryUsage().rss - baseline) / 1024 / 1024
const heapMiB = process.memoryUsage().heapUsed / 1024 / 1024

// Paced parent selection, with announcements interleaved (one in ten operations).
const latencies: number[] = []
const deadline = performance.now() + SECONDS * 1000
const started = performance.now()
let sent = 0
while (performance.now() < deadline) {
  const due = Math.floor((performance.now() - started) / 1000 * RATE)
  while (sent < due) {
    const host = hosts[randomInt(HOSTS)]!
    const task = state.task(digests[randomInt(TASKS)] as string)
    if (sent % 10 === 0) {
      state.applyUpdate(host, { digest: task!.digest, size: task!.size, add: [[randomInt(PIECES), pieceHex[0] as string]] })
    }
    const first = randomInt(PIECES - 8)
    const t0 = performance.now()
    scheduling.plan(task!, host, first, first + 7, new Set())
    latencies.push(performance.now() - t0)
    sent++
  }
  await tick()
}
const elapsed = (performance.now() - started) / 1000
latencies.sort((a, b) => a - b)
const p = (q: number): number => latencies[Math.min(latencies.length - 1, Math.ceil(q * latencies.length) - 1)] as number
process.stdout.write(JSON.stringify({ hosts: HOSTS, tasks: TASKS, holdingsPerHost: HOLDINGS_PER_HOST, loadMs: Math.round(loadMs), rssMiB: Math.round(rssMiB), heapMiB: Math.round(heapMiB), requests: sent, rps: Math.round(sent / elapsed), p50ms: p(0.5), p99ms: p(0.99), maxms: latencies[latencies.length - 1] }) + '\n')
