import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as delay } from 'node:timers/promises'
import { request } from 'undici'
import { runCli } from '../helpers/cli.ts'
import { buildImage, pushImage, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir } from '../helpers/tmp.ts'

/*
 * Harbor's P2P preheat against the scheduler, replayed request by request from
 * goharbor/harbor src/pkg/p2p/preheat/provider/dragonfly.go (the open-API
 * driver; see the comment atop scheduler/api/harbor.ts):
 *  - GetHealth:     GET  {endpoint}/healthy
 *  - Preheat:       POST {endpoint}/oapi/v1/jobs with dragonflyCreateJobRequest
 *  - CheckProgress: GET  {endpoint}/oapi/v1/jobs/{id}, until SUCCESS or FAILURE
 * each through provider/client/http_client.go: Accept (and for POST
 * Content-Type) application/json, and the instance's credential, here OAUTH
 * mode: `Authorization: Bearer <token>` (auth/token_handler.go).
 */

const MIB = 1024 * 1024
const API_TOKEN = 'harbor-instance-token-7f3a9c21'
const USER = 'harbor-robot'
const PASSWORD = 'r0bot-Pa55-never-shown'
const BASIC = `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`

interface OpenApiJob {
  id: number
  state: string
  task_id: string
  created_at: string
  updated_at: string
  result: null | { job_states: Array<{ error: string, results: Array<{ success_tasks: Array<{ url: string, hostname: string, ip: string }>, failure_tasks: Array<{ url: string, description: string }>, scheduler_cluster_id: number }> }> }
}

/** Harbor's HTTPClient: JSON both ways, the instance's Bearer token on every call; a non-2xx is an error. */
async function harborCall (method: 'GET' | 'POST', url: string, body?: unknown, token = API_TOKEN): Promise<{ status: number, text: string }> {
  const res = await request(url, {
    method,
    headers: {
      accept: 'application/json',
      ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      ...(token === '' ? {} : { authorization: `Bearer ${token}` })
    },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    signal: AbortSignal.timeout(30_000)
  })
  return { status: res.statusCode, text: await res.body.text() }
}

/** dragonflyCreateJobRequest as Go encodes it: empty strings, zero numbers and a null cluster list included. */
function createJobRequest (manifestUrl: string, authorization: string): unknown {
  return {
    type: 'preheat',
    args: { type: 'image', url: manifestUrl, tag: '', filtered_query_params: '', headers: { Authorization: authorization }, scope: 'single_peer', concurrent_count: 0, timeout: 0 },
    scheduler_cluster_ids: null
  }
}

