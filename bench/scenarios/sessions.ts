import { fork, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { request } from 'undici'
import { Metrics } from '../../test/helpers/peer.ts'
import { freePorts } from '../../test/helpers/ports.ts'
import { spawnProcess, waitFor, type Spawned } from '../../test/helpers/process.ts'
import { tmpDir, type TmpDir } from '../../test/helpers/tmp.ts'
import { percentile, round, type Row, type Scenario } from '../lib.ts'
import type { InitArgs, LatencyResult, SwarmSpec } from '../sessions-load.ts'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const CLI = path.join(ROOT, 'bin', 'damselfly.js')
const LOAD = fileURLToPath(new URL('../sessions-load.ts', import.meta.url))
/** 200 tasks of 64 pieces; each session holds 3 whole and half of one more, and pulls 4. */
const SWARM: SwarmSpec = { tasks: 200, taskBytes: 64 * 1024 * 1024, wholePerSession: 3, wantsPerSession: 4, window: 8 }
/** The plan rate the issue holds the scheduler to. */
const RATE = 2_000
/** Clock ticks per second in /proc/PID/stat (USER_HZ: 100 on Linux). */
const HZ = 100
/**
 * Outstanding requests each generator keeps in a closed loop: enough that
 * the schedulers' work, not the loop's turnarounds, limits the rate (with
 * few, each request pays alone for its read, write and event-loop turn).
 */
const CONCURRENCY = 64

/**
 * Real scheduler sessions over the wire: thousands of peers' libp2p
 * sessions, each its own node and identity with the peer's own session
 * client (bench/sessions-load.ts: several processes of many sessions each),
 * against `damselfly scheduler` processes.
 *
 * First one replica (state in memory) takes every session (5,000; 1,000
 * with --quick) — or as many as it keeps: starting them stops after a
 * while, since a replica that loses sessions as fast as they come would
 * never get there — and is measured idle (RSS, CPU) and, when it kept
 * them, under plan and announcement loops and at an offered 2,000 plans/s.
 *
 * Then a fresh replica (idle figures per session from it when the first
 * did not keep every session) and three replicas sharing the swarm through Redis
 * (sessions spread over them) run side by side with the same sessions and
 * take turns (1, 3, 1, 3) at the same loops, so that whatever else the
 * machine runs weighs on both alike; last, 2,000 plans/s at each.
 *
 * Every loop reports the CPU each process used (from /proc), per request
 * and in cores, and what the rest of the machine took meanwhile.
 */
export const sessions: Scenario = {
  name: 'sessions',
  async run ({ quick, log: print }) {
    const t0 = performance.now()
    const log = (line: string): void => { print(`[${Math.round((performance.now() - t0) / 1000)} s] ${line}`) }
    const o: Options = {
      n: quick ? 1_000 : 5_000,
      compareSessions: quick ? 250 : 500,
      active: quick ? 250 : 500,
      generators: quick ? 2 : 4,
      // A full minute holds a round of every session's heartbeat (sent after 60 s without a word from the scheduler), spread over the minute.
      idleSeconds: quick ? 10 : 60,
      // Starting sessions stops here even short of all of them (they may drop as fast as they start).
      growSeconds: quick ? 90 : 240,
      loopSeconds: quick ? 3 : 5,
      openSeconds: quick ? 3 : 5,
      // Plans still unanswered this long after the last was offered count as failed (quick runs only; else the peer's own 10 s deadline decides).
      graceMs: quick ? 2_000 : undefined,
      turns: quick ? 1 : 2,
      profileDir: process.env.DAMSELFLY_BENCH_PROFILE,
      log,
      doing: 'starting'
    }
    const cleanup: Array<() => Promise<void>> = []
    try {
      // One replica takes every session, or as many as it keeps.
      const one = await deploy(o, 1, o.n, cleanup)
      await grow(o, one, o.n, { strict: false, deadline: performance.now() + o.growSeconds * 1000 })
      await sleep(5_000)
      const held = (await census(one)).up >= o.n * 0.95
      // Every session idle for a window that holds two rounds of heartbeats; a replica that lost them, more briefly.
      const idleAll = await idleFigures(o, one, held ? o.idleSeconds : Math.min(20, o.idleSeconds))
      // The loops with every session up (the full run, when the replica kept them).
      const full = !quick && held ? await suite(o, one) : undefined
      await one.close()
      log('the replica with every session stopped')

      // Then a fresh replica and three over Redis, side by side with the same sessions, take turns.
      const single = await deploy(o, 1, o.compareSessions, cleanup)
      await grow(o, single, o.compareSessions, { strict: true })
      // Idle figures per session from the fresh replica, when the first did not keep every session (the full run only).
      const idleFew = quick || held ? undefined : await idleFigures(o, single, o.idleSeconds)
      const three = await deploy(o, 3, o.compareSessions, cleanup)
      await grow(o, three, o.compareSessions, { strict: true })
      const compared = await compare(o, single, three)
      o.doing = 'stopping'
      const result = { sessions: o.n, compareSessions: o.compareSessions, active: o.active, generators: o.generators, swarm: SWARM, one: { rss0MiB: one.rss0MiB, connect: one.connects, growth: one.samples }, single: { connect: single.connects }, three: { rss0MiB: three.rss0MiB, connect: three.connects }, idleFew, idleAll, full, compared }
      const crashes = [one, single, three].flatMap(d => d.schedulers.map((s, i) => s.crashed() === undefined ? [] : [`${d.label}, replica ${i + 1}: ${s.crashed() as string}`]).flat())
      // The whole run (every growth sample and connect time) rides on the first row only: on each of the
      // thirty-odd rows it made a results file of 700 KiB, the same 20 KiB over and over.
      return [...rows(o, one, idleFew, idleAll, compared, full), crashRow(crashes)].map((r, i) => i === 0 ? { ...r, detail: { ...r.detail, run: result } } : r)
    } finally {
      for (const c of cleanup.reverse()) await c().catch(() => {})
      log('every process stopped')
    }
  }
}

interface Options {
  /** Sessions in all on one replica, for the idle figures and the last loops. */
  n: number
  /** Sessions on each deployment while the two are compared. */
  compareSessions: number
  /** Sessions that ask for plans and announce (the peers pulling now); the others only keep their sessions. */
  active: number
  generators: number
  /** The idle window at the sessions compared (and at every session, when one replica holds them). */
  idleSeconds: number
  loopSeconds: number
  openSeconds: number
  graceMs: number | undefined
  /** Turns each deployment takes at the closed loops. */
  turns: number
  growSeconds: number
  profileDir: string | undefined
  log: (line: string) => void
  /** What the bench is doing now, for the report of a replica that crashes. */
  doing: string
}

/** CPU used in a window, in cores, by role. */
type Cores = Record<string, number>

interface Loop {
  sent: number
  ok: number
  errors: number
  firstError: string | undefined
  seconds: number
  rate: number
  p50: number
  p99: number
  max: number
  withParents: number
  cores: Cores
  /** Scheduler CPU (every replica) per answered request, in ms: what a core buys, whatever else the machine runs. */
  schedulerMsPer: number
  /** Load-generator CPU per answered request, in ms. */
  generatorMsPer: number
  /** The generators' own event-loop delay through an open loop (the worst of them), in ms: latency the measuring side adds. */
  generatorLoop?: { p99: number, max: number }
  /** The sessions after the loop. */
  census: Census
}

interface Compared {
  one: Record<'warm' | 'closed' | 'half' | 'announce' | 'open', Loop>
  three: Record<'warm' | 'closed' | 'half' | 'announce' | 'open', Loop>
}

interface Suite {
  /** Sessions up when it began. */
  up: number
  closed: Loop
  half: Loop
  announce: Loop
  open: Loop
}

interface Idle {
  /** Sessions up through the window (the fewer of its start and end), of those started. */
  sessions: number
  started: number
  seconds: number
  rssMiB: number
  heapUsedMiB: number
  heapTotalMiB: number
  externalMiB: number
  cores: Cores
  /** Scheduler CPU per session per second, in ms. */
  schedulerMsPerSessionSecond: number
  /** Sessions dropped, and ended as the scheduler saw it, so far. */
  drops: number
  left: number
}

function rows (o: Options, one: Deployment, idleFew: Idle | undefined, all: Idle, c: Compared, full: Suite | undefined): Row[] {
  const at = (k: number): string => `${k.toLocaleString('en')} sessions`
  const n = at(o.n)
  const cmp = at(o.compareSessions)
  const rate = RATE.toLocaleString('en')
  const row = (metric: string, value: number, unit: string, detail: object, target?: Row['target']): Row => ({ scenario: 'sessions', metric, value, unit, target, detail: { ...detail } })
  const heldAll = all.sessions >= o.n * 0.95
  // The 5,000-session figures are measured when one replica held them all, else projected.
  const measured = heldAll && o.n === 5_000
  // Per-session idle figures from every session when one replica held them, else from the sessions compared.
  const few = heldAll || idleFew === undefined ? all : idleFew
  // RSS per session from the most sessions one replica held at once (idle, or as they were started).
  const points: Array<{ sessions: number, rssMiB: number }> = [all, ...one.samples.flatMap(p => p.rssMiB === undefined ? [] : [{ sessions: p.up, rssMiB: p.rssMiB }])]
  const best = points.reduce((a, b) => b.sessions > a.sessions ? b : a, { sessions: all.sessions, rssMiB: all.rssMiB })
  const rssPer1000 = best.sessions > 0 ? (best.rssMiB - one.rss0MiB) / (best.sessions / 1000) : NaN
  const rss5000 = measured ? all.rssMiB : one.rss0MiB + rssPer1000 * 5
  // Idle CPU per session from every session, or else from the sessions compared (a window that holds two rounds of heartbeats in the full run).
  const idlePer1000 = few.sessions > 0 ? (few.cores.scheduler ?? 0) / (few.sessions / 1000) : NaN
  const idle5000 = measured ? (all.cores.scheduler ?? 0) : idlePer1000 * 5
  const projected = (what: string, from: number, unit: string): string => `${what}${measured ? '' : `, projected from ${at(from)}`}${unit}`
  const ratio = c.three.closed.rate / c.one.closed.rate
  // The issue's plan target with every session up, when one replica kept them (the full run), else with the sessions compared.
  const open = full?.open ?? c.one.open
  const openAt = full === undefined ? cmp : n
  const cores = (label: string, l: Loop): Row[] => Object.entries(l.cores).filter(([role]) => role !== 'bench')
    .map(([role, used]) => row(`cores used in the plan closed loop, ${label}, ${cmp}: ${role}`, round(used, 2), 'cores', { cores: l.cores }))
  return [
    row(`sessions one replica holds idle, of ${n} started`, all.sessions, 'sessions', { ...all, growth: one.samples }, { op: '>=', value: Math.round(o.n * 0.99) }),
    row('scheduler RSS per 1,000 idle sessions', Math.round(rssPer1000), 'MiB', { rss0MiB: one.rss0MiB, from: best }),
    row(projected('scheduler RSS at 5,000 idle sessions', best.sessions, ''), Math.round(rss5000), 'MiB', { rss0MiB: one.rss0MiB, from: best, all }, { op: '<=', value: 1024 }),
    row('scheduler idle CPU per 1,000 sessions (% of a core)', round(idlePer1000 * 100, 1), '%', { ...few }),
    row(projected('scheduler idle CPU at 5,000 sessions', few.sessions, ' (% of a core)'), round(idle5000 * 100, 1), '%', { few, all }, { op: '<=', value: 5 }),
    row(`plan p50 at ${rate}/s offered, 1 replica, ${openAt}`, round(open.p50, 1), 'ms', open),
    row(`plan p99 at ${rate}/s offered, 1 replica, ${openAt}`, round(open.p99, 1), 'ms', open, { op: '<=', value: 5 }),
    row(`plans/s answered at ${rate}/s offered, 1 replica, ${openAt}`, Math.round(open.rate), 'req/s', open, { op: '>=', value: RATE * 0.98 }),
    ...(full === undefined
      ? []
      : [
          row(`plans/s closed loop (most achieved), 1 replica, ${n}`, Math.round(full.closed.rate), 'req/s', full.closed),
          row(`plan p99 at ${Math.round(full.closed.rate / 2)}/s offered (half the most), 1 replica, ${n}`, round(full.half.p99, 1), 'ms', full.half),
          row(`scheduler CPU per plan, 1 replica, ${n}`, round(full.closed.schedulerMsPer, 2), 'ms', full.closed),
          row(`announcements/s accepted (closed loop), 1 replica, ${n}`, Math.round(full.announce.rate), 'req/s', full.announce)
        ]),
    row(`plans/s closed loop (most achieved), 1 replica, ${cmp}`, Math.round(c.one.closed.rate), 'req/s', c.one.closed),
    row(`plans/s closed loop (most achieved), 3 replicas over Redis, ${cmp}`, Math.round(c.three.closed.rate), 'req/s', c.three.closed),
    row(`sessions up after the closed loops, 1 replica, of ${cmp}`, c.one.closed.census.up, 'sessions', c.one.closed.census, { op: '>=', value: Math.round(o.compareSessions * 0.99) }),
    row(`sessions up after the closed loops, 3 replicas over Redis, of ${cmp}`, c.three.closed.census.up, 'sessions', c.three.closed.census, { op: '>=', value: Math.round(o.compareSessions * 0.99) }),
    row(`closed-loop plans/s, 3 replicas ÷ 1, ${cmp}`, round(ratio, 2), 'x', { one: c.one.closed, three: c.three.closed }, { op: '>=', value: 2.5 }),
    row(`plan p99 at ${Math.round(c.one.closed.rate / 2)}/s offered (half the most), 1 replica, ${cmp}`, round(c.one.half.p99, 1), 'ms', c.one.half),
    row(`plan p99 at ${Math.round(c.three.closed.rate / 2)}/s offered (half the most), 3 replicas over Redis, ${cmp}`, round(c.three.half.p99, 1), 'ms', c.three.half),
    row(`scheduler CPU per plan, 1 replica, ${cmp}`, round(c.one.closed.schedulerMsPer, 2), 'ms', c.one.closed),
    row(`scheduler CPU per plan, 3 replicas over Redis (all three), ${cmp}`, round(c.three.closed.schedulerMsPer, 2), 'ms', c.three.closed),
    row(`plan p99 at ${rate}/s offered, 3 replicas over Redis, ${cmp}`, round(c.three.open.p99, 1), 'ms', c.three.open),
    row(`plans/s answered at ${rate}/s offered, 3 replicas over Redis, ${cmp}`, Math.round(c.three.open.rate), 'req/s', c.three.open),
    row(`announcements/s accepted (closed loop), 1 replica, ${cmp}`, Math.round(c.one.announce.rate), 'req/s', c.one.announce),
    row(`announcements/s accepted (closed loop), 3 replicas over Redis, ${cmp}`, Math.round(c.three.announce.rate), 'req/s', c.three.announce),
    row(`scheduler CPU per announcement, 1 replica, ${cmp}`, round(c.one.announce.schedulerMsPer, 2), 'ms', c.one.announce),
    row(`scheduler CPU per announcement, 3 replicas over Redis (all three), ${cmp}`, round(c.three.announce.schedulerMsPer, 2), 'ms', c.three.announce),
    // Where the cores went while plans ran flat out.
    ...cores('1 replica', c.one.closed),
    ...cores('3 replicas over Redis', c.three.closed)
  ]
}

/** Scheduler processes that exited while the bench still used them: a product failure, whatever the figures. */
function crashRow (crashes: string[]): Row {
  return { scenario: 'sessions', metric: 'scheduler processes that crashed during the run', value: crashes.length, unit: 'processes', target: { op: '<=', value: 0 }, detail: { crashes } }
}

interface Deployment {
  label: string
  replicas: number
  schedulers: Scheduler[]
  generators: Generator[]
  rss0MiB: number
  /** Processes by role, for CPU accounting. */
  roles: () => Record<string, number[]>
  /** Sessions started so far, per generator. */
  started: number
  connects: Array<{ sessions: number, seconds: number, cores: Cores, schedulerMsPerSession: number, spread: number[], drops: number }>
  /** Sessions up (and the scheduler's RSS, for one replica) as they were started. */
  samples: Array<{ seconds: number, started: number, up: number, drops: number, left: number, rssMiB: number | undefined }>
  close: () => Promise<void>
}

/** Scheduler replicas (three share Redis), and load generators holding `sessions` sessions between them, none started. */
async function deploy (o: Options, replicas: number, sessions: number, cleanup: Array<() => Promise<void>>): Promise<Deployment> {
  const own: Array<() => Promise<void>> = []
  let closed = false
  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    // Schedulers first: the sessions then end without a leave each, which would only load the machine.
    for (const c of own) await c().catch(() => {})
  }
  cleanup.push(close)
  let redis: { url: string, pid: number } | undefined
  if (replicas > 1) {
    const r = await startRedis()
    own.unshift(r.close)
    redis = r
  }
  const schedulers = await Promise.all(Array.from({ length: replicas }, async () => {
    const s = await startScheduler(redis?.url, o)
    own.unshift(s.close)
    return s
  }))
  await sleep(2_000)
  const rss0MiB = Math.round(schedulers.reduce((sum, s) => sum + rssMiB(s.pid), 0) / replicas)
  const perGenerator = Math.ceil(sessions / o.generators)
  const generators: Generator[] = []
  for (let i = 0; i < o.generators; i++) {
    const g = startGenerator(`${replicas}.${i}`)
    own.push(g.close)
    generators.push(g)
  }
  const addresses = schedulers.map(s => s.address)
  await Promise.all(generators.map(async (g, i) => g.call('init', { first: i * perGenerator, sessions: perGenerator, addresses, swarm: SWARM } satisfies InitArgs)))
  return {
    label: replicas === 1 ? '1 replica' : `${replicas} replicas over Redis`,
    replicas,
    schedulers,
    generators,
    rss0MiB,
    started: 0,
    connects: [],
    samples: [],
    close,
    roles: () => ({
      ...(replicas === 1 ? { scheduler: [schedulers[0]?.pid as number] } : Object.fromEntries(schedulers.map((s, i) => [`replica ${i + 1}`, [s.pid]]))),
      ...(redis === undefined ? {} : { redis: [redis.pid] }),
      generators: generators.map(g => g.pid)
    })
  }
}

