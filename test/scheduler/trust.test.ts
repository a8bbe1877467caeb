import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { test } from 'node:test'
import { silentLogger } from '../../src/logger.ts'
import { MIB } from '../../src/pieces.ts'
import type { HostInfo } from '../../src/protocol/messages.ts'
import { createTrustKeeper } from '../../scheduler/swarm/trust.ts'
import { createScheduling } from '../../scheduler/scheduling/index.ts'
import { createMemoryState, isCertified, type HostRecord, type SwarmState, type TaskRecord } from '../../scheduler/state/index.ts'

const DIGEST = `sha256:${'ab'.repeat(32)}`
const SIZE = 4 * MIB
const ORIGIN = { registry: 'http://registry.test:5000', repo: 'team/app', kind: 'blob' as const }
const hex = (s: string): string => createHash('sha256').update(s).digest('hex')
/** The true SHA-256 of piece i, and a lie about it. */
const TRUE = [0, 1, 2, 3].map(i => hex(`true ${i}`))
const LIE = [0, 1, 2, 3].map(i => hex(`lie ${i}`))

function host (state: SwarmState, name: string, seed = false): HostRecord {
  const info: HostInfo = { peerId: name, addrs: [], hostname: name, seed, location: '', idc: '', uploadCapacity: 8, version: 'test' }
  return state.upsertHost(info).host
}

function world (now: () => number = Date.now): { state: SwarmState, task: TaskRecord, plan: ReturnType<typeof createScheduling>['plan'] } {
  const state = createMemoryState({ now })
  const task = state.ensureTask(DIGEST, SIZE, { origin: ORIGIN }) as TaskRecord
  const { plan } = createScheduling(state, { random: () => 0.5, now })
  return { state, task, plan }
}

test('a table entry is taken only from the host sent to the origin for that piece', () => {
  const { state, task, plan } = world()
  const a = host(state, 'a')
  const stranger = host(state, 'stranger')
  // Nobody asked: a claim about a piece nobody was sent for is not an entry.
  state.applyUpdate(stranger, { digest: DIGEST, size: SIZE, add: [[0, LIE[0] as string]] })
  assert.equal(task.known.has(0), false, 'an unasked-for claim writes nothing')
  assert.equal(state.holds(task, stranger.slot, 0), false, 'and is not counted as holding it')
  assert.deepEqual(plan(task, a, 0, 3, new Set()).assigned, [0, 1, 2, 3], 'the first requester of a cold task is its first fetcher')
  state.applyUpdate(a, { digest: DIGEST, size: SIZE, add: [[0, TRUE[0] as string], [1, TRUE[1] as string]], fromOrigin: [0, 1] })
  assert.equal(task.known.size, 2)
  assert.equal(task.author[0], a.slot + 1)
  assert.equal(task.confirmed.size, 0, 'its author alone does not confirm an entry')
})

test('a range reader confirms what only the author vouches for, from the origin; others then wait for it', () => {
  const { state, task, plan } = world()
  const a = host(state, 'a')
  const b = host(state, 'b')
  const c = host(state, 'c')
  plan(task, a, 0, 3, new Set())
  state.applyUpdate(a, { digest: DIGEST, size: SIZE, add: TRUE.map((h, i): [number, string] => [i, h]), fromOrigin: [0, 1, 2, 3] })
  // A whole-blob reader may take the author's pieces: the whole digest is checked before its read completes.
  const whole = plan(task, b, 0, 3, new Set(), { whole: true })
  assert.deepEqual(whole.assigned, [])
  assert.deepEqual(whole.provisional, [0, 1, 2, 3])
  assert.equal(whole.parents[0]?.peerId, 'a')
  // A range reader may not: it is sent to the origin to confirm the pieces it wants.
  const range = plan(task, b, 1, 2, new Set(), { whole: false })
  assert.deepEqual(range.assigned, [1, 2])
  // A second range reader waits for that confirmer rather than asking the origin a third time.
  const third = plan(task, c, 1, 2, new Set(), { whole: false })
  assert.deepEqual(third.assigned, [])
  assert.equal(third.parents.some(p => p.peerId === 'b' && p.confirming !== undefined), true, 'c is told b is confirming')
  // b lands them from the origin, equal to the table: confirmed.
  state.applyUpdate(b, { digest: DIGEST, size: SIZE, add: [[1, TRUE[1] as string], [2, TRUE[2] as string]], fromOrigin: [1, 2] })
  assert.deepEqual([...task.confirmed], [1, 2])
  assert.deepEqual(plan(task, c, 1, 2, new Set(), { whole: false }).provisional, [])
})