describe('Harbor preheats a private image through the scheduler API', () => {
  let registry: TestRegistry
  let origin: ThrottleProxy
  let scheduler: TestScheduler
  let seed: TestPeer
  let node: TestPeer
  let image: BuiltImage
  let work: { path: string, cleanup: () => Promise<void> }
  /** Every answer the scheduler gave; none may hold the registry credential. */
  const answers: string[] = []

  before(async () => {
    work = await tmpDir('df-harbor-it-')
    registry = await startRegistry({ auth: { username: USER, password: PASSWORD } })
    origin = await startThrottleProxy({ targetPort: registry.port })
    image = await buildImage(path.join(work.path, 'img'), { layers: [6 * MIB + 11, 2 * MIB + 5], seed: 'harbor', tag: 'v1' })
    await pushImage(image, `${registry.host}/library/private:v1`, { creds: `${USER}:${PASSWORD}` })
    scheduler = await startScheduler({ args: ['--api-token', API_TOKEN] })
    seed = await startPeer({ registry: origin.url, scheduler: scheduler.address, seed: true, name: 'harbor-seed' })
    node = await startPeer({ registry: origin.url, scheduler: scheduler.address, name: 'harbor-node' })
    // The job needs a seed the scheduler knows.
    await waitFor(async () => {
      const res = await request(`${scheduler.httpUrl}/api/v1/hosts`)
      return (await res.body.json() as Array<{ seed: boolean }>).some(h => h.seed)
    }, { timeoutMs: 20_000, what: 'the seed to register' })
  })

  after(async () => {
    await node?.close()
    await seed?.close()
    await scheduler?.close()
    await origin?.close()
    await registry?.close()
    await work?.cleanup()
  })

  /** CheckProgress in a loop, as Harbor's preheat job does, with a deadline. */
  async function pollUntilFinal (id: number): Promise<OpenApiJob> {
    const deadline = Date.now() + 90_000
    for (;;) {
      const res = await harborCall('GET', `${scheduler.httpUrl}/oapi/v1/jobs/${id}`)
      answers.push(res.text)
      assert.equal(res.status, 200, res.text)
      const job = JSON.parse(res.text) as OpenApiJob
      assert.ok(['PENDING', 'SUCCESS', 'FAILURE'].includes(job.state), `Harbor knows only PENDING, SUCCESS and FAILURE; got ${job.state}`)
      if (job.state !== 'PENDING') return job
      assert.ok(Date.now() < deadline, `job ${id} still PENDING after 90 s`)
      await delay(300)
    }
  }

  test('Harbor\'s health check, create and poll: the seed fetches every blob with Harbor\'s header; a node then pulls with nothing from the origin', async () => {
    const health = await harborCall('GET', `${scheduler.httpUrl}/healthy`)
    assert.equal(health.status, 200)

    const manifestUrl = `${origin.url}/v2/library/private/manifests/v1`
    const created = await harborCall('POST', `${scheduler.httpUrl}/oapi/v1/jobs`, createJobRequest(manifestUrl, BASIC))
    answers.push(created.text)
    assert.equal(created.status, 200, created.text)
    const job = JSON.parse(created.text) as OpenApiJob
    assert.ok(Number.isInteger(job.id), 'Harbor reads id as an int')
    assert.ok(!Number.isNaN(Date.parse(job.created_at)) && !Number.isNaN(Date.parse(job.updated_at)), 'RFC 3339 times')

    const done = await pollUntilFinal(job.id)
    assert.equal(done.state, 'SUCCESS', JSON.stringify(done.result))
    const [states] = done.result?.job_states ?? []
    const [results] = states?.results ?? []
    assert.deepEqual(results?.failure_tasks, [])
    const blobUrl = (digest: string): string => `${origin.url}/v2/library/private/blobs/${digest}`
    const expected = [image.manifest, image.config, ...image.layers].map(b => blobUrl(b.digest)).sort()
    assert.deepEqual(results?.success_tasks.map(t => t.url).sort(), expected, 'one success task per blob: manifest, config, layers')
    assert.ok(results?.success_tasks.every(t => t.hostname !== '' && t.ip === '127.0.0.1'), 'each names the seed')
    const seedFromOrigin = (await seed.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' })
    assert.ok(seedFromOrigin >= image.config.size + image.layers.reduce((s, l) => s + l.size, 0), `the seed fetched the blobs from the origin (${seedFromOrigin} bytes)`)

    // The same job on our own API.
    const ours = await request(`${scheduler.httpUrl}/api/v1/preheat/${done.task_id}`, { headers: { authorization: `Bearer ${API_TOKEN}` } })
    const oursText = await ours.body.text()
    answers.push(oursText)
    assert.equal(JSON.parse(oursText).status, 'SUCCESS')

    // The scheduler has heard from the seed about every blob before the node asks.
    await waitFor(async () => {
      const tasks = await (await request(`${scheduler.httpUrl}/api/v1/tasks`)).body.json() as Array<{ digest: string, completeHolders: string[] }>
      return [image.config, ...image.layers].every(b => (tasks.find(t => t.digest === b.digest)?.completeHolders.length ?? 0) > 0)
    }, { timeoutMs: 15_000, what: 'the seed to announce the preheated blobs' })

    origin.reset()
    const ns = `ns=${encodeURIComponent(origin.host)}`
    const withCreds = { authorization: BASIC }
    const manifest = await request(`${node.url}/v2/library/private/manifests/v1?${ns}`, { headers: { ...withCreds, accept: 'application/vnd.oci.image.manifest.v1+json' } })
    assert.equal(manifest.statusCode, 200)
    assert.equal(createHash('sha256').update(Buffer.from(await manifest.body.arrayBuffer())).digest('hex'), image.manifest.digest.slice(7))
    for (const b of [image.config, ...image.layers]) {
      const res = await request(`${node.url}/v2/library/private/blobs/${b.digest}?${ns}`, { headers: withCreds })
      assert.equal(res.statusCode, 200)
      const hash = createHash('sha256')
      for await (const chunk of res.body) hash.update(chunk as Buffer)
      assert.equal(`sha256:${hash.digest('hex')}`, b.digest, `${b.digest} intact`)
    }
    const nodeMetrics = await node.metrics()
    assert.equal(nodeMetrics.get('damselfly_fetched_bytes_total', { source: 'origin' }), 0, 'no blob byte from the origin')
    assert.equal(nodeMetrics.get('damselfly_fetched_bytes_total', { source: 'peer' }), image.config.size + image.layers.reduce((s, l) => s + l.size, 0))
    // Left: the origin's answers to the node's access checks and the manifest, no blob.
    assert.ok(origin.bytesDown() < 64 * 1024, `the origin sent ${origin.bytesDown()} bytes during the node's pull`)

    // The private-image rule still holds on the node: no credentials, no bytes.
    for (const url of [`${node.url}/v2/library/private/blobs/${image.layers[0]?.digest ?? ''}?${ns}`, `${node.url}/v2/library/private/manifests/v1?${ns}`]) {
      const anonymous = await request(url)
      assert.equal(anonymous.statusCode, 401, url)
      await anonymous.body.dump()
    }
  })

  test('a job for a tag the registry does not have ends FAILURE, and Harbor gets the reason', async () => {
    const created = await harborCall('POST', `${scheduler.httpUrl}/oapi/v1/jobs`, createJobRequest(`${origin.url}/v2/library/private/manifests/no-such-tag`, BASIC))
    answers.push(created.text)
    assert.equal(created.status, 200, created.text)
    const done = await pollUntilFinal((JSON.parse(created.text) as OpenApiJob).id)
    assert.equal(done.state, 'FAILURE')
    const error = done.result?.job_states.map(s => s.error).join('; ') ?? ''
    assert.match(error, /no-such-tag/, 'the message names what was missing')
  })

  test('without the API token, or with another one, Harbor is refused (401)', async () => {
    const body = createJobRequest(`${origin.url}/v2/library/private/manifests/v1`, BASIC)
    for (const token of ['', 'not-the-api-token-at-all']) {
      const res = await harborCall('POST', `${scheduler.httpUrl}/oapi/v1/jobs`, body, token)
      answers.push(res.text)
      assert.equal(res.status, 401, res.text)
      assert.equal(JSON.parse(res.text).code, 'DF_ERR_API_UNAUTHORIZED')
      const poll = await harborCall('GET', `${scheduler.httpUrl}/oapi/v1/jobs/1`, undefined, token)
      assert.equal(poll.status, 401)
      const ours = await request(`${scheduler.httpUrl}/api/v1/preheat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ image: `${origin.host}/library/private:v1` }) })
      assert.equal(ours.statusCode, 401)
      await ours.body.dump()
    }
    assert.equal((await harborCall('GET', `${scheduler.httpUrl}/healthy`, undefined, '')).status, 200, 'health stays open')
  })

  test('damselfly preheat sends the API token from DAMSELFLY_API_TOKEN, and is refused without it', async () => {
    const args = ['preheat', `${origin.url}/library/private:v1`, '--scheduler', scheduler.httpUrl, '--username', USER, '--password-stdin', '--timeout', '120']
    const refused = await runCli(args, { input: `${PASSWORD}\n`, env: { DAMSELFLY_API_TOKEN: '' } })
    assert.notEqual(refused.code, 0)
    assert.match(refused.stderr + refused.stdout, /401/)
    const ok = await runCli(args, { input: `${PASSWORD}\n`, env: { DAMSELFLY_API_TOKEN: API_TOKEN }, timeoutMs: 150_000 })
    assert.equal(ok.code, 0, ok.stderr + ok.stdout)
    assert.match(ok.stdout, /SUCCESS/)
  })

  test('the registry credential is in no answer and no log line', async () => {
    for (const url of ['/api/v1/hosts', '/api/v1/tasks']) {
      answers.push(await (await request(`${scheduler.httpUrl}${url}`)).body.text())
    }
    const secrets = [PASSWORD, BASIC.slice('Basic '.length), API_TOKEN]
    const places: Array<[string, string]> = [
      ...answers.map((text, i) => [`answer ${i}`, text] as [string, string]),
      ['scheduler log', scheduler.output()],
      ['seed log', seed.output()],
      ['node log', node.output()]
    ]
    assert.ok(answers.length >= 8, 'answers were collected')
    for (const [where, text] of places) {
      for (const secret of secrets) assert.equal(text.includes(secret), false, `${where} holds a credential`)
    }
    assert.match(seed.output(), /preheat started/, 'the seed log was captured')
  })
})