/**
 * Starts sessions until `total` are up, a few at a time per generator:
 * each is a TLS handshake, a register and the inventory, and a replica
 * slower than 3 s to take a connection is left for the next (the peer's
 * deadline when it knows several replicas).
 */
async function grow (o: Options, dep: Deployment, total: number, how: { strict: boolean, deadline?: number }): Promise<void> {
  const to = Math.ceil(total / o.generators)
  // Handshakes in flight in all: more only queue up in a busy replica, past the 3 s a peer gives one when it knows
  // several replicas (with one, the node's own 10 s apply).
  const concurrency = Math.max(1, Math.round((dep.replicas === 1 ? 48 : 24) / o.generators))
  const chunk = Math.ceil(500 / o.generators)
  o.doing = `${dep.label}: starting sessions up to ${to * dep.generators.length}`
  const started = performance.now()
  const from0 = dep.started
  const { cores } = await cpuDuring(dep.roles(), async () => {
    for (let from = dep.started; from < to; from += chunk) {
      if (how.deadline !== undefined && performance.now() > how.deadline) {
        o.log(`${dep.label}: no more sessions started: ${Math.round(o.growSeconds)} s are up`)
        break
      }
      await Promise.all(dep.generators.map(async g => g.call('connect', { from, to: Math.min(to, from + chunk), concurrency, timeoutMs: 60_000 })))
      dep.started = Math.min(to, from + chunk)
      if (dep.replicas === 1) dep.schedulers[0]?.alive()
      const c = await census(dep)
      const sample = { seconds: round((performance.now() - started) / 1000, 1), started: dep.started * dep.generators.length, up: c.up, drops: c.drops, left: c.left, rssMiB: dep.replicas === 1 ? Math.round(rssMiB((dep.schedulers[0] as Scheduler).pid)) : undefined }
      dep.samples.push(sample)
      if (dep.started < to) o.log(`${dep.label}: ${sample.started} sessions started after ${sample.seconds} s, ${c.up} up (${c.drops} drops so far)${sample.rssMiB === undefined ? '' : `, scheduler RSS ${sample.rssMiB} MiB`}`)
    }
  })
  const seconds = (performance.now() - started) / 1000
  const added = (dep.started - from0) * dep.generators.length
  const c = await census(dep)
  const schedulerMsPerSession = round(schedulerCores(cores) * seconds * 1000 / Math.max(1, added), 2)
  dep.connects.push({ sessions: c.up, seconds: round(seconds, 1), cores, schedulerMsPerSession, spread: c.spread, drops: c.drops })
  o.log(`${dep.label}: ${c.up} of ${to * dep.generators.length} sessions up (${added} started in ${Math.round(seconds)} s, ${schedulerMsPerSession} ms of scheduler CPU each), per replica ${c.spread.join('/')}, ${c.drops} drops so far (the schedulers saw ${c.left} sessions end); cores ${fmt(cores)}`)
  // Short of them all, the figures that follow say so (each loop reports the sessions up) rather than nothing at all.
  if (how.strict && c.up < to * dep.generators.length * 0.95) o.log(`${dep.label}: only ${c.up} of ${to * dep.generators.length} sessions came up; measuring with those`)
}

