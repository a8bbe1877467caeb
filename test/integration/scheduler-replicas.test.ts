import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as delay } from 'node:timers/promises'
import { request } from 'undici'
import { buildImage, pushImage, type BuiltBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRedis, type TestRedis } from '../helpers/redis.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

// Three scheduler replicas sharing the swarm through Redis, as real processes
// (each replica, each peer, Redis and the registry its own process). Peers are
// given all three replicas and start at a random one; whichever replica
// answers, it knows the whole swarm. A replica SIGKILLed in the middle of a
// cold pull costs neither bytes nor correctness: its peers move to another
// within seconds. Redis lost (killed and back empty) in the middle of a pull:
// plans fall back to the origin while it is away, and once it is back the
// replicas hang up their peers, which register and announce again, so the
// swarm is known and serves a fresh peer from peers. And a seed in session
// with one replica is the one sent to the origin for a peer planned by another.

const MIB = 1024 * 1024
/** What the origin sends besides blob bytes: tag manifests and the small authorization HEADs a peer makes before serving a blob from the swarm. */
const ORIGIN_SLACK = 64 * 1024
const PEERS = 5
const PASSWORD = 'replicas-test-redis-password-3f9c1e'

interface HostView { peerId: string, hostname: string, seed: boolean, tasks: number, replica?: string }
interface TaskView { digest: string, completeHolders: string[], partialHolders: Array<{ peerId: string, pieces: number }> }
interface Pulled { digest: string, sha256: string, bytes: number, status: number }

async function hosts (scheduler: TestScheduler): Promise<HostView[]> {
  const res = await request(`${scheduler.httpUrl}/api/v1/hosts`, { signal: AbortSignal.timeout(2_000) })
  assert.equal(res.statusCode, 200)
  return await res.body.json() as HostView[]
}

async function tasks (scheduler: TestScheduler): Promise<TaskView[]> {
  const res = await request(`${scheduler.httpUrl}/api/v1/tasks`, { signal: AbortSignal.timeout(2_000) })
  assert.equal(res.statusCode, 200)
  return await res.body.json() as TaskView[]
}

/** Whether a replica's shared state takes changes now, as its /healthy says (still 200 while it does not). */
async function stateHealthy (scheduler: TestScheduler): Promise<boolean | undefined> {
  const res = await request(`${scheduler.httpUrl}/healthy`, { signal: AbortSignal.timeout(2_000) })
  assert.equal(res.statusCode, 200, 'the replica stays ready')
  return (await res.body.json() as { stateHealthy?: boolean }).stateHealthy
}

/** One blob through a peer's mirror, as containerd asks for it; hashed as it streams. */
async function getBlob (peer: TestPeer, origin: ThrottleProxy, repo: string, blob: BuiltBlob): Promise<Pulled> {
  const res = await request(`${peer.url}/v2/${repo}/blobs/${blob.digest}?ns=${encodeURIComponent(origin.host)}`, { signal: AbortSignal.timeout(120_000) })
  const hash = createHash('sha256')
  let bytes = 0
  for await (const chunk of res.body) {
    hash.update(chunk as Buffer)
    bytes += (chunk as Buffer).length
  }
  return { digest: blob.digest, sha256: `sha256:${hash.digest('hex')}`, bytes, status: res.statusCode }
}

/** What containerd does through a mirror: the tag's manifest, then every blob by digest at once. */
async function pull (peer: TestPeer, origin: ThrottleProxy, repo: string, image: BuiltImage): Promise<Pulled[]> {
  const res = await request(`${peer.url}/v2/${repo}/manifests/${image.tag}?ns=${encodeURIComponent(origin.host)}`, {
    headers: { accept: 'application/vnd.oci.image.manifest.v1+json' },
    signal: AbortSignal.timeout(60_000)
  })
  const body = Buffer.from(await res.body.arrayBuffer())
  assert.equal(res.statusCode, 200, `manifest of ${repo}:${image.tag} from ${peer.name}: ${body.toString().slice(0, 300)}`)
  assert.equal(`sha256:${createHash('sha256').update(body).digest('hex')}`, image.manifest.digest, `${peer.name}: the manifest intact`)
  return Promise.all([image.config, ...image.layers].map(async b => getBlob(peer, origin, repo, b)))
}

