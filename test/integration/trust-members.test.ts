import assert from 'node:assert/strict'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import path from 'node:path'
import { after, before, describe, test, type TestContext } from 'node:test'
import { setTimeout as delay } from 'node:timers/promises'
import { request } from 'undici'
import { startHostileMember, type HostileMember } from '../helpers/hostile-member.ts'
import { buildImage, pushImage, readBlob, type BuiltBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type PeerOptions, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

/**
 * Attacks by members of the cluster (they hold the cluster secret) on the
 * swarm's piece tables, and poisoning through a registry nobody configured
 * (docs: /work/notes/trust-contract.md, "Piece tables are earned"). Every
 * byte a client gets under a 2xx is compared with the real blob; a full GET
 * cut short is retried as containerd would.
 */

const MIB = 1024 * 1024
const SECRET = 'the hostile member knows this secret too'
const REQUEST_TIMEOUT_MS = 20_000
/** Attempts a client makes at a full GET that fails or is cut (containerd retries), and at a range read. */
const FULL_TRIES = 3
const RANGE_TRIES = 2
/**
 * Origin egress allowed for one scenario, in copies of what was pulled: the
 * liar's own fetch (1); the honest full pull while the liar's table stands,
 * every piece of which fails at the liar and comes from the origin (1); range
 * reads of unconfirmed pieces taken from the origin (under 1: three ranges
 * cover five of seven pieces); the re-fetch by a new first fetcher after the
 * table is reset (1); and room for the config and a piece fetched twice
 * (0.5). A lie that turns every retry into an origin fetch costs far more
 * (10× and up).
 */
const EGRESS_BOUND = 4.5

let registry: TestRegistry
let origin: ThrottleProxy
let work: TmpDir
/** Everything started, closed by the last after hook whatever happened. */
const closers: Array<() => Promise<void>> = []

before(async () => {
  work = await tmpDir('df-trust-members-')
  registry = await startRegistry()
  origin = await startThrottleProxy({ targetPort: registry.port, bytesPerSecond: 60 * MIB })
})

after(async () => {
  await Promise.allSettled(closers.splice(0).map(async close => { await close() }))
  await origin?.close()
  await registry?.close()
  await work?.cleanup()
})

/* What a client sees */

interface Outcome {
  peer: string
  what: string
  status: number | 'error'
  /** 2xx, no transport error, every declared byte received, and the declared length is what was asked. */
  complete: boolean
  received: number
  /** Bytes under a 2xx that differ from the real blob at their offset (or lie past its end). */
  wrong: number
  ms: number
  error?: string
}

/** Every response of one scenario, and whether each operation ended in a correct, complete answer. */
class Tally {
  readonly outcomes: Outcome[] = []
  readonly ops: Array<{ peer: string, what: string, ok: boolean, attempts: number }> = []

  /** Wrong bytes a client would accept: in complete 2xx answers, and in any range answer (nothing checks a range). */
  get wrongAccepted (): number {
    return this.outcomes.filter(o => ok2xx(o) && (o.complete || o.what.startsWith('range'))).reduce((s, o) => s + o.wrong, 0)
  }

  /** Wrong bytes in full GETs that were cut before their end (the contract lets these out before the cut). */
  get wrongBeforeCut (): number {
    return this.outcomes.filter(o => ok2xx(o) && !o.complete && !o.what.startsWith('range')).reduce((s, o) => s + o.wrong, 0)
  }

  figures (): Record<string, unknown> {
    const statuses: Record<string, number> = {}
    for (const o of this.outcomes) statuses[String(o.status)] = (statuses[String(o.status)] ?? 0) + 1
    return {
      requests: this.outcomes.length,
      wrongAccepted: this.wrongAccepted,
      wrongBeforeCut: this.wrongBeforeCut,
      statuses,
      status5xx: this.outcomes.filter(o => typeof o.status === 'number' && o.status >= 500).length,
      cut2xx: this.outcomes.filter(o => ok2xx(o) && !o.complete).length,
      slowestMs: Math.max(0, ...this.outcomes.map(o => o.ms)),
      errors: [...new Set(this.outcomes.flatMap(o => o.error === undefined ? [] : [o.error.slice(0, 80)]))].slice(0, 3),
      opsFailed: this.ops.filter(o => !o.ok).map(o => `${o.peer}:${o.what}`)
    }
  }
}

function ok2xx (o: Outcome): boolean {
  return typeof o.status === 'number' && o.status >= 200 && o.status < 300
}

function countWrong (got: Buffer, real: Buffer, offset: number): number {
  const want = real.subarray(offset, offset + got.length)
  let wrong = got.length - want.length
  for (let off = 0; off < want.length; off += 64 * 1024) {
    const end = Math.min(want.length, off + 64 * 1024)
    if (got.subarray(off, end).equals(want.subarray(off, end))) continue
    for (let i = off; i < end; i++) if (got[i] !== want[i]) wrong++
  }
  return wrong
}

interface Get {
  peer: TestPeer
  /** `/v2/<repo>/blobs/<digest>` or `/v2/<repo>/manifests/<tag>`. */
  path: string
  /** The real content. */
  real: Buffer
  what: string
  range?: [number, number]
  /** containerd's `?ns=`; absent: the peer's default registry. */
  ns?: string | undefined
  headers?: Record<string, string>
}

async function checkedGet (tally: Tally, g: Get): Promise<Outcome> {
  const url = `${g.peer.url}${g.path}${g.ns === undefined ? '' : `?ns=${encodeURIComponent(g.ns)}`}`
  const headers: Record<string, string> = { accept: 'application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json', ...g.headers }
  if (g.range !== undefined) headers.range = `bytes=${g.range[0]}-${g.range[1]}`
  const chunks: Buffer[] = []
  const started = Date.now()
  let status: number | 'error' = 'error'
  let error: string | undefined
  let declared = NaN
  let offset = 0
  try {
    const res = await request(url, { headers, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) })
    status = res.statusCode
    declared = Number(res.headers['content-length'])
    if (status === 206) offset = Number(/^bytes (\d+)-/.exec(String(res.headers['content-range']))?.[1] ?? NaN)
    try {
      for await (const chunk of res.body) chunks.push(chunk as Buffer)
    } catch (err) {
      error = (err as Error).message
    }
  } catch (err) {
    error = (err as Error).message
  }
  const got = Buffer.concat(chunks)
  const asked = g.range === undefined ? g.real.length : g.range[1] - g.range[0] + 1
  const outcome: Outcome = { peer: g.peer.name, what: g.what, status, complete: false, received: got.length, wrong: 0, ms: Date.now() - started, ...(error === undefined ? {} : { error }) }
  if (ok2xx(outcome)) {
    // A 200 to a range read is the whole blob; a 206 is where its Content-Range says.
    const at = status === 206 ? offset : 0
    outcome.wrong = Number.isSafeInteger(at) ? countWrong(got, g.real, at) : got.length
    const expected = status === 206 ? asked : g.real.length
    outcome.complete = error === undefined && got.length === declared && declared === expected && (status !== 206 || at === g.range?.[0])
  }
  tally.outcomes.push(outcome)
  return outcome
}