/** Every session up, its heartbeat going as a peer's does; nobody asks anything. RSS and CPU of the (one) scheduler. */
async function idleFigures (o: Options, dep: Deployment, seconds: number): Promise<Idle> {
  o.doing = `${dep.label}: idle`
  await sleep(5_000)
  const before = await census(dep)
  const { cores } = await cpuDuring(dep.roles(), async () => { await sleep(seconds * 1000) })
  const c = await census(dep)
  const scheduler = dep.schedulers[0] as Scheduler
  scheduler.alive()
  const rss = rssMiB(scheduler.pid)
  const memory = await scheduler.memory()
  const sessions = Math.min(before.up, c.up)
  o.log(`${dep.label}: idle for ${seconds} s at ${before.up} → ${c.up} sessions: scheduler RSS ${Math.round(rss)} MiB (heap ${memory.heapUsedMiB} of ${memory.heapTotalMiB} MiB, external ${memory.externalMiB} MiB); cores ${fmt(cores)}; ${c.drops} drops so far, the scheduler saw ${c.joined} sessions start, ${c.left} end`)
  return { sessions, started: dep.started * dep.generators.length, seconds, rssMiB: Math.round(rss), ...memory, cores, schedulerMsPerSessionSecond: round(schedulerCores(cores) * 1000 / Math.max(1, sessions), 4), drops: c.drops, left: c.left }
}