test('a whole blob verified by a host that did not write its table certifies it', () => {
  const { state, task, plan } = world()
  const a = host(state, 'a')
  const b = host(state, 'b')
  plan(task, a, 0, 3, new Set())
  state.applyUpdate(a, { digest: DIGEST, size: SIZE, add: TRUE.map((h, i): [number, string] => [i, h]), verified: true })
  assert.equal(isCertified(task), false, 'the author verifying its own table certifies nothing')
  const r1 = state.applyUpdate(b, { digest: DIGEST, size: SIZE, add: TRUE.map((h, i): [number, string] => [i, h]) })
  assert.equal(r1.certified, false)
  const r2 = state.applyUpdate(b, { digest: DIGEST, size: SIZE, verified: true })
  assert.equal(r2.certified, true)
  assert.equal(isCertified(task), true)
})

test('origin bytes that disagree with an entry are a conflict; a barred or disputing host writes nothing', () => {
  const { state, task, plan } = world()
  const liar = host(state, 'liar', true)
  const b = host(state, 'b')
  plan(task, b, 0, 3, new Set())
  // The seed took the task; it lies about piece 2.
  state.applyUpdate(liar, { digest: DIGEST, size: SIZE, add: [[0, TRUE[0] as string], [1, TRUE[1] as string], [2, LIE[2] as string], [3, TRUE[3] as string]] })
  assert.equal(task.known.size, 4)
  plan(task, b, 2, 2, new Set(), { whole: false })
  const result = state.applyUpdate(b, { digest: DIGEST, size: SIZE, add: [[2, TRUE[2] as string]], fromOrigin: [2] })
  assert.deepEqual(result.conflicts, [2])
  const other = host(state, 'other')
  const before = task.known.size
  state.applyUpdate(other, { digest: DIGEST, size: SIZE, add: TRUE.map((h, i): [number, string] => [i, h]), verified: true }, false)
  assert.equal(task.known.size, before, 'a host that may not vouch writes no entry')
  assert.equal(isCertified(task), false, 'and certifies nothing')
})

test('a disputed table is reset; an independent fetch convicts the lying author and clears the reporter', () => {
  let t = 1_000_000
  const { state, task, plan } = world(() => t)
  const trust = createTrustKeeper({ state, logger: silentLogger() }, { now: () => t })
  const liar = host(state, 'liar', true)
  const reporter = host(state, 'reporter')
  const third = host(state, 'third')
  plan(task, reporter, 0, 3, new Set())
  state.applyUpdate(liar, { digest: DIGEST, size: SIZE, add: [[0, TRUE[0] as string], [1, LIE[1] as string]] })
  const outcome = trust.mismatch(reporter, { digest: DIGEST, piece: 1, sha256: TRUE[1] })
  assert.equal(outcome.action, 'reset')
  assert.equal(task.known.size, 0, 'the table starts afresh')
  assert.equal(trust.isBarred(liar), true, 'its author is barred at once')
  // The reporter's own fetch settles nothing: it is a party.
  plan(task, reporter, 0, 3, new Set())
  const own = state.applyUpdate(reporter, { digest: DIGEST, size: SIZE, add: [[1, TRUE[1] as string]], fromOrigin: [1] }).observed
  assert.deepEqual(trust.observed(task, reporter, own), [])
  // A host outside the dispute, sent to the origin for the piece, does.
  plan(task, third, 1, 1, new Set(), { whole: false })
  const observed = state.applyUpdate(third, { digest: DIGEST, size: SIZE, add: [[1, TRUE[1] as string]], fromOrigin: [1] }).observed
  const verdicts = trust.observed(task, third, observed)
  assert.deepEqual(verdicts.map(v => [v.lied, v.liar]), [['author', 'liar']])
  assert.equal(trust.isBarred(liar), true)
  t += 11 * 60_000
  assert.equal(trust.isBarred(liar), false, 'bars lapse')
})