/** One operation as a client does it: tried again (after a pause) until a complete, correct answer or `tries` run out. */
async function untilGood (tally: Tally, g: Get, tries: number): Promise<boolean> {
  for (let attempt = 1; attempt <= tries; attempt++) {
    const o = await checkedGet(tally, g)
    if (o.complete && o.wrong === 0) {
      tally.ops.push({ peer: g.peer.name, what: g.what, ok: true, attempts: attempt })
      return true
    }
    if (attempt < tries) await delay(500)
  }
  tally.ops.push({ peer: g.peer.name, what: g.what, ok: false, attempts: tries })
  return false
}

/** Three unaligned ~1 MiB reads, like nydusd's: across pieces 1–2, 4–5 and the last two. */
function rangesOf (size: number): Array<[number, number]> {
  return [
    [MIB + 100_003, 2 * MIB + 100_002],
    [4 * MIB + 77, 5 * MIB + 76],
    [size - MIB - 999, size - 1000]
  ]
}

async function fullGet (tally: Tally, peer: TestPeer, repo: string, image: BuiltImage, blob: BuiltBlob, ns: string | undefined): Promise<boolean> {
  return untilGood(tally, { peer, path: `/v2/${repo}/blobs/${blob.digest}`, real: readBlob(image, blob.digest), what: `full ${blob === image.config ? 'config' : 'layer'}`, ns }, FULL_TRIES)
}