/**
 * The two deployments take turns at each loop, so that what else runs on
 * the machine weighs on both alike; the closed loops and announcements
 * twice each (1, 3, 1, 3). Last, 2,000 plans/s at the three replicas.
 */
async function compare (o: Options, one: Deployment, three: Deployment): Promise<Compared> {
  const active = activePerGenerator(o)
  const both = async (name: string, cmd: string, args: Record<string, number>, turns: number): Promise<[Loop, Loop]> => {
    const runs: [Run[], Run[]] = [[], []]
    for (let t = 0; t < turns; t++) {
      for (const [i, dep] of [one, three].entries()) runs[i]?.push(await measure(o, dep, [one, three].filter(d => d !== dep), cmd, args))
    }
    const loops: [Loop, Loop] = [await summarize(one, runs[0]), await summarize(three, runs[1])]
    for (const [i, dep] of [one, three].entries()) o.log(`${dep.label}, ${o.compareSessions} sessions: ${name}: ${fmtLoop(loops[i] as Loop)}`)
    return loops
  }
  // Each pulling peer asks once about each task it wants: the swarm learns its interest (an event through the log).
  const [warm1, warm3] = await both('warm-up (first plans: interest through the log)', 'warm', { active, concurrency: CONCURRENCY }, 1)
  const [closed1, closed3] = await both('plans, closed loop', 'closed', { active, concurrency: CONCURRENCY, seconds: o.loopSeconds }, o.turns)
  const halfRate = (l: Loop): number => Math.max(10, Math.round(l.rate / 2))
  const half1 = await summarize(one, [await measure(o, one, [three], 'open', { active, rate: halfRate(closed1) / o.generators, seconds: o.openSeconds })])
  o.log(`${one.label}, ${o.compareSessions} sessions: plans at ${halfRate(closed1)}/s: ${fmtLoop(half1)}`)
  const half3 = await summarize(three, [await measure(o, three, [one], 'open', { active, rate: halfRate(closed3) / o.generators, seconds: o.openSeconds })])
  o.log(`${three.label}, ${o.compareSessions} sessions: plans at ${halfRate(closed3)}/s: ${fmtLoop(half3)}`)
  const [announce1, announce3] = await both('announcements, closed loop', 'announce', { active, concurrency: CONCURRENCY, seconds: o.loopSeconds }, o.turns)
  // Last, as it may overrun the schedulers: 2,000 plans/s whatever the answers.
  const open1 = await summarize(one, [await measure(o, one, [three], 'open', { active, rate: RATE / o.generators, seconds: o.openSeconds, ...grace(o) })])
  o.log(`${one.label}, ${o.compareSessions} sessions: plans at ${RATE}/s: ${fmtLoop(open1)}`)
  const open3 = await summarize(three, [await measure(o, three, [one], 'open', { active, rate: RATE / o.generators, seconds: o.openSeconds, ...grace(o) })])
  o.log(`${three.label}, ${o.compareSessions} sessions: plans at ${RATE}/s: ${fmtLoop(open3)}`)
  return { one: { warm: warm1, closed: closed1, half: half1, announce: announce1, open: open1 }, three: { warm: warm3, closed: closed3, half: half3, announce: announce3, open: open3 } }
}

