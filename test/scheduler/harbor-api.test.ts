import assert from 'node:assert/strict'
import { describe, test } from 'node:test'
import type { FastifyInstance } from 'fastify'
import { silentLogger } from '../../src/logger.ts'
import { createMetricsRegistry } from '../../src/metrics.ts'
import type { ControlCommand, ControlResponse } from '../../src/protocol/messages.ts'
import { buildSchedulerApi } from '../../scheduler/api/app.ts'
import { parseManifestUrl } from '../../scheduler/api/harbor.ts'
import { createPreheatJobs } from '../../scheduler/preheat/index.ts'
import { createMemoryState } from '../../scheduler/state/index.ts'

const TOKEN = 'scheduler-api-token-0123456789'
const PULL_TOKEN = 'Bearer eyJharbor.pull.token-not-to-be-seen'
const LAYER = `sha256:${'a'.repeat(64)}`
const CONFIG = `sha256:${'b'.repeat(64)}`

interface Setup {
  app: FastifyInstance
  commands: ControlCommand[]
  /** Resolves the seed's answer to the pending control command. */
  answer: (res: ControlResponse) => void
}

/** The scheduler API over real preheat jobs and a memory swarm with one seed; the seed's answers come from the test. */
async function setup (t: { after: (fn: () => Promise<void>) => void }, token = ''): Promise<Setup> {
  const state = createMemoryState()
  state.upsertHost({ peerId: 'seed-1', addrs: ['/ip4/10.0.0.7/tcp/4000'], hostname: 'seed-host', seed: true, location: '', idc: '', uploadCapacity: 8, version: 'test' })
  const commands: ControlCommand[] = []
  const waiting: Array<(res: ControlResponse) => void> = []
  const jobs = createPreheatJobs({
    logger: silentLogger(),
    state,
    record: async (job) => state.putJob(job),
    replica: 'test',
    control: async (_peer, command) => {
      commands.push(command)
      return new Promise<ControlResponse>(resolve => { waiting.push(resolve) })
    }
  })
  const app = buildSchedulerApi({ logger: silentLogger(), state, jobs, metrics: createMetricsRegistry(), ready: () => true, apiToken: token })
  t.after(async () => { await app.close() })
  await app.ready()
  return { app, commands, answer: (res) => { waiting.shift()?.(res) } }
}

/** The body Harbor's open-API driver posts (dragonfly.go, dragonflyCreateJobRequest, Go's encoding of empty fields included). */
function harborBody (url: string, headers: Record<string, string> | null = { Authorization: PULL_TOKEN }): Record<string, unknown> {
  return {
    type: 'preheat',
    args: { type: 'image', url, tag: '', filtered_query_params: '', headers, scope: 'single_peer', concurrent_count: 0, timeout: 0 },
    scheduler_cluster_ids: null
  }
}

const HARBOR_HEADERS = { 'content-type': 'application/json', accept: 'application/json' }