async function rangeReads (tally: Tally, peer: TestPeer, repo: string, image: BuiltImage, blob: BuiltBlob, ns: string | undefined): Promise<void> {
  const real = readBlob(image, blob.digest)
  for (const range of rangesOf(blob.size)) {
    await untilGood(tally, { peer, path: `/v2/${repo}/blobs/${blob.digest}`, real, what: `range ${range[0]}-${range[1]}`, range, ns }, RANGE_TRIES)
  }
}

async function manifestGet (tally: Tally, peer: TestPeer, repo: string, image: BuiltImage, ns: string | undefined): Promise<boolean> {
  return untilGood(tally, { peer, path: `/v2/${repo}/manifests/${image.tag}`, real: readBlob(image, image.manifest.digest), what: 'manifest', ns }, FULL_TRIES)
}

/** What containerd does: the tag's manifest, then the config and the layers side by side. */
async function pullImage (tally: Tally, peer: TestPeer, repo: string, image: BuiltImage, ns: string | undefined): Promise<boolean> {
  if (!await manifestGet(tally, peer, repo, image, ns)) return false
  const blobs = await Promise.all([image.config, ...image.layers].map(async blob => fullGet(tally, peer, repo, image, blob, ns)))
  return blobs.every(Boolean)
}

/* The scheduler's view */

interface HostView { peerId: string, barred: boolean }

async function hosts (scheduler: TestScheduler): Promise<HostView[]> {
  const res = await request(`${scheduler.httpUrl}/api/v1/hosts`, { signal: AbortSignal.timeout(5_000) })
  return await res.body.json() as HostView[]
}

async function isBarred (scheduler: TestScheduler, peerId: string): Promise<boolean> {
  return (await hosts(scheduler)).find(h => h.peerId === peerId)?.barred === true
}

/** Whether the scheduler lists `peerId` as barred within `ms`. */
async function barredWithin (scheduler: TestScheduler, peerId: string, ms: number): Promise<boolean> {
  return waitFor(async () => isBarred(scheduler, peerId), { timeoutMs: ms, intervalMs: 250, what: 'a bar' }).then(() => true, () => false)
}

async function completeHolders (scheduler: TestScheduler, digest: string): Promise<string[]> {
  const res = await request(`${scheduler.httpUrl}/api/v1/tasks`, { signal: AbortSignal.timeout(5_000) })
  const tasks = await res.body.json() as Array<{ digest: string, completeHolders: string[] }>
  return tasks.find(t => t.digest === digest)?.completeHolders ?? []
}

function peerIdOf (peer: TestPeer): string {
  const id = /"peerId":"([^"]+)"[^\n]*"swarm started"/.exec(peer.output())?.[1]
  assert.ok(id !== undefined, `${peer.name} logged its peer id`)
  return id
}

/**
 * Every check is evaluated, the figures printed, then all failures reported
 * at once: the first failing check alone would hide the others' figures.
 */
function verdict (t: TestContext, name: string, figures: Record<string, unknown>, checks: Array<[boolean, string]>): void {
  const text = JSON.stringify(figures)
  t.diagnostic(`${name}: ${text}`)
  const failed = checks.filter(([ok]) => !ok).map(([, message]) => message)
  assert.deepEqual(failed, [], `${name}: ${failed.length} of ${checks.length} checks failed\nfigures: ${text}`)
}

async function publish (name: string, layers: number[]): Promise<{ image: BuiltImage, repo: string }> {
  const image = await buildImage(path.join(work.path, name), { layers, seed: `trust-${name}`, tag: 'v1' })
  const repo = `trust/${name}`
  await pushImage(image, `${registry.host}/${repo}:v1`)
  return { image, repo }
}

async function honestPeer (name: string, scheduler: TestScheduler, extra: Partial<PeerOptions> = {}): Promise<TestPeer> {
  const peer = await startPeer({ registry: origin.url, scheduler: scheduler.address, name, ...extra, args: ['--cluster-secret', SECRET, ...(extra.args ?? [])] })
  closers.push(async () => { await peer.close() })
  return peer
}