/** The same loops at one deployment alone, then 2,000 plans/s. */
async function suite (o: Options, dep: Deployment): Promise<Suite> {
  const active = activePerGenerator(o)
  const { up } = await census(dep)
  const at = `${dep.label}, ${up} sessions`
  const closed = await summarize(dep, [await measure(o, dep, [], 'closed', { active, concurrency: CONCURRENCY, seconds: o.loopSeconds })])
  o.log(`${at}: plans, closed loop: ${fmtLoop(closed)}`)
  const halfRate = Math.max(10, Math.round(closed.rate / 2))
  const half = await summarize(dep, [await measure(o, dep, [], 'open', { active, rate: halfRate / o.generators, seconds: o.openSeconds })])
  o.log(`${at}: plans at ${halfRate}/s: ${fmtLoop(half)}`)
  const announce = await summarize(dep, [await measure(o, dep, [], 'announce', { active, concurrency: CONCURRENCY, seconds: o.loopSeconds })])
  o.log(`${at}: announcements, closed loop: ${fmtLoop(announce)}`)
  const open = await summarize(dep, [await measure(o, dep, [], 'open', { active, rate: RATE / o.generators, seconds: o.openSeconds, ...grace(o) })])
  o.log(`${at}: plans at ${RATE}/s: ${fmtLoop(open)}`)
  return { up, closed, half, announce, open }
}

