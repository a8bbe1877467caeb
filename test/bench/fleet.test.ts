import assert from 'node:assert/strict'
import { test } from 'node:test'
import { FLEET_DEFAULTS, PEER_DEFAULTS, simulateFleet, type PeerModel } from '../../bench/sim/fleet.ts'

const MIB = 1024 * 1024
const small = (peer: Partial<PeerModel> = {}): ReturnType<typeof simulateFleet> =>
  simulateFleet({ ...FLEET_DEFAULTS, nodes: 100, blobBytes: 128 * MIB, horizon: 10, peer: { ...PEER_DEFAULTS, ...peer } })

test('a simulated crowd of 100 pulls 128 MiB near the lower bound, and what took it there is what the peers do', () => {
  const now = small()
  const ratio = (ms: number): number => ms / now.tStarMs
  assert.equal(now.unfinished, 0)
  assert.ok(ratio(now.p50) <= 2, `p50 ${ratio(now.p50).toFixed(2)}× T*`)
  assert.ok(ratio(now.slowest) <= 2.2, `slowest ${ratio(now.slowest).toFixed(2)}× T*`)
  assert.ok(now.originRatio <= 1.05, `origin ${now.originRatio}× the blob`)
  // The same crowd with the upload rules of before: 32 slots and a queue of 128 behind them, no hints in busy
  // answers, a seed sending a piece again to whoever asks once a send is over.
  const before = small({ uploadConcurrency: 32, uploadQueue: 128, hints: 0, resendMs: 0 })
  assert.ok(before.p50 / before.tStarMs >= 2.5, `before: p50 ${(before.p50 / before.tStarMs).toFixed(2)}× T*`)
})

test('the simulation is the same for the same seed', () => {
  const a = small()
  const b = small()
  assert.deepEqual(a.times, b.times)
  assert.deepEqual(a.counts, b.counts)
})

test('behind slow links a parent sends as many pieces at once as its uplink can finish in a quarter second, and the swarm keeps pace', () => {
  // The emulated cluster's links (bench/scenarios/cluster.ts): 2 MiB/s a node, a seed behind 1 MiB/s, 12 MiB.
  const slow = (peer: Partial<PeerModel>): ReturnType<typeof simulateFleet> => simulateFleet({
    ...FLEET_DEFAULTS, nodes: 32, blobBytes: 12 * MIB, nodeUp: 2 * MIB, nodeDown: 2 * MIB, seedUp: 1 * MIB, seedDown: 16 * MIB, originUp: 100 * MIB, latencyMs: 2, horizon: 8, peer: { ...PEER_DEFAULTS, ...peer }
  })
  const paced = slow({})
  const unpaced = slow({ uploadMin: 0 })
  const p50 = (r: ReturnType<typeof simulateFleet>): number => r.p50 / r.tStarMs
  assert.equal(paced.unfinished, 0)
  assert.ok(p50(paced) <= 2, `paced: p50 ${p50(paced).toFixed(2)}× T*`)
  assert.ok(p50(unpaced) >= 2.4, `every slot at once: p50 ${p50(unpaced).toFixed(2)}× T*`)
  assert.ok(paced.originRatio <= 1.05, `origin ${paced.originRatio}× the blob`)
})

test('behind a slow origin a large blob still comes from the swarm: children wait for a first fetcher that is still landing pieces', () => {
  // A seed taking 48 MiB from an origin at 1 MiB/s lands its last pieces 48 s in, long past a child's 20 s of
  // patience with parents that have not got a piece yet.
  const run = (peer: Partial<PeerModel>): ReturnType<typeof simulateFleet> => simulateFleet({
    ...FLEET_DEFAULTS, nodes: 8, blobBytes: 48 * MIB, nodeUp: 2 * MIB, nodeDown: 2 * MIB, seedUp: 1 * MIB, seedDown: 16 * MIB, originUp: 1 * MIB, latencyMs: 2, horizon: 8, peer: { ...PEER_DEFAULTS, ...peer }
  })
  // Patience counted from the piece's first look alone, as it was when this rule came in.
  const waiting = run({ patienceFromProgress: false })
  const leaving = run({ waitProgressing: false, patienceFromProgress: false })
  assert.equal(waiting.unfinished, 0)
  assert.equal(waiting.counts.fallbacks, 0, 'no child gave up on the swarm for the origin')
  assert.ok(waiting.originRatio <= 1.6, `waiting: origin ${waiting.originRatio.toFixed(2)}× the blob`)
  assert.ok(waiting.slowest / waiting.tStarMs <= 1.7, `waiting: slowest ${(waiting.slowest / waiting.tStarMs).toFixed(2)}× T*`)
  // Leaving it for the origin once patience ran out: the children read the origin beside the seed.
  assert.ok((leaving.counts.fallbacks ?? 0) > 0 && leaving.originRatio >= 2, `leaving: ${leaving.counts.fallbacks} fallbacks, origin ${leaving.originRatio.toFixed(2)}× the blob`)
})

test('a child keeps asking busy parents while the swarm keeps sending it pieces of the blob, instead of reading the origin beside the seed', () => {
  // Sixteen children of a seed that reads 48 MiB from a 1 MiB/s origin: once the seed holds a piece it is busy
  // with others, and a child counting 20 s from its first look passed it over and was sent to the origin.
  const run = (peer: Partial<PeerModel>): ReturnType<typeof simulateFleet> => simulateFleet({
    ...FLEET_DEFAULTS, nodes: 16, blobBytes: 48 * MIB, nodeUp: 2 * MIB, nodeDown: 2 * MIB, seedUp: 1 * MIB, seedDown: 16 * MIB, originUp: 1 * MIB, latencyMs: 2, horizon: 8, peer: { ...PEER_DEFAULTS, ...peer }
  })
  const fromProgress = run({})
  const fromFirstLook = run({ patienceFromProgress: false })
  assert.equal(fromProgress.unfinished, 0)
  assert.ok(fromProgress.originRatio <= 1.05, `counting from the last piece: origin ${fromProgress.originRatio.toFixed(2)}× the blob`)
  assert.ok(fromProgress.slowest / fromProgress.tStarMs <= 1.3, `counting from the last piece: slowest ${(fromProgress.slowest / fromProgress.tStarMs).toFixed(2)}× T*`)
  assert.ok(fromFirstLook.originRatio >= 1.5, `counting from the first look: origin ${fromFirstLook.originRatio.toFixed(2)}× the blob`)
})