describe('a hostile member of the cluster lies about piece tables', () => {
  let scheduler: TestScheduler

  before(async () => {
    scheduler = await startScheduler({ args: ['--cluster-secret', SECRET] })
    closers.push(async () => { await scheduler.close() })
  })

  interface World {
    image: BuiltImage
    repo: string
    layer: BuiltBlob
    real: Buffer
    peers: TestPeer[]
    hostile: HostileMember
    tally: Tally
    close: () => Promise<void>
  }

  /** A fresh image, `honest` fresh peers and a fresh hostile member, so no scenario's bars or caches reach the next. */
  async function world (name: string, o: { hostileSeed: boolean, honest: number }): Promise<World> {
    const started = Date.now()
    const [{ image, repo }, peers, hostile] = await Promise.all([
      publish(name, [6 * MIB + 4321]),
      Promise.all(Array.from({ length: o.honest }, async (_, i) => honestPeer(`${name}-honest-${i + 1}`, scheduler))),
      startHostileMember({ scheduler: scheduler.address, clusterSecret: SECRET, registry: origin.url, seed: o.hostileSeed, name: `${name}-hostile` })
    ])
    closers.push(async () => { await hostile.close() })
    const layer = image.layers[0] as BuiltBlob
    console.log(`# ${name}: set up in ${Date.now() - started} ms`)
    origin.reset()
    return {
      image,
      repo,
      layer,
      real: readBlob(image, layer.digest),
      peers,
      hostile,
      tally: new Tally(),
      close: async () => { await Promise.allSettled([hostile.close(), ...peers.map(async p => { await p.close() })]) }
    }
  }

  /**
   * Two honest peers pull while the liar is in the swarm: one the image with
   * full GETs (?ns=) while the other reads ranges (default registry), then the
   * other way round.
   */
  async function pulls (w: World): Promise<void> {
    const [p1, p2] = w.peers as [TestPeer, TestPeer]
    const ns = origin.host
    await Promise.all([
      pullImage(w.tally, p1, w.repo, w.image, ns),
      rangeReads(w.tally, p2, w.repo, w.image, w.layer, undefined)
    ])
    await Promise.all([
      pullImage(w.tally, p2, w.repo, w.image, undefined),
      rangeReads(w.tally, p1, w.repo, w.image, w.layer, ns)
    ])
  }

  function egress (w: World): number {
    return origin.bytesDown() / w.image.totalBytes
  }

  async function liarFigures (w: World): Promise<Record<string, unknown>> {
    const s = await w.hostile.status()
    return {
      appointed: s.fetches.length,
      piecesServedByLiar: Object.values(s.served).reduce((a, b) => a + b, 0),
      evictionsIgnored: s.evictions.length
    }
  }

  test('(a) the appointed first fetcher announces wrong piece digests and serves the true bytes', async (t) => {
    const w = await world('lie-a', { hostileSeed: true, honest: 2 })
    try {
      await w.hostile.lie({ kind: 'wrong-digests' })
      await pulls(w)
      const barred = await barredWithin(scheduler, w.hostile.peerId, 5_000)
      const liar = await liarFigures(w)
      assert.ok((liar.appointed as number) >= 1, `test setup: the scheduler appointed the hostile seed first fetcher (${JSON.stringify(liar)})`)
      const figures = { ...w.tally.figures(), ...liar, originEgress: +egress(w).toFixed(2), liarBarred: barred }
      verdict(t, 'lie (a)', figures, [
        [w.tally.wrongAccepted === 0, `${w.tally.wrongAccepted} wrong bytes accepted under 2xx`],
        [w.tally.ops.every(o => o.ok), `pulls that never succeeded: ${w.tally.ops.filter(o => !o.ok).map(o => `${o.peer} ${o.what}`).join(', ')}`],
        [barred, 'the liar is not barred'],
        [egress(w) <= EGRESS_BOUND, `origin egress ${egress(w).toFixed(2)}× the image`]
      ])
    } finally {
      await w.close()
    }
  })

  test('(b) the appointed first fetcher corrupts two pieces and announces their digests consistently', async (t) => {
    const w = await world('lie-b', { hostileSeed: true, honest: 2 })
    try {
      await w.hostile.lie({ kind: 'corrupt', pieces: [1, 4] })
      await pulls(w)
      const barred = await barredWithin(scheduler, w.hostile.peerId, 5_000)
      const liar = await liarFigures(w)
      assert.ok((liar.appointed as number) >= 1, `test setup: the scheduler appointed the hostile seed first fetcher (${JSON.stringify(liar)})`)
      const figures = { ...w.tally.figures(), ...liar, originEgress: +egress(w).toFixed(2), liarBarred: barred }
      verdict(t, 'lie (b)', figures, [
        [w.tally.wrongAccepted === 0, `${w.tally.wrongAccepted} wrong bytes accepted under 2xx`],
        [w.tally.ops.every(o => o.ok), `pulls that never succeeded: ${w.tally.ops.filter(o => !o.ok).map(o => `${o.peer} ${o.what}`).join(', ')}`],
        [barred, 'the liar is not barred'],
        [egress(w) <= EGRESS_BOUND, `origin egress ${egress(w).toFixed(2)}× the image`]
      ])
    } finally {
      await w.close()
    }
  })

  test('(c1) a false blob-mismatch against a certified table changes nothing', async (t) => {
    const w = await world('lie-c1', { hostileSeed: false, honest: 3 })
    try {
      const [p1, p2, p3] = w.peers as [TestPeer, TestPeer, TestPeer]
      const ids = [peerIdOf(p1), peerIdOf(p2)]
      // p1 fetches from the origin; p2 from p1, verifying the whole blob: the table is certified.
      assert.ok(await fullGet(w.tally, p1, w.repo, w.image, w.layer, origin.host), 'test setup: p1 pulled the layer')
      assert.ok(await fullGet(w.tally, p2, w.repo, w.image, w.layer, undefined), 'test setup: p2 pulled the layer')
      await waitFor(async () => {
        const holders = await completeHolders(scheduler, w.layer.digest)
        return ids.every(id => holders.includes(id))
      }, { timeoutMs: 10_000, what: 'the scheduler to list p1 and p2 as holders' })
      const beforeReport = origin.bytesDown()
      const answer = await w.hostile.report({ kind: 'blob-mismatch', digest: w.layer.digest })
      await delay(2_000)
      const holdersAfter = await completeHolders(scheduler, w.layer.digest)
      const authorBarred = await isBarred(scheduler, ids[0] as string)
      for (const [peer, ns] of [[p1, origin.host], [p2, undefined], [p3, origin.host]] as Array<[TestPeer, string | undefined]>) {
        await fullGet(w.tally, peer, w.repo, w.image, w.layer, ns)
        await rangeReads(w.tally, peer, w.repo, w.image, w.layer, ns)
      }
      const extra = origin.bytesDown() - beforeReport
      const reporterBarred = await barredWithin(scheduler, w.hostile.peerId, 3_000)
      const figures = { ...w.tally.figures(), schedulerAnswer: answer, holdersKept: ids.filter(id => holdersAfter.includes(id)).length, authorBarred, originBytesAfterReport: extra, layerBytes: w.layer.size, reporterBarred }
      verdict(t, 'lie (c1)', figures, [
        [ids.every(id => holdersAfter.includes(id)), `holders after the report: ${holdersAfter.length} (p1 and p2 were)`],
        [!authorBarred, 'the honest author was barred'],
        [extra <= 256 * 1024, `${extra} origin bytes after the report (the blob is ${w.layer.size})`],
        [w.tally.wrongAccepted === 0, `${w.tally.wrongAccepted} wrong bytes accepted under 2xx`],
        [w.tally.ops.every(o => o.ok), `pulls that never succeeded: ${w.tally.ops.filter(o => !o.ok).map(o => `${o.peer} ${o.what}`).join(', ')}`]
      ])
    } finally {
      await w.close()
    }
  })

  test('(c2) a false blob-mismatch against a provisional table: the re-fetched table matches and the reporter is barred', async (t) => {
    const w = await world('lie-c2', { hostileSeed: false, honest: 3 })
    try {
      const [p1, p2, p3] = w.peers as [TestPeer, TestPeer, TestPeer]
      // p1 is the only holder: its table is provisional when the liar reports it.
      assert.ok(await fullGet(w.tally, p1, w.repo, w.image, w.layer, origin.host), 'test setup: p1 pulled the layer')
      const answer = await w.hostile.report({ kind: 'blob-mismatch', digest: w.layer.digest })
      await delay(1_000)
      await fullGet(w.tally, p2, w.repo, w.image, w.layer, undefined)
      await fullGet(w.tally, p3, w.repo, w.image, w.layer, origin.host)
      await fullGet(w.tally, p1, w.repo, w.image, w.layer, origin.host)
      await rangeReads(w.tally, p2, w.repo, w.image, w.layer, undefined)
      await rangeReads(w.tally, p3, w.repo, w.image, w.layer, origin.host)
      const reporterBarred = await barredWithin(scheduler, w.hostile.peerId, 10_000)
      const ratio = origin.bytesDown() / w.layer.size
      const figures = { ...w.tally.figures(), schedulerAnswer: answer, originEgress: +ratio.toFixed(2), reporterBarred, authorBarred: await isBarred(scheduler, peerIdOf(p1)) }
      verdict(t, 'lie (c2)', figures, [
        [reporterBarred, 'the reporter whose blob-mismatch was disproved is not barred'],
        [w.tally.wrongAccepted === 0, `${w.tally.wrongAccepted} wrong bytes accepted under 2xx`],
        [w.tally.ops.every(o => o.ok), `pulls that never succeeded: ${w.tally.ops.filter(o => !o.ok).map(o => `${o.peer} ${o.what}`).join(', ')}`],
        [ratio <= EGRESS_BOUND, `origin egress ${ratio.toFixed(2)}× the layer`]
      ])
    } finally {
      await w.close()
    }
  })

  test('(d) one false bad-piece report does not bar an honest parent swarm-wide', async (t) => {
    const w = await world('lie-d', { hostileSeed: false, honest: 2 })
    try {
      const [p1, p2] = w.peers as [TestPeer, TestPeer]
      const parent = peerIdOf(p1)
      assert.ok(await fullGet(w.tally, p1, w.repo, w.image, w.layer, origin.host), 'test setup: p1 pulled the layer')
      await waitFor(async () => (await completeHolders(scheduler, w.layer.digest)).includes(parent), { timeoutMs: 10_000, what: 'the scheduler to list p1 as a holder' })
      const answer = await w.hostile.report({ kind: 'bad-piece', parent, digest: w.layer.digest, piece: 0 })
      await delay(500)
      const parentBarred = await isBarred(scheduler, parent)
      const beforePull = origin.bytesDown()
      await fullGet(w.tally, p2, w.repo, w.image, w.layer, undefined)
      await rangeReads(w.tally, p2, w.repo, w.image, w.layer, undefined)
      const extra = origin.bytesDown() - beforePull
      const fromPeers = (await p2.metrics()).get('damselfly_fetched_bytes_total', { source: 'peer' })
      const figures = { ...w.tally.figures(), schedulerAnswer: answer, parentBarred, originBytesForP2: extra, p2BytesFromPeers: fromPeers, layerBytes: w.layer.size }
      verdict(t, 'lie (d)', figures, [
        [!parentBarred, 'one report barred the honest parent swarm-wide'],
        [extra <= w.layer.size / 2, `p2 took ${extra} bytes from the origin for a ${w.layer.size}-byte layer its honest parent holds`],
        [w.tally.wrongAccepted === 0, `${w.tally.wrongAccepted} wrong bytes accepted under 2xx`],
        [w.tally.ops.every(o => o.ok), `pulls that never succeeded: ${w.tally.ops.filter(o => !o.ok).map(o => `${o.peer} ${o.what}`).join(', ')}`]
      ])
    } finally {
      await w.close()
    }
  })

  test('(e) a member pre-announces a table for a blob nobody holds yet (zeros, served)', async (t) => {
    const w = await world('lie-e', { hostileSeed: false, honest: 2 })
    try {
      const answer = await w.hostile.preannounce(w.layer.digest, w.layer.size, { registry: origin.url, repo: w.repo, kind: 'blob' })
      assert.deepEqual(answer, { ok: true }, 'test setup: the scheduler took the announcement')
      await pulls(w)
      const barred = await barredWithin(scheduler, w.hostile.peerId, 3_000)
      const liar = await liarFigures(w)
      const figures = { ...w.tally.figures(), ...liar, originEgress: +egress(w).toFixed(2), liarBarred: barred }
      verdict(t, 'lie (e)', figures, [
        [w.tally.wrongAccepted === 0, `${w.tally.wrongAccepted} wrong bytes accepted under 2xx`],
        [w.tally.ops.every(o => o.ok), `pulls that never succeeded: ${w.tally.ops.filter(o => !o.ok).map(o => `${o.peer} ${o.what}`).join(', ')}`],
        [egress(w) <= EGRESS_BOUND, `origin egress ${egress(w).toFixed(2)}× the image`]
      ])
    } finally {
      await w.close()
    }
  })
})