function grace (o: Options): Record<string, number> {
  return o.graceMs === undefined ? {} : { graceMs: o.graceMs }
}

/** Active sessions per generator: the first ones of each, which came up first. */
function activePerGenerator (o: Options): number {
  return Math.ceil(Math.min(o.active, o.compareSessions) / o.generators)
}

/** One loop at one deployment: what its generators measured, and the CPU of every process meanwhile. */
interface Run {
  results: LatencyResult[]
  cpu: Record<string, number>
  wall: number
}

async function measure (o: Options, dep: Deployment, others: Deployment[], cmd: string, args: Record<string, number>): Promise<Run> {
  o.doing = `${dep.label}: ${cmd} ${JSON.stringify(args)}`
  let results: LatencyResult[] = []
  const roles: Record<string, number[]> = { ...dep.roles(), bench: [process.pid] }
  const idle = others.flatMap(d => Object.values(d.roles()).flat())
  if (idle.length > 0) roles['the other deployment (idle)'] = idle
  const { cpu, wall } = await cpuSecondsDuring(roles, async () => {
    results = await Promise.all(dep.generators.map(async g => g.call(cmd, args) as Promise<LatencyResult>))
  })
  // Replicas that crash are reported (a row counts them) and the others carry on; one replica gone ends the run.
  if (dep.replicas === 1) dep.schedulers[0]?.alive()
  return { results, cpu, wall }
}

async function summarize (dep: Deployment, runs: Run[]): Promise<Loop> {
  const results = runs.flatMap(r => r.results)
  const wall = runs.reduce((sum, r) => sum + r.wall, 0)
  const cpu: Record<string, number> = {}
  for (const r of runs) for (const [k, v] of Object.entries(r.cpu)) cpu[k] = (cpu[k] ?? 0) + v
  const cores: Cores = Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, round(v / wall, 3)]))
  const latencies = results.flatMap(r => r.latencies)
  const ok = results.reduce((sum, r) => sum + r.ok, 0)
  // Each run's generators work side by side: a run lasts as long as its slowest.
  const seconds = runs.reduce((sum, r) => sum + Math.max(...r.results.map(x => x.seconds)), 0)
  const schedulerCpu = Object.entries(cpu).filter(([k]) => k === 'scheduler' || k.startsWith('replica')).reduce((sum, [, v]) => sum + v, 0)
  return {
    sent: results.reduce((sum, r) => sum + r.sent, 0),
    ok,
    errors: results.reduce((sum, r) => sum + r.errors, 0),
    firstError: results.find(r => r.firstError !== undefined)?.firstError,
    seconds: round(seconds, 2),
    rate: seconds > 0 ? round(ok / seconds, 1) : 0,
    p50: round(percentile(latencies, 50), 3),
    p99: round(percentile(latencies, 99), 3),
    max: round(latencies.reduce((m, v) => Math.max(m, v), 0), 3),
    withParents: results.reduce((sum, r) => sum + r.withParents, 0),
    cores,
    schedulerMsPer: ok > 0 ? round(schedulerCpu * 1000 / ok, 3) : NaN,
    generatorMsPer: ok > 0 ? round((cpu.generators ?? 0) * 1000 / ok, 3) : NaN,
    ...generatorLoop(results),
    census: await census(dep)
  }
}

function generatorLoop (results: LatencyResult[]): { generatorLoop?: { p99: number, max: number } } {
  const loops = results.flatMap(r => r.loop === undefined ? [] : [r.loop])
  if (loops.length === 0) return {}
  return { generatorLoop: { p99: round(Math.max(...loops.map(l => l.p99)), 2), max: round(Math.max(...loops.map(l => l.max)), 2) } }
}

interface Census {
  /** Sessions up now. */
  up: number
  /** Sessions per replica, most first. */
  spread: number[]
  /** Times a session's connection closed, so far. */
  drops: number
  /** Sessions the schedulers saw start and end, so far (their logs). */
  joined: number
  left: number
}

async function census (dep: Deployment): Promise<Census> {
  const statuses = await Promise.all(dep.generators.map(async g => g.call('status', {}) as Promise<{ connected: number, drops: number, bySchedulers: Record<string, number> }>))
  const bySchedulers: Record<string, number> = {}
  for (const s of statuses) for (const [peer, count] of Object.entries(s.bySchedulers)) bySchedulers[peer] = (bySchedulers[peer] ?? 0) + count
  return {
    up: statuses.reduce((sum, s) => sum + s.connected, 0),
    spread: Object.values(bySchedulers).sort((a, b) => b - a),
    drops: statuses.reduce((sum, s) => sum + s.drops, 0),
    joined: dep.schedulers.reduce((sum, s) => sum + s.counts.joined, 0),
    left: dep.schedulers.reduce((sum, s) => sum + s.counts.left, 0)
  }
}

function schedulerCores (cores: Cores): number {
  return Object.entries(cores).filter(([k]) => k === 'scheduler' || k.startsWith('replica')).reduce((sum, [, v]) => sum + v, 0)
}

