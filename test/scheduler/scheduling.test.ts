import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { test } from 'node:test'
import { MIB } from '../../src/pieces.ts'
import type { HostInfo } from '../../src/protocol/messages.ts'
import { createScheduling } from '../../scheduler/scheduling/index.ts'
import { createMemoryState, type HostRecord, type SwarmState, type TaskRecord } from '../../scheduler/state/index.ts'

/**
 * Rules of parent selection the fleet simulation (bench/sim/fleet.ts) led to,
 * each with what went wrong at scale without it.
 */

const DIGEST = `sha256:${'cd'.repeat(32)}`
const PIECES = 8
const SIZE = PIECES * MIB
const ORIGIN = { registry: 'http://registry.test:5000', repo: 'team/app', kind: 'blob' as const }
const sha = (i: number): string => createHash('sha256').update(`piece ${i}`).digest('hex')

function host (state: SwarmState, name: string, seed = false): HostRecord {
  const info: HostInfo = { peerId: name, addrs: [], hostname: name, seed, location: '', idc: '', uploadCapacity: 32, version: 'test' }
  return state.upsertHost(info).host
}

/** `h` holds pieces `pieces`, each taken from the origin by whoever was sent for it (so the table has them). */
function holds (state: SwarmState, h: HostRecord, pieces: number[]): void {
  state.applyUpdate(h, { digest: DIGEST, size: SIZE, add: pieces.map((i): [number, string] => [i, sha(i)]), fromOrigin: pieces })
}

function world (): { state: SwarmState, task: TaskRecord, scheduling: ReturnType<typeof createScheduling> } {
  const state = createMemoryState()
  const task = state.ensureTask(DIGEST, SIZE, { origin: ORIGIN }) as TaskRecord
  return { state, task, scheduling: createScheduling(state, { random: () => 0.5 }) }
}

test('plans go round the partial holders: the hosts that announced first are not every child\'s parents', () => {
  const { state, task, scheduling } = world()
  // The seed fetched every piece; 300 peers each hold piece 0 (they are reading the blob in step).
  const seed = host(state, 'seed', true)
  scheduling.plan(task, seed, 0, PIECES - 1, new Set())
  holds(state, seed, Array.from({ length: PIECES }, (_, i) => i))
  const readers = Array.from({ length: 300 }, (_, k) => host(state, `peer-${String(k).padStart(3, '0')}`))
  for (const r of readers) holds(state, r, [0])
  // Children asking one after the other, with the default scan of 256 partial holders and 64 candidates.
  const children = Array.from({ length: 20 }, (_, k) => host(state, `child-${k}`))
  const seen = new Set<string>()
  for (const c of children) {
    for (const p of scheduling.propose(task, c, 0, PIECES - 1, new Set()).parents) if (p.peerId.startsWith('peer-')) seen.add(p.peerId)
  }
  // Always scanning from the first entry, every plan's candidates were the first 64 announcers: the same few.
  assert.ok(seen.size > 64, `plans spread over ${seen.size} partial holders, not only the first 64 to announce`)
  assert.ok([...seen].some(p => p >= 'peer-100'), 'hosts that announced later are offered too')
})

test('peers holding the piece asked for come before the seed and before peers that hold only later pieces', () => {
  const { state, task, scheduling } = world()
  const seed = host(state, 'seed', true)
  scheduling.plan(task, seed, 0, PIECES - 1, new Set())
  holds(state, seed, Array.from({ length: PIECES }, (_, i) => i))
  // Twelve peers hold piece 5 (the one the child needs now); twelve more hold only piece 6.
  const now = Array.from({ length: 12 }, (_, k) => host(state, `now-${k}`))
  const later = Array.from({ length: 12 }, (_, k) => host(state, `later-${k}`))
  for (const h of now) holds(state, h, [5])
  for (const h of later) holds(state, h, [6])
  const child = host(state, 'child')
  const { parents } = scheduling.propose(task, child, 5, PIECES - 1, new Set())
  const first = parents.slice(0, 8).map(p => p.peerId)
  // Without the rule the seed (in progress and a seed) led every plan and the rest came by score alone.
  assert.ok(first.every(p => p.startsWith('now-')), `the first parents hold piece 5: ${first.join(', ')}`)
  assert.ok(parents.some(p => p.peerId === 'seed' || p.peerId.startsWith('later-')), 'the others are still offered for the pieces after it')
})