function assertIntact (pulled: Pulled[], image: BuiltImage, who: string): void {
  assert.equal(pulled.length, image.layers.length + 1, `${who}: every blob`)
  for (const b of pulled) {
    const expected = image.blobs.find(x => x.digest === b.digest)
    assert.equal(b.status, 200, `${who}: ${b.digest} answered 200`)
    assert.equal(b.bytes, expected?.size, `${who}: ${b.digest} complete`)
    assert.equal(b.sha256, b.digest, `${who}: ${b.digest} intact`)
  }
}

/** Per peer, the pieces its fetcher sent to the origin, by reason (only reasons that occurred are exposed). */
async function fallbacks (peers: TestPeer[]): Promise<string> {
  const each = await Promise.all(peers.map(async p => `${p.name}=${JSON.stringify((await p.metrics()).byLabel('damselfly_swarm_origin_fallbacks_total', 'reason'))}`))
  return each.join(' ')
}

/** pino lines of a process's output, parsed (the rest skipped). */
function logLines (output: string): Array<Record<string, unknown>> {
  const out: Array<Record<string, unknown>> = []
  for (const line of output.split('\n')) {
    if (!line.startsWith('{')) continue
    try {
      out.push(JSON.parse(line) as Record<string, unknown>)
    } catch {}
  }
  return out
}

/** The TCP port of a scheduler address as a peer logs it (host:port or a multiaddr). */
function portOf (address: unknown): number {
  const m = /(\d+)$/.exec(String(address))
  return m === null ? -1 : Number(m[1])
}