describe('Harbor preheat on the scheduler API', () => {
  test('a job from Harbor runs on the seed with Harbor\'s header as given, and reads back in the open API\'s shape', async (t) => {
    const { app, commands, answer } = await setup(t)
    const created = await app.inject({ method: 'POST', url: '/oapi/v1/jobs', headers: HARBOR_HEADERS, payload: harborBody('https://harbor.example/v2/library/nginx/manifests/1.27') })
    assert.equal(created.statusCode, 200, created.body)
    const job = created.json<{ id: unknown, state: string, created_at: string, task_id: string }>()
    assert.equal(typeof job.id, 'number', 'Harbor unmarshals id into an int')
    assert.equal(job.state, 'PENDING')
    assert.ok(!Number.isNaN(Date.parse(job.created_at)))
    assert.equal(created.body.includes('eyJharbor'), false, 'the pull token is not in the answer')

    await setImmediate()
    const command = commands[0]
    assert.ok(command?.type === 'preheat')
    assert.equal(command.registry, 'https://harbor.example')
    assert.equal(command.repo, 'library/nginx')
    assert.equal(command.reference, '1.27')
    assert.equal(command.authorization, PULL_TOKEN)
    assert.equal(command.credentials, undefined)

    const running = await app.inject({ url: `/oapi/v1/jobs/${job.id as number}` })
    assert.equal(running.json<{ state: string }>().state, 'PENDING', 'running is still PENDING: Harbor fails any state it does not know')

    answer({ ok: true, results: [{ digest: CONFIG, size: 10, status: 'SUCCESS' }, { digest: LAYER, size: 20, status: 'FAILURE', error: 'origin went away' }] })
    await setImmediate()
    const done = await app.inject({ url: `/oapi/v1/jobs/${job.id as number}` })
    const body = done.json<{ state: string, result: { job_states: Array<{ error: string, results: Array<{ success_tasks: Array<Record<string, string>>, failure_tasks: Array<Record<string, string>> }> }> } }>()
    assert.equal(body.state, 'FAILURE')
    assert.equal(body.result.job_states[0]?.error, '1 of 2 blobs failed')
    const [results] = body.result.job_states[0]?.results ?? []
    assert.deepEqual(results?.success_tasks, [{ url: `https://harbor.example/v2/library/nginx/blobs/${CONFIG}`, hostname: 'seed-host', ip: '10.0.0.7' }])
    assert.deepEqual(results?.failure_tasks, [{ url: `https://harbor.example/v2/library/nginx/blobs/${LAYER}`, hostname: 'seed-host', ip: '10.0.0.7', description: 'origin went away' }])
    assert.equal(done.body.includes('eyJharbor'), false)
    const ours = await app.inject({ url: `/api/v1/preheat/${job.task_id}` })
    assert.equal(ours.statusCode, 200)
    assert.equal(ours.body.includes('eyJharbor'), false)
  })

  test('the legacy /preheats driver: ID string, WAITING → RUNNING → SUCCESS', async (t) => {
    const { app, commands, answer } = await setup(t)
    const ping = await app.inject({ url: '/_ping' })
    assert.equal(ping.statusCode, 200)
    const created = await app.inject({
      method: 'POST',
      url: '/preheats',
      headers: HARBOR_HEADERS,
      payload: { type: 'image', url: 'http://127.0.0.1:5000/v2/team/app/manifests/v1', headers: { Authorization: PULL_TOKEN }, image: 'team/app', tag: 'v1', digest: '' }
    })
    assert.equal(created.statusCode, 200, created.body)
    const { ID } = created.json<{ ID: string }>()
    await setImmediate()
    assert.equal((commands[0] as { authorization?: string }).authorization, PULL_TOKEN)
    assert.equal((await app.inject({ url: `/preheats/${ID}` })).json<{ status: string }>().status, 'RUNNING')
    answer({ ok: true, results: [{ digest: LAYER, size: 20, status: 'SUCCESS' }] })
    await setImmediate()
    const done = (await app.inject({ url: `/preheats/${ID}` })).json<{ ID: string, status: string, errorMsg: string, finishTime: string }>()
    assert.equal(done.status, 'SUCCESS')
    assert.equal(done.errorMsg, '')
    assert.ok(!Number.isNaN(Date.parse(done.finishTime)))
  })

  test('Dragonfly\'s username and password args work too, and are never echoed', async (t) => {
    const { app, commands } = await setup(t)
    const payload = { type: 'preheat', args: { type: 'image', url: 'https://r.example/v2/a/b/manifests/latest', username: 'bob', password: 'hunter2-hunter2' } }
    const created = await app.inject({ method: 'POST', url: '/oapi/v1/jobs', headers: HARBOR_HEADERS, payload })
    assert.equal(created.statusCode, 200, created.body)
    assert.equal(created.body.includes('hunter2'), false)
    await setImmediate()
    assert.deepEqual((commands[0] as { credentials?: unknown }).credentials, { username: 'bob', password: 'hunter2-hunter2' })
  })

  test('bad bodies are 400 with a message that says what is wrong', async (t) => {
    const { app, commands } = await setup(t)
    const cases: Array<[unknown, RegExp]> = [
      [{ args: { type: 'image', url: 'https://h/v2/a/manifests/1' } }, /type/],
      [{ type: 'preheat' }, /args/],
      [{ type: 'preheat', args: { type: 'image' } }, /url/],
      [{ type: 'sync_peers', args: { type: 'image', url: 'https://h/v2/a/manifests/1' } }, /only preheat jobs/],
      [{ type: 'preheat', args: { type: 'file', url: 'https://h/v2/a/manifests/1' } }, /only image preheats/],
      [harborBody('not a url'), /args\.url: not a URL/],
      [harborBody('ftp://h/v2/a/manifests/1'), /http\(s\)/],
      [harborBody('https://h/v2/a/blobs/sha256:00'), /expected scheme:\/\/host\/v2\/<repository>\/manifests/],
      [harborBody('https://h/v2/Upper/Case/manifests/1'), /invalid repository name/],
      [harborBody('https://h/v2/a/manifests/bad:tag:x'), /invalid tag or digest/],
      [harborBody('https://bob:secret@h/v2/a/manifests/1'), /credentials go in the Authorization header/],
      [harborBody('https://h/v2/a/manifests/1', { Authorization: 'Bearer caf\u00e9' }), /printable ASCII/],
      [{ ...harborBody('https://h/v2/a/manifests/1'), scheduler_cluster_ids: 'all' }, /scheduler_cluster_ids/],
      [{ type: 'preheat', args: { type: 'image', url: 'https://h/v2/a/manifests/1', platform: 'linux' } }, /platform/]
    ]
    for (const [payload, message] of cases) {
      const res = await app.inject({ method: 'POST', url: '/oapi/v1/jobs', headers: HARBOR_HEADERS, payload: payload as Record<string, unknown> })
      assert.equal(res.statusCode, 400, `${JSON.stringify(payload)} → ${res.body}`)
      const body = res.json<{ code: string, message: string }>()
      assert.equal(body.code, 'DF_ERR_PREHEAT_INVALID')
      assert.match(body.message, message, JSON.stringify(payload))
      assert.equal(res.body.includes('secret'), false)
    }
    const legacy = await app.inject({ method: 'POST', url: '/preheats', headers: HARBOR_HEADERS, payload: { type: 'image', url: 'https://h/nothing' } })
    assert.equal(legacy.statusCode, 400)
    assert.match(legacy.json<{ message: string }>().message, /^url: expected/)
    const notJson = await app.inject({ method: 'POST', url: '/oapi/v1/jobs', headers: HARBOR_HEADERS, payload: '{"type":' })
    assert.equal(notJson.statusCode, 400)
    assert.equal(commands.length, 0, 'no job reached a seed')
    assert.equal((await app.inject({ url: '/oapi/v1/jobs/12345' })).statusCode, 404)
    assert.equal((await app.inject({ url: '/oapi/v1/jobs/not-a-number' })).statusCode, 404)
  })

  test('with api.token set, every preheat endpoint wants it as a Bearer token; health stays open', async (t) => {
    const { app } = await setup(t, TOKEN)
    const endpoints: Array<{ method: 'GET' | 'POST', url: string, payload?: Record<string, unknown> }> = [
      { method: 'POST', url: '/oapi/v1/jobs', payload: harborBody('https://h/v2/a/manifests/1') },
      { method: 'GET', url: '/oapi/v1/jobs/1' },
      { method: 'POST', url: '/preheats', payload: { type: 'image', url: 'https://h/v2/a/manifests/1' } },
      { method: 'GET', url: '/preheats/x' },
      { method: 'POST', url: '/api/v1/preheat', payload: { image: 'h/a:1' } },
      { method: 'GET', url: '/api/v1/preheat/x' }
    ]
    for (const e of endpoints) {
      for (const authorization of [undefined, `Bearer ${TOKEN}x`, `Basic ${TOKEN}`, 'Bearer']) {
        const res = await app.inject({ ...e, headers: { ...HARBOR_HEADERS, ...(authorization === undefined ? {} : { authorization }) } })
        assert.equal(res.statusCode, 401, `${e.method} ${e.url} with ${authorization ?? 'nothing'}`)
        assert.equal(res.json<{ code: string }>().code, 'DF_ERR_API_UNAUTHORIZED')
        assert.equal(res.body.includes(TOKEN), false)
      }
    }
    const ok = await app.inject({ method: 'POST', url: '/oapi/v1/jobs', headers: { ...HARBOR_HEADERS, authorization: `Bearer ${TOKEN}` }, payload: harborBody('https://h/v2/a/manifests/1') })
    assert.equal(ok.statusCode, 200, ok.body)
    const ours = await app.inject({ method: 'POST', url: '/api/v1/preheat', headers: { authorization: `bearer ${TOKEN}` }, payload: { image: 'h/a:1' } })
    assert.equal(ours.statusCode, 202, ours.body)
    for (const url of ['/healthy', '/_ping', '/metrics', '/api/v1/hosts']) {
      assert.equal((await app.inject({ url })).statusCode, 200, url)
    }
  })
})

test('manifest URLs as Harbor builds them', () => {
  assert.deepEqual(parseManifestUrl('https://harbor.example:8443/v2/proj/team/app/manifests/v1.2', 'url'), { registry: 'https://harbor.example:8443', repo: 'proj/team/app', reference: 'v1.2' })
  assert.deepEqual(parseManifestUrl(`http://127.0.0.1:5000/v2/a/manifests/${LAYER}`, 'url'), { registry: 'http://127.0.0.1:5000', repo: 'a', reference: LAYER })
})

async function setImmediate (): Promise<void> {
  await new Promise(resolve => { global.setImmediate(resolve) })
}