/* Poisoning through a registry nobody configured (attack 4) */

interface FakeRegistry {
  url: string
  host: string
  /** TCP connections accepted (a TLS hello counts too). */
  connections: () => number
  requests: () => string[]
  close: () => Promise<void>
}

/** Declares `digest` with its real size and serves zeros for it (Range honoured). */
async function startFakeRegistry (digest: string, size: number): Promise<FakeRegistry> {
  const seen: string[] = []
  let connections = 0
  const zeros = Buffer.alloc(MIB)
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    seen.push(`${req.method ?? ''} ${req.url ?? ''}`)
    const url = (req.url ?? '').split('?')[0] as string
    if (url === '/v2/' || url === '/v2') {
      res.writeHead(200, { 'content-type': 'application/json', 'docker-distribution-api-version': 'registry/2.0' }).end('{}')
      return
    }
    const m = /^\/v2\/.+\/blobs\/(sha256:[0-9a-f]{64})$/.exec(url)
    if (m === null || m[1] !== digest) {
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}')
      return
    }
    let start = 0
    let end = size - 1
    const r = /^bytes=(\d+)-(\d*)$/.exec(String(req.headers.range ?? ''))
    const headers: Record<string, string | number> = { 'content-type': 'application/octet-stream', 'docker-content-digest': digest, 'accept-ranges': 'bytes' }
    if (r !== null) {
      start = Number(r[1])
      end = r[2] === '' ? size - 1 : Math.min(size - 1, Number(r[2]))
      headers['content-range'] = `bytes ${start}-${end}/${size}`
    }
    headers['content-length'] = end - start + 1
    res.writeHead(r === null ? 200 : 206, headers)
    if (req.method === 'HEAD') {
      res.end()
      return
    }
    let left = end - start + 1
    const pump = (): void => {
      while (left > 0) {
        const n = Math.min(left, zeros.length)
        left -= n
        if (!res.write(zeros.subarray(0, n))) {
          res.once('drain', pump)
          return
        }
      }
      res.end()
    }
    pump()
  })
  server.on('connection', () => { connections++ })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  return {
    url: `http://127.0.0.1:${port}`,
    host: `127.0.0.1:${port}`,
    connections: () => connections,
    requests: () => [...seen],
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => { resolve() }))
    }
  }
}