describe('scheduler replicas over Redis: one swarm whichever replica answers', () => {
  let work: TmpDir
  let registry: TestRegistry
  let origin: ThrottleProxy
  let redis: TestRedis
  const schedulers: TestScheduler[] = []
  /** Each replica's id, as its /healthy names it; hosts name the replica they are connected through by it. */
  const replicaIds = new Map<TestScheduler, string>()
  const peers: TestPeer[] = []
  /** peer name → libp2p peer id */
  const ids = new Map<string, string>()
  let seed: TestPeer
  let pullers: TestPeer[] = []
  let killed: TestScheduler | undefined
  let survivors: TestScheduler[] = []
  let imageA: BuiltImage
  let imageB: BuiltImage

  const replicaName = (s: TestScheduler): string => `replica-${schedulers.indexOf(s)}`
  const list = (): string => schedulers.map(s => s.address).join(',')

  async function addPeer (name: string, opts: { seed?: boolean, scheduler?: string } = {}): Promise<TestPeer> {
    const peer = await startPeer({ registry: origin.url, scheduler: opts.scheduler ?? list(), name, ...(opts.seed === true ? { seed: true } : {}) })
    peers.push(peer)
    await waitFor(async () => /"swarm started"/.test(peer.output()), { timeoutMs: 10_000, what: `${name} to start its swarm` })
    const id = logLines(peer.output()).find(l => l.msg === 'swarm started')?.peerId
    assert.equal(typeof id, 'string', `${name} logged its peer id`)
    ids.set(name, id as string)
    return peer
  }

  /** The replica a peer is in session with now: the address of its latest "registered with the scheduler". */
  function homeOf (peer: TestPeer, since = 0): TestScheduler | undefined {
    const lines = logLines(peer.output()).filter(l => l.msg === 'registered with the scheduler' && Date.parse(String(l.time)) >= since)
    const last = lines.at(-1)
    if (last === undefined) return undefined
    return schedulers.find(s => portOf(s.address) === portOf(last.address))
  }

  /** The replica a host is connected through, as `scheduler` lists it. */
  async function viaOf (scheduler: TestScheduler, peerId: string): Promise<TestScheduler | undefined> {
    const host = (await hosts(scheduler)).find(h => h.peerId === peerId)
    return schedulers.find(s => host?.replica !== undefined && replicaIds.get(s) === host.replica)
  }

  before(async () => {
    work = await tmpDir('df-replicas-it-')
    registry = await startRegistry()
    origin = await startThrottleProxy({ targetPort: registry.port })
    redis = await startRedis({ password: PASSWORD })
    const stateArgs = ['--state', redis.url, '--state-password-file', redis.passwordFile as string]
    schedulers.push(...await Promise.all([0, 1, 2].map(async () => startScheduler({ args: stateArgs }))))
    for (const s of schedulers) {
      const res = await request(`${s.httpUrl}/healthy`, { signal: AbortSignal.timeout(2_000) })
      const body = await res.body.json() as { replica?: string, state?: string }
      assert.equal(body.state, 'redis', 'the replica keeps its state in Redis')
      assert.equal(typeof body.replica, 'string', '/healthy names the replica')
      replicaIds.set(s, body.replica as string)
    }
    assert.equal(new Set(replicaIds.values()).size, 3, 'three distinct replicas')
    seed = await addPeer('seed', { seed: true })
    pullers = await Promise.all(Array.from({ length: PEERS }, async (_, i) => addPeer(`peer-${i}`)))
    imageA = await buildImage(path.join(work.path, 'a'), { layers: [24 * MIB, 24 * MIB + 4321, 300 * 1024, 17 * 1024 + 5], seed: 'replicas-a', tag: 'v1' })
    await pushImage(imageA, `${registry.host}/replicas/a:v1`)
    imageB = await buildImage(path.join(work.path, 'b'), { layers: [16 * MIB + 11, 16 * MIB + 4099, 200 * 1024], seed: 'replicas-b', tag: 'v1' })
    await pushImage(imageB, `${registry.host}/replicas/b:v1`)
  })

  after(async () => {
    // DAMSELFLY_TEST_LOGS=dir keeps every process's output (the last 64 KiB) for a post-mortem.
    const keep = process.env.DAMSELFLY_TEST_LOGS
    if (keep !== undefined && keep !== '') {
      await mkdir(keep, { recursive: true })
      for (const p of peers) await writeFile(path.join(keep, `${p.name}.log`), p.output())
      for (const s of schedulers) await writeFile(path.join(keep, `${replicaName(s)}.log`), s.output())
    }
    await Promise.allSettled(peers.map(async p => { await p.close() }))
    await Promise.allSettled(schedulers.map(async s => { await s.close() }))
    await redis?.close()
    await origin?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('peers spread over the replicas, and every replica lists every host', async (t) => {
    const everyone = [seed, ...pullers]
    await waitFor(async () => everyone.every(p => homeOf(p) !== undefined), { timeoutMs: 15_000, what: 'every peer to register with a replica' })
    const spread = schedulers.map(s => everyone.filter(p => homeOf(p) === s).map(p => p.name))
    t.diagnostic(`sessions per replica: ${spread.map((names, i) => `replica-${i}=[${names.join(' ')}]`).join(' ')}`)
    // Which replica a peer starts at is random (all on one has a chance of 3/3^6): logged, not asserted.
    const want = [...ids.values()].sort()
    for (const s of schedulers) {
      // Each replica lists the hosts of the other two as well: the whole swarm through the shared log.
      await waitFor(async () => JSON.stringify((await hosts(s)).map(h => h.peerId).sort()) === JSON.stringify(want), {
        timeoutMs: 10_000,
        what: `${replicaName(s)} to list all ${want.length} hosts`
      })
      const listed = await hosts(s)
      assert.equal(listed.length, want.length, `${replicaName(s)} lists every host once`)
      assert.equal(listed.filter(h => h.seed).map(h => h.peerId).join(), ids.get('seed'), `${replicaName(s)} knows which host is the seed`)
      // …and, for each, the replica it is in session with (which the peer itself names).
      for (const p of everyone) {
        assert.equal(await viaOf(s, ids.get(p.name) as string), homeOf(p), `${replicaName(s)} lists ${p.name} as connected through the replica it registered with`)
      }
    }
  })

  test('a replica SIGKILLed during a cold pull: every pull completes intact, the origin sends one copy, its peers move within seconds', async (t) => {
    const everyone = [seed, ...pullers]
    // The replica with the most sessions (one at least, by pigeonhole).
    const counts = schedulers.map(s => everyone.filter(p => homeOf(p) === s).length)
    const victim = schedulers[counts.indexOf(Math.max(...counts))] as TestScheduler
    killed = victim
    survivors = schedulers.filter(s => s !== victim)
    const moving = everyone.filter(p => homeOf(p) === victim)
    assert.ok(moving.length >= 1, 'the replica to kill has peers in session with it')

    origin.reset()
    // A slow origin link, so that the kill lands while the pulls run.
    origin.setRate(16 * MIB)
    const done = new Set<string>()
    const pulls = pullers.map(async p => {
      try {
        return await pull(p, origin, 'replicas/a', imageA)
      } finally {
        done.add(p.name)
      }
    })
    await waitFor(async () => origin.bytesDown() >= 6 * MIB, { timeoutMs: 30_000, intervalMs: 20, what: 'the pulls to be under way' })
    const killedAt = Date.now()
    await victim.kill()
    const inFlight = pullers.length - done.size
    t.diagnostic(`killed ${replicaName(victim)} (${moving.map(p => p.name).join(' ')} in session with it) with ${inFlight}/${pullers.length} pulls running, ${(origin.bytesDown() / MIB).toFixed(1)} MiB from the origin so far`)
    assert.ok(inFlight > 0, 'the replica died while pulls were running')

    // Its peers register with a surviving replica: every survivor lists them as connected through a survivor
    // (its API); the peer's session is complete once it has sent its inventory again (the peer's log).
    const registered = new Map<string, number>()
    const resumed = new Map<string, number>()
    const watching = waitFor(async () => {
      for (const p of moving) {
        const id = ids.get(p.name) as string
        if (!registered.has(p.name)) {
          const via = await Promise.all(survivors.map(async s => viaOf(s, id)))
          if (via.every(v => v !== undefined && survivors.includes(v))) registered.set(p.name, Date.now() - killedAt)
        }
        const home = homeOf(p, killedAt)
        if (!resumed.has(p.name) && home !== undefined && home !== victim) resumed.set(p.name, Date.now() - killedAt)
      }
      return registered.size === moving.length && resumed.size === moving.length
    }, { timeoutMs: 20_000, intervalMs: 50, what: `${moving.map(p => p.name).join(' ')} to register with a surviving replica` })

    const results = await Promise.allSettled(pulls)
    const moved: Error | undefined = await watching.then(() => undefined, (err: unknown) => err as Error)
    origin.setRate(undefined)
    const sent = origin.bytesDown()
    const ratio = sent / imageA.totalBytes
    const byPeer = await Promise.all(everyone.map(async p => `${p.name}=${(await p.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' })}`))
    // The figures first, so that they are logged whichever assertion fails.
    t.diagnostic(`origin sent ${sent} bytes for a ${imageA.totalBytes}-byte image pulled by ${pullers.length} peers: ${ratio.toFixed(3)}× the image (origin bytes per peer: ${byPeer.join(' ')})`)
    t.diagnostic(`pieces sent to the origin by the fetcher, by reason: ${await fallbacks(everyone)}`)
    t.diagnostic(`after the kill, listed by every survivor as connected through a survivor (their /api/v1/hosts): ${[...registered].map(([name, ms]) => `${name} ${ms} ms`).join(', ')}; session resumed with the inventory re-sent (the peer's log): ${[...resumed].map(([name, ms]) => `${name} ${ms} ms`).join(', ')}`)

    results.forEach((r, i) => {
      const who = pullers[i]?.name ?? ''
      assert.equal(r.status, 'fulfilled', `${who}: ${r.status === 'rejected' ? String((r.reason as Error)?.stack ?? r.reason) : ''}`)
      if (r.status === 'fulfilled') assertIntact(r.value, imageA, who)
    })
    if (moved !== undefined) throw moved
    const slowest = Math.max(...registered.values())
    assert.ok(slowest < 5_000, `the killed replica's peers were registered elsewhere after ${slowest} ms`)

    // The dead replica's liveness runs out (10 s): the survivors drop the hosts still connected through it.
    // Every host is still listed, each connected through a survivor.
    await waitFor(async () => survivors.every(s => /stopped renewing its liveness/.test(s.output())), { timeoutMs: 20_000, what: 'the survivors to notice the dead replica' })
    await delay(500)
    const want = [...ids.values()].sort()
    for (const s of survivors) {
      const listed = await hosts(s)
      assert.deepEqual(listed.map(h => h.peerId).sort(), want, `${replicaName(s)} lists every host after the dead replica's hosts were dropped`)
      for (const h of listed) assert.ok(survivors.some(x => replicaIds.get(x) === h.replica), `${replicaName(s)}: ${h.peerId} is connected through a surviving replica (${String(h.replica)})`)
    }
    // And it knows who holds the image: every puller of it, whichever replica it talks to.
    for (const s of survivors) {
      const view = await tasks(s)
      for (const layer of imageA.layers) {
        const holders = view.find(x => x.digest === layer.digest)?.completeHolders ?? []
        for (const p of pullers) assert.ok(holders.includes(ids.get(p.name) as string), `${replicaName(s)}: ${p.name} holds ${layer.digest.slice(0, 19)}…`)
      }
    }

    // A peer whose replica died waits for its next session (fetcher `awaitSession`) rather than sending the rest of
    // every blob to the origin, and keeps its origin leases when it registers with another replica (3–5× before).
    assert.ok(sent <= imageA.totalBytes * 1.05 + ORIGIN_SLACK, `origin sent ${sent} bytes, ${ratio.toFixed(3)}× the ${imageA.totalBytes}-byte image (per peer: ${byPeer.join(' ')})`)
  })

  test('Redis killed, a cold image pulled meanwhile, Redis back empty mid-pull: pulls complete intact, then the swarm is known again and serves a fresh peer', async (t) => {
    assert.ok(killed !== undefined && survivors.length === 2, 'runs after the replica kill')
    const epochBefore = await redis.command('GET', 'damselfly:epoch')
    assert.notEqual(epochBefore, '', 'the replicas share an epoch in Redis')
    const toOriginPlans = async (): Promise<number[]> => Promise.all(survivors.map(async s => {
      const text = await (await request(`${s.httpUrl}/metrics`, { signal: AbortSignal.timeout(2_000) })).body.text()
      return Number(/^damselfly_scheduler_state_unavailable_plans_total (\S+)/m.exec(text)?.[1] ?? 0)
    }))
    const plansBefore = await toOriginPlans()

    await redis.stop(true)
    const downAt = Date.now()
    // Every replica says so: still ready (its plans send peers to the origin), its shared state not taking changes.
    await waitFor(async () => (await Promise.all(survivors.map(stateHealthy))).every(h => h === false), { timeoutMs: 5_000, what: 'the replicas to report their shared state unhealthy' })

    origin.reset()
    origin.setRate(32 * MIB)
    const done = new Set<string>()
    const pulls = pullers.map(async p => {
      try {
        return await pull(p, origin, 'replicas/b', imageB)
      } finally {
        done.add(p.name)
      }
    })
    await waitFor(async () => origin.bytesDown() >= 8 * MIB, { timeoutMs: 30_000, intervalMs: 20, what: 'the pulls of the second image to be under way with Redis away' })
    const runningAtRestart = pullers.length - done.size
    await redis.start()
    const upAt = Date.now()
    const sentWhileDown = origin.bytesDown()
    t.diagnostic(`Redis down ${upAt - downAt} ms; ${(sentWhileDown / MIB).toFixed(1)} MiB from the origin meanwhile; ${runningAtRestart}/${pullers.length} pulls still running when it came back`)
    assert.ok(runningAtRestart > 0, 'Redis came back while pulls were running')

    const results = await Promise.allSettled(pulls)
    const pulledAt = Date.now()
    origin.setRate(undefined)
    const plansAfter = await toOriginPlans()
    t.diagnostic(`second image: origin sent ${origin.bytesDown()} bytes, ${(origin.bytesDown() / imageB.totalBytes).toFixed(2)}× the ${imageB.totalBytes}-byte image (the origin stands in while Redis is away): ${sentWhileDown} until Redis was back, ${origin.bytesDown() - sentWhileDown} after`)
    t.diagnostic(`pieces sent to the origin by the fetcher, by reason (since the start): ${await fallbacks([seed, ...pullers])}`)
    t.diagnostic(`plans answered "go to the origin" (the shared state not taking changes): ${survivors.map((s, i) => `${replicaName(s)}=${(plansAfter[i] ?? 0) - (plansBefore[i] ?? 0)}`).join(' ')}`)
    results.forEach((r, i) => {
      const who = pullers[i]?.name ?? ''
      assert.equal(r.status, 'fulfilled', `${who}: ${r.status === 'rejected' ? String((r.reason as Error)?.stack ?? r.reason) : ''}`)
      if (r.status === 'fulfilled') assertIntact(r.value, imageB, who)
    })
    const answered = plansAfter.reduce((a, b) => a + b, 0) - plansBefore.reduce((a, b) => a + b, 0)
    assert.ok(answered > 0, 'with Redis away, plans for a cold image sent peers to the origin at once')

    await waitFor(async () => (await Promise.all(survivors.map(stateHealthy))).every(h => h === true), { timeoutMs: 10_000, what: 'the replicas to report their shared state healthy again' })
    // Redis came back empty: a new epoch, and the replicas had their peers register and announce again.
    let epochAfter = ''
    await waitFor(async () => (epochAfter = await redis.command('GET', 'damselfly:epoch')) !== '', { timeoutMs: 10_000, what: 'the replicas to start a new epoch' })
    assert.notEqual(epochAfter, epochBefore, 'Redis came back without the old epoch')
    for (const s of survivors) {
      // Seconds (the epoch is read every second). Runs that missed 30 s were a replica stuck reloading a snapshot
      // another wrote of its old history under the new epoch (refused since; test/scheduler/swarm-log.test.ts).
      await waitFor(async () => /"why":"the shared state was lost \(a new epoch\)"/.test(s.output()), { timeoutMs: 15_000, what: `${replicaName(s)} to notice the new epoch and ask its peers to announce again` })
    }
    const blobs = [imageA.config, ...imageA.layers, imageB.config, ...imageB.layers]
    const want = [...ids.values()].sort()
    const missing = async (s: TestScheduler): Promise<string[]> => {
      const out: string[] = []
      const listed = (await hosts(s)).map(h => h.peerId).sort()
      if (JSON.stringify(listed) !== JSON.stringify(want)) out.push(`hosts ${listed.length}/${want.length}`)
      const view = await tasks(s)
      for (const b of blobs) {
        const holders = view.find(x => x.digest === b.digest)?.completeHolders ?? []
        const lacking = pullers.filter(p => !holders.includes(ids.get(p.name) as string))
        if (lacking.length > 0) out.push(`${b.digest.slice(7, 19)} lacks ${lacking.map(p => p.name).join(',')}`)
      }
      return out
    }
    let last: string[] = []
    // A reader that meets the new history before the epoch check did checks the epoch first, so this replica's peers
    // are hung up (and register again) before its copy is cleared; before that fix, some stayed missing.
    await waitFor(async () => {
      last = (await Promise.all(survivors.map(async s => (await missing(s)).map(m => `${replicaName(s)}: ${m}`)))).flat()
      return last.length === 0
    }, { timeoutMs: 15_000, intervalMs: 100, what: 'every surviving replica to list every host and every holder again' }).catch((err: unknown) => {
      throw new Error(`${(err as Error).message}; still missing: ${last.join('; ')}`, { cause: err })
    })
    t.diagnostic(`after Redis came back empty, every surviving replica listed all ${want.length} hosts and all holders of ${blobs.length} blobs ${Date.now() - upAt} ms after Redis was back (${Date.now() - pulledAt} ms after the pulls ended)`)

    // A fresh peer takes an already-held blob from peers, not from the origin.
    const fresh = await addPeer('fresh')
    const freshId = ids.get('fresh') as string
    for (const s of survivors) {
      await waitFor(async () => (await hosts(s)).some(h => h.peerId === freshId), { timeoutMs: 10_000, what: `${replicaName(s)} to list the fresh peer` })
    }
    const blob = imageB.layers[0] as BuiltBlob
    origin.reset()
    const got = await getBlob(fresh, origin, 'replicas/b', blob)
    assert.equal(got.status, 200)
    assert.equal(got.bytes, blob.size, 'the fresh peer got the whole blob')
    assert.equal(got.sha256, blob.digest, 'the fresh peer got the blob intact')
    const m = await fresh.metrics()
    const fromPeers = m.get('damselfly_fetched_bytes_total', { source: 'peer' })
    const fromOrigin = m.get('damselfly_fetched_bytes_total', { source: 'origin' })
    t.diagnostic(`fresh peer: ${fromPeers} bytes from peers, ${fromOrigin} from the origin; the origin sent ${origin.bytesDown()} bytes for a ${blob.size}-byte blob`)
    assert.equal(fromOrigin, 0, 'the fresh peer took nothing from the origin')
    assert.equal(fromPeers, blob.size, 'the fresh peer took the whole blob from peers')
    assert.ok(origin.bytesDown() < ORIGIN_SLACK, `the origin sent ${origin.bytesDown()} bytes for a blob the swarm holds`)
  })

  test('a seed in session with one replica does the origin fetch for a peer in session with another', async (t) => {
    assert.ok(killed !== undefined && survivors.length === 2, 'runs after the replica kill')
    const seedId = ids.get('seed') as string
    const seedHome = await viaOf(survivors[0] as TestScheduler, seedId)
    assert.ok(seedHome !== undefined && survivors.includes(seedHome), 'the seed is in session with a surviving replica (if not: see the re-registration race after Redis came back empty, in the test before)')
    const other = survivors.find(s => s !== seedHome) as TestScheduler
    // Given only the replica the seed is not in session with: every plan of this peer is made there.
    const probe = await addPeer('probe', { scheduler: other.address })
    const probeId = ids.get('probe') as string
    await waitFor(async () => await viaOf(other, probeId) === other, { timeoutMs: 30_000, what: `the probe to register with ${replicaName(other)}` })
    const imageC = await buildImage(path.join(work.path, 'c'), { layers: [8 * MIB + 77], seed: 'replicas-c', tag: 'v1' })
    await pushImage(imageC, `${registry.host}/replicas/c:v1`)
    const layer = imageC.layers[0] as BuiltBlob
    const seedBefore = (await seed.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' })
    const startedAt = Date.now()
    origin.reset()
    assertIntact(await pull(probe, origin, 'replicas/c', imageC), imageC, 'the probe')
    const seedFetched = (await seed.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' }) - seedBefore
    const probeFetched = (await probe.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' })
    const refused = logLines(other.output()).filter(l => l.msg === 'a peer did not do what the scheduler asked' && l.peer === seedId && Date.parse(String(l.time)) >= startedAt)
    t.diagnostic(`seed (in session with ${replicaName(seedHome)}) fetched ${seedFetched} bytes from the origin, the probe (with ${replicaName(other)}) ${probeFetched}; ${replicaName(other)} logged ${refused.length} commands the seed did not carry out${refused[0] === undefined ? '' : ` (${String(refused[0].what)}: ${String(refused[0].err)})`}`)
    assert.ok(origin.bytesDown() <= imageC.totalBytes * 1.05 + ORIGIN_SLACK, `origin sent ${origin.bytesDown()} bytes for a ${imageC.totalBytes}-byte image`)
    // The seed takes commands only from its own replica: the replica it is in session with carries out the
    // command, whichever replica appended the event (before: the command failed and the probe fetched it itself).
    assert.ok(seedFetched >= layer.size, `the seed fetched the layer from the origin (${seedFetched} bytes; the probe ${probeFetched})`)
    assert.ok(probeFetched <= 2 * MIB, `the ordinary peer fetched ${probeFetched} bytes from the origin`)
  })
})