function fmt (cores: Cores): string {
  return Object.entries(cores).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')
}

function fmtLoop (l: Loop): string {
  return `${l.ok}/${l.sent} ok (${l.errors} errors${l.firstError === undefined ? '' : `: ${l.firstError}`}), ${Math.round(l.rate)}/s, p50 ${l.p50.toFixed(2)} ms, p99 ${l.p99.toFixed(2)} ms, ` +
    `scheduler CPU ${l.schedulerMsPer.toFixed(2)} ms and generator CPU ${l.generatorMsPer.toFixed(2)} ms each; cores ${fmt(l.cores)}; ` +
    (l.generatorLoop === undefined ? '' : `generators' event-loop delay p99 ${l.generatorLoop.p99.toFixed(1)} ms, max ${l.generatorLoop.max.toFixed(1)} ms; `) +
    `sessions up ${l.census.up} (${l.census.drops} drops so far; the schedulers saw ${l.census.joined} sessions start, ${l.census.left} end)`
}

/* Processes */

interface Scheduler {
  address: string
  pid: number
  /** Sessions it saw start ('host joined', 'host re-registered') and end ('host left'), from its log. */
  counts: { joined: number, left: number }
  /** Why it exited while the bench still needed it (its exit code and the error it printed); undefined while it runs. */
  crashed: () => string | undefined
  /** Throws, with the end of its output, when it is no longer running. */
  alive: () => void
  /** Requests answered, by type, and errors by type (its metrics). */
  requests: () => Promise<Record<string, number>>
  /** V8's heap and memory outside it (its metrics), to tell where RSS goes. */
  memory: () => Promise<{ heapUsedMiB: number, heapTotalMiB: number, externalMiB: number }>
  close: () => Promise<void>
}

async function startScheduler (state: string | undefined, o: Options): Promise<Scheduler> {
  const { profileDir, log } = o
  const [port, httpPort] = await freePorts(2) as [number, number]
  const tmp = await tmpDir('df-bench-sched-')
  const args = [
    ...(profileDir === undefined ? [] : ['--cpu-prof', '--cpu-prof-dir', profileDir]),
    CLI, 'scheduler', '--data-dir', tmp.path, '--host', '127.0.0.1', '--port', String(port), '--http-host', '127.0.0.1', '--http-port', String(httpPort),
    '--log-level', 'info', ...(state === undefined ? [] : ['--state', state])
  ]
  const proc = spawnProcess(process.execPath, args)
  const counts = { joined: 0, left: 0 }
  let partial = ''
  proc.child.stdout?.on('data', (chunk: Buffer) => {
    const lines = (partial + chunk.toString()).split('\n')
    partial = lines.pop() ?? ''
    for (const line of lines) {
      if (line.includes('"host joined"') || line.includes('"host re-registered"')) counts.joined++
      else if (line.includes('"host left"')) counts.left++
    }
  })
  let closing = false
  let crash: string | undefined
  // A replica that dies mid-run says so at once, with the end of what it wrote.
  void proc.exited.then((code) => {
    if (closing) return
    const out = proc.output()
    const error = out.split('\n').reverse().find(line => /^\w*Error\b/.test(line))
    crash = `exit ${code ?? proc.child.signalCode ?? '?'} while ${o.doing}${error === undefined ? '' : `: ${error}`}`
    log(`the scheduler on port ${port} exited (${crash}) while the bench ran; the end of its output:\n${out.slice(-3000)}`)
  })
  const httpUrl = `http://127.0.0.1:${httpPort}`
  const close = async (): Promise<void> => {
    closing = true
    await proc.stop()
    await tmp.cleanup()
  }
  try {
    await waitFor(async () => {
      const res = await request(`${httpUrl}/healthy`, { signal: AbortSignal.timeout(1_000) })
      await res.body.dump()
      return res.statusCode === 200
    }, { timeoutMs: 30_000, what: 'the scheduler to become healthy', giveUpIf: () => proc.child.exitCode !== null ? `scheduler exited:\n${proc.output().slice(-4000)}` : undefined })
  } catch (err) {
    await close()
    throw err
  }
  const metrics = async (): Promise<Metrics> => {
    const res = await request(`${httpUrl}/metrics`, { signal: AbortSignal.timeout(10_000) })
    return new Metrics(await res.body.text())
  }
  return {
    address: `127.0.0.1:${port}`,
    pid: proc.child.pid as number,
    counts,
    crashed: () => crash,
    alive () {
      if (closing || (proc.child.exitCode === null && proc.child.signalCode === null)) return
      throw new Error(`the scheduler on port ${port} exited (${proc.child.exitCode ?? proc.child.signalCode ?? '?'}):\n${proc.output().slice(-6000)}`)
    },
    async memory () {
      const m = await metrics()
      const mib = (name: string): number => Math.round(m.get(name) / 2 ** 20)
      return { heapUsedMiB: mib('damselfly_nodejs_heap_size_used_bytes'), heapTotalMiB: mib('damselfly_nodejs_heap_size_total_bytes'), externalMiB: mib('damselfly_nodejs_external_memory_bytes') }
    },
    async requests () {
      const m = await metrics()
      const out: Record<string, number> = {}
      for (const [type, count] of Object.entries(m.byLabel('damselfly_scheduler_requests_total', 'type'))) {
        out[type] = count
        out[`${type} errors`] = m.get('damselfly_scheduler_requests_total', { type, outcome: 'error' })
      }
      return out
    },
    close
  }
}