describe('a caller names a registry nobody configured, serving zeros for a public layer', () => {
  let scheduler: TestScheduler
  let fake: FakeRegistry

  before(async () => {
    scheduler = await startScheduler({ args: ['--cluster-secret', SECRET] })
    closers.push(async () => { await scheduler.close() })
  })

  /**
   * Today the flag does not exist (the peer exits 2 on it), and every
   * registry is served as if it were configured; the attack is then run on a
   * peer without it, and the flag's absence is one more failed check.
   */
  async function peerAllowingUnlisted (name: string): Promise<{ peer: TestPeer, flagKnown: boolean }> {
    try {
      return { peer: await honestPeer(name, scheduler, { args: ['--allow-unlisted-registries'] }), flagKnown: true }
    } catch (err) {
      if (!String((err as Error).message).includes('allow-unlisted-registries')) throw err
      return { peer: await honestPeer(name, scheduler), flagKnown: false }
    }
  }

  test('nothing the fake registry sends reaches the cache or the swarm; without the opt-in it is refused before it is asked', async (t) => {
    const { image, repo } = await publish('poison', [5 * MIB + 999])
    const layer = image.layers[0] as BuiltBlob
    const real = readBlob(image, layer.digest)
    fake = await startFakeRegistry(layer.digest, layer.size)
    closers.push(async () => { await fake.close() })
    const seed = await honestPeer('poison-seed', scheduler, { seed: true })
    const [{ peer: open, flagKnown }, plain] = await Promise.all([peerAllowingUnlisted('poison-open'), honestPeer('poison-plain', scheduler)])
    const seedId = peerIdOf(seed)
    origin.reset()

    // The attack: the open peer is asked for the public layer, naming the fake registry.
    const viaFake = new Tally()
    const fakeHeader = { 'x-dragonfly-registry': fake.url }
    const zeros = Buffer.alloc(layer.size)
    const attackFull = await checkedGet(viaFake, { peer: open, path: `/v2/${repo}/blobs/${layer.digest}`, real, what: 'full layer via the fake', headers: fakeHeader })
    for (const range of rangesOf(layer.size)) {
      await checkedGet(viaFake, { peer: open, path: `/v2/${repo}/blobs/${layer.digest}`, real: zeros, what: `range ${range[0]}-${range[1]} via the fake`, range, headers: fakeHeader })
    }
    const fakeContacts = fake.connections()
    await delay(1_000)

    // Honest pulls of the real image on every peer, then again after the seed restarts.
    const tally = new Tally()
    const ns = origin.host
    await Promise.all([
      (async () => {
        await pullImage(tally, plain, repo, image, ns)
        await rangeReads(tally, plain, repo, image, layer, undefined)
      })(),
      (async () => {
        await rangeReads(tally, open, repo, image, layer, ns)
        await fullGet(tally, open, repo, image, layer, undefined)
      })()
    ])
    await seed.stop()
    await seed.start()
    await waitFor(async () => (await hosts(scheduler)).some(h => h.peerId === seedId), { timeoutMs: 15_000, what: 'the restarted seed to register again' })
    const late = await honestPeer('poison-late', scheduler)
    await Promise.all([
      (async () => {
        await rangeReads(tally, seed, repo, image, layer, ns)
        await fullGet(tally, seed, repo, image, layer, ns)
      })(),
      (async () => {
        await rangeReads(tally, late, repo, image, layer, undefined)
        await pullImage(tally, late, repo, image, undefined)
      })()
    ])
    const egress = origin.bytesDown() / image.totalBytes

    // Without the opt-in, the fake registry is refused before it sees a connection.
    const contactsBefore = fake.connections()
    const refusals: Array<{ how: string, status: number | 'error', code?: string }> = []
    for (const [how, suffix, headers] of [
      ['X-Dragonfly-Registry', '', fakeHeader],
      ['?ns=', `?ns=${encodeURIComponent(fake.host)}`, {}]
    ] as Array<[string, string, Record<string, string>]>) {
      try {
        const res = await request(`${plain.url}/v2/${repo}/blobs/${layer.digest}${suffix}`, { headers, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) })
        const body = await res.body.text().catch(() => '')
        let code: string | undefined
        try { code = (JSON.parse(body) as { errors?: Array<{ code?: string }> }).errors?.[0]?.code } catch {}
        refusals.push({ how, status: res.statusCode, ...(code === undefined ? {} : { code }) })
      } catch (err) {
        refusals.push({ how, status: 'error', code: (err as Error).message.slice(0, 60) })
      }
    }
    const contactsWithoutOptIn = fake.connections() - contactsBefore

    const figures = {
      flagKnown,
      attack: { full: { status: attackFull.status, complete: attackFull.complete, received: attackFull.received }, statuses: viaFake.figures().statuses, fakeContacts },
      ...tally.figures(),
      originEgress: +egress.toFixed(2),
      refusals,
      contactsWithoutOptIn
    }
    verdict(t, 'poisoning (attack 4)', figures, [
      [!(attackFull.complete && attackFull.status === 200), 'a full GET through the fake registry completed with 200 although its bytes do not hash to the digest'],
      [tally.wrongAccepted === 0, `${tally.wrongAccepted} wrong bytes accepted under 2xx by honest pulls of the real image`],
      [tally.ops.every(o => o.ok), `honest pulls that never succeeded: ${tally.ops.filter(o => !o.ok).map(o => `${o.peer} ${o.what}`).join(', ')}`],
      [refusals.every(r => r.status === 403 && r.code === 'DENIED'), `without the opt-in: ${JSON.stringify(refusals)}`],
      [contactsWithoutOptIn === 0, `without the opt-in the fake registry saw ${contactsWithoutOptIn} connections`],
      [flagKnown, '--allow-unlisted-registries is not a known flag']
    ])
  })
})
