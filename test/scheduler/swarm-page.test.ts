import assert from 'node:assert/strict'
import { test } from 'node:test'
import Fastify from 'fastify'
import { Value } from '@sinclair/typebox/value'
import { Load, type HostInfo } from '../../src/protocol/messages.ts'
import { swarmPage, swarmSummary } from '../../scheduler/api/swarm-page.ts'
import { createMemoryState } from '../../scheduler/state/index.ts'

function info (peerId: string, seed = false): HostInfo {
  return { peerId, addrs: [], hostname: `host-${peerId}`, seed, location: '', idc: '', uploadCapacity: 8, version: 'test' }
}

const bytes = (n: number): NonNullable<Load['bytes']> => ({ served: { local: n, peer: 2 * n, origin: 3 * n }, fetched: { peer: 4 * n, origin: 5 * n }, uploaded: 6 * n })

test('a load with or without byte counts is valid; negative or fractional counts are not', () => {
  assert.ok(Value.Check(Load, { activeUploads: 0 }))
  assert.ok(Value.Check(Load, { activeUploads: 1, bytes: bytes(10) }))
  assert.ok(!Value.Check(Load, { activeUploads: 1, bytes: { ...bytes(10), uploaded: -1 } }))
  assert.ok(!Value.Check(Load, { activeUploads: 1, bytes: { ...bytes(10), uploaded: 1.5 } }))
  assert.ok(!Value.Check(Load, { activeUploads: 1, bytes: { served: { local: 1 } } }))
})

test('the summary adds up the hosts that report counts and says how many do', () => {
  const state = createMemoryState()
  state.upsertHost(info('a', true)).host.bytes = bytes(1)
  state.upsertHost(info('b')).host.bytes = bytes(100)
  state.upsertHost(info('old'))
  const summary = swarmSummary(state, 0)
  assert.deepEqual(summary, { hosts: 3, seeds: 1, tasks: 0, reporting: 2, bytes: bytes(101), at: new Date(0).toISOString() })
})

test('the page and its assets carry a self-only content security policy', async (t) => {
  const app = Fastify()
  t.after(async () => { await app.close() })
  await app.register(swarmPage, { state: createMemoryState() })
  for (const [url, type] of [['/', 'text/html'], ['/ui/app.js', 'text/javascript'], ['/ui/style.css', 'text/css']] as const) {
    const res = await app.inject(url)
    assert.equal(res.statusCode, 200, url)
    assert.ok(String(res.headers['content-type']).startsWith(type), url)
    assert.match(String(res.headers['content-security-policy']), /default-src 'none'.*script-src 'self'/, url)
    assert.equal(res.headers['x-content-type-options'], 'nosniff')
  }
  const swarm = await app.inject('/api/v1/swarm')
  assert.equal(swarm.json().hosts, 0)
})