test('a false report: when independent fetches match every entry, the reporter is barred and the author cleared', () => {
  const { state, task, plan } = world()
  const trust = createTrustKeeper({ state, logger: silentLogger() })
  const author = host(state, 'author')
  const liar = host(state, 'liar')
  const third = host(state, 'third')
  plan(task, author, 0, 1, new Set())
  state.applyUpdate(author, { digest: DIGEST, size: SIZE, add: [[0, TRUE[0] as string], [1, TRUE[1] as string]], fromOrigin: [0, 1] })
  assert.equal(trust.mismatch(liar, { digest: DIGEST }).action, 'reset')
  assert.equal(trust.isBarred(author), true)
  plan(task, third, 0, 3, new Set())
  const observed = state.applyUpdate(third, { digest: DIGEST, size: SIZE, add: TRUE.map((h, i): [number, string] => [i, h]), fromOrigin: [0, 1, 2, 3] }).observed
  assert.deepEqual(trust.observed(task, third, observed).map(v => [v.lied, v.liar]), [['reporter', 'liar']])
  assert.equal(trust.isBarred(liar), true)
  assert.equal(trust.isBarred(author), false)
})

test('reports that cannot be right are ignored: certified tables, confirmed entries, entries since replaced, other tables', () => {
  const { state, task, plan } = world()
  const trust = createTrustKeeper({ state, logger: silentLogger() })
  const a = host(state, 'a')
  const b = host(state, 'b')
  const liar = host(state, 'liar')
  plan(task, a, 0, 3, new Set())
  state.applyUpdate(a, { digest: DIGEST, size: SIZE, add: TRUE.map((h, i): [number, string] => [i, h]), fromOrigin: [0, 1, 2, 3] })
  plan(task, b, 0, 0, new Set(), { whole: false })
  state.applyUpdate(b, { digest: DIGEST, size: SIZE, add: [[0, TRUE[0] as string]], fromOrigin: [0] })
  assert.deepEqual(trust.mismatch(liar, { digest: DIGEST, piece: 0, sha256: LIE[0] }), { action: 'ignored', why: 'piece 0 is confirmed' })
  assert.equal(trust.mismatch(liar, { digest: DIGEST, piece: 1, sha256: TRUE[1] }).action, 'ignored', 'the entry agrees with the origin')
  assert.equal(trust.mismatch(liar, { digest: DIGEST, table: 'ff'.repeat(32) }).action, 'ignored', 'a report about another table')
  state.applyUpdate(b, { digest: DIGEST, size: SIZE, add: TRUE.map((h, i): [number, string] => [i, h]) })
  state.applyUpdate(b, { digest: DIGEST, size: SIZE, verified: true })
  assert.deepEqual(trust.mismatch(liar, { digest: DIGEST }), { action: 'ignored', why: 'the table is certified' })
  assert.equal(task.known.size, 4)
  assert.equal(trust.isBarred(a), false)
})

test('one bad-piece report bars nobody swarm-wide; two reporters do', () => {
  const state = createMemoryState()
  const trust = createTrustKeeper({ state, logger: silentLogger() })
  const parent = host(state, 'parent')
  const [c1, c2] = [host(state, 'c1'), host(state, 'c2')]
  assert.equal(trust.badPiece(c1, parent), false)
  assert.equal(trust.badPiece(c1, parent), false, 'the same reporter twice is still one voice')
  assert.equal(trust.isBarred(parent), false)
  assert.equal(trust.badPiece(c2, parent), true)
  assert.equal(trust.isBarred(parent), true)
})

test('facts are handed out only when two hosts say the same', () => {
  const state = createMemoryState()
  const fact = { kind: 'public' as const, registry: 'http://registry.test:5000', repo: 'team/private', digest: DIGEST, size: 10 }
  state.recordFact(fact, 'liar')
  state.recordFact(fact, 'liar')
  assert.equal(state.publicFact(fact.registry, fact.repo, fact.digest), undefined, 'one member saying it twice is not enough')
  state.recordFact({ ...fact, size: 11 }, 'other')
  assert.equal(state.publicFact(fact.registry, fact.repo, fact.digest), undefined, 'two members saying different things is not enough')
  state.recordFact(fact, 'honest')
  assert.deepEqual(state.publicFact(fact.registry, fact.repo, fact.digest), fact)
  const tag = { kind: 'tag' as const, registry: fact.registry, repo: 'team/app', tag: 'v1', digest: DIGEST, size: 5, seenAt: 1 }
  state.recordFact({ ...tag, digest: `sha256:${'cd'.repeat(32)}`, seenAt: 99 }, 'liar')
  state.recordFact(tag, 'a')
  state.recordFact({ ...tag, seenAt: 2 }, 'b')
  assert.equal(state.tagFact(tag.registry, tag.repo, tag.tag)?.digest, DIGEST, 'the newer claim of one member loses to the one two agree on')
})