/** redis-server on loopback, in a temporary directory, without persistence; its pid for /proc. */
async function startRedis (): Promise<{ url: string, pid: number, close: () => Promise<void> }> {
  const tmp: TmpDir = await tmpDir('df-bench-redis-')
  const [port] = await freePorts(1) as [number]
  const proc: Spawned = spawnProcess('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', tmp.path, '--save', '', '--appendonly', 'no', '--protected-mode', 'no'])
  const close = async (): Promise<void> => {
    await proc.stop()
    await tmp.cleanup()
  }
  try {
    await waitFor(async () => proc.output().includes('Ready to accept connections'), { timeoutMs: 10_000, intervalMs: 50, what: `redis-server on port ${port}`, giveUpIf: () => proc.child.exitCode !== null ? `redis-server exited: ${proc.output()}` : undefined })
  } catch (err) {
    await close()
    throw err
  }
  return { url: `redis://127.0.0.1:${port}/0`, pid: proc.child.pid as number, close }
}

interface Generator {
  pid: number
  call: (cmd: string, args: unknown) => Promise<unknown>
  close: () => Promise<void>
}

/** A load-generator process (bench/sessions-load.ts), driven over its IPC channel. */
function startGenerator (index: string): Generator {
  const child: ChildProcess = fork(LOAD, [], { stdio: ['ignore', 'pipe', 'pipe', 'ipc'], execArgv: ['--max-old-space-size=6144'] })
  let output = ''
  const keep = (chunk: Buffer): void => { output = (output + chunk.toString()).slice(-8192) }
  child.stdout?.on('data', keep)
  child.stderr?.on('data', keep)
  let next = 0
  const waiting = new Map<number, { resolve: (v: unknown) => void, reject: (e: Error) => void }>()
  child.on('message', (msg: { id: number, result?: unknown, error?: string }) => {
    const w = waiting.get(msg.id)
    waiting.delete(msg.id)
    if (msg.error !== undefined) w?.reject(new Error(`load generator ${index}: ${msg.error}`))
    else w?.resolve(msg.result)
  })
  const exited = new Promise<void>(resolve => { child.once('exit', () => { resolve() }) })
  void exited.then(() => {
    for (const w of waiting.values()) w.reject(new Error(`load generator ${index} exited (${child.exitCode ?? child.signalCode ?? '?'}): ${output.slice(-2000)}`))
    waiting.clear()
  })
  const call = async (cmd: string, args: unknown): Promise<unknown> => {
    const id = ++next
    const done = new Promise<unknown>((resolve, reject) => { waiting.set(id, { resolve, reject }) })
    child.send({ id, cmd, args })
    return done
  }
  return {
    pid: child.pid as number,
    call,
    async close () {
      if (child.exitCode !== null || child.signalCode !== null) return
      // Its sessions end (the schedulers are gone by now), its key files go; then it exits.
      // Unreferenced: a deadline that did not fire must not hold the bench open.
      await Promise.race([call('stop', {}).catch(() => {}), sleep(30_000, undefined, { ref: false })])
      await Promise.race([exited, sleep(5_000, undefined, { ref: false })])
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL')
        await exited
      }
    }
  }
}

/* /proc */

function rssMiB (pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  if (m === null) throw new Error(`no VmRSS for ${pid}`)
  return Number(m[1]) / 1024
}

/** utime + stime of a process, in seconds. */
function cpuSeconds (pid: number): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? []
    return (Number(fields[11]) + Number(fields[12])) / HZ
  } catch {
    return 0
  }
}

/** Busy time of the whole machine (every CPU), in seconds. */
function machineBusySeconds (): number {
  const [, ...ticks] = (readFileSync('/proc/stat', 'utf8').split('\n')[0] as string).trim().split(/\s+/).map(Number)
  const [user, nice, system, , , irq, softirq, steal] = ticks as number[]
  return ((user ?? 0) + (nice ?? 0) + (system ?? 0) + (irq ?? 0) + (softirq ?? 0) + (steal ?? 0)) / HZ
}

/**
 * CPU seconds each role used while `work` ran, plus `other processes`:
 * what the rest of the machine took meanwhile.
 */
async function cpuSecondsDuring (roles: Record<string, number[]>, work: () => Promise<void>): Promise<{ cpu: Record<string, number>, wall: number }> {
  const sum = (pids: number[]): number => pids.reduce((s, pid) => s + cpuSeconds(pid), 0)
  const before = Object.fromEntries(Object.entries(roles).map(([k, pids]) => [k, sum(pids)]))
  const busy0 = machineBusySeconds()
  const t0 = performance.now()
  await work()
  const wall = (performance.now() - t0) / 1000
  const cpu: Record<string, number> = {}
  let mine = 0
  for (const [k, pids] of Object.entries(roles)) {
    // A process that exited reads as 0: count nothing rather than less than nothing.
    const used = Math.max(0, sum(pids) - (before[k] ?? 0))
    mine += used
    cpu[k] = used
  }
  cpu['other processes'] = Math.max(0, machineBusySeconds() - busy0 - mine)
  return { cpu, wall }
}

/** Cores each role used while `work` ran (CPU seconds over wall seconds). */
async function cpuDuring (roles: Record<string, number[]>, work: () => Promise<void>): Promise<{ cores: Cores }> {
  const { cpu, wall } = await cpuSecondsDuring({ ...roles, bench: [process.pid] }, work)
  return { cores: Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, round(v / wall, 3)])) }
}
