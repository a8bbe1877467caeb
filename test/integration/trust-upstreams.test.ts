// Attack: an attacker with no credentials names a registry of its own (which
// says "yes, I have that digest") to read someone else's private layer out of
// a peer's cache or the swarm. Contract: /work/notes/trust-contract.md,
// "Upstreams" and the scheduler's listing rule.
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import path from 'node:path'
import { after, before, describe, test, type TestContext } from 'node:test'
import { setTimeout as delay } from 'node:timers/promises'
import { request } from 'undici'
import { errorCode, leakedBytes, send, type Seen } from '../helpers/attacker.ts'
import { startFakeRegistry, type FakeRegistry } from '../helpers/fake-registry.ts'
import { buildImage, pushImage, readBlob, type BuiltBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { freePort } from '../helpers/ports.ts'
import { waitFor } from '../helpers/process.ts'
import { makeTestCert } from '../helpers/registry.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'
import { startTokenRegistry, type TokenRegistry } from '../helpers/token-registry.ts'

const MIB = 1024 * 1024
const REPO = 'private/app'
const API_TOKEN = 'trust-tests-api-token-0123456789'
/** One MiB from one MiB in: a range read an on-demand client (nydusd) would make. */
const RANGE = { start: MIB, end: 2 * MIB - 1 }

type Form = 'header' | 'ns' | 'proxy'

interface Attempt {
  who: string
  form: Form
  range: boolean
  seen: Seen
  /** Bytes of the private layer among the bytes received. */
  leaked: number
  /** What the attacker's registry saw during this attempt. */
  fakeRequests: number
  fakeConnections: number
}

function sha256 (data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

function describeAttempt (a: Attempt): string {
  const code = errorCode(a.seen.body)
  return `${a.who} ${a.form}${a.range ? ' range' : ' full'}: status ${a.seen.status}${code === undefined ? '' : ` ${code}`}, ${a.seen.body.length} bytes${a.seen.complete ? '' : ` (incomplete: ${a.seen.error ?? '?'})`}, ${a.leaked} private bytes leaked, attacker registry saw ${a.fakeRequests} requests / ${a.fakeConnections} connections`
}

describe('unlisted registries: an attacker names its own registry to read a private layer', () => {
  let work: TmpDir
  let registry: TokenRegistry
  let fake: FakeRegistry
  let fakeCert: { cert: string, key: string }
  let image: BuiltImage
  let layer: BuiltBlob
  let secret: Buffer
  let aliceToken: string

  before(async () => {
    work = await tmpDir('df-trust-upstreams-')
    registry = await startTokenRegistry()
    image = await buildImage(path.join(work.path, 'img'), { layers: [3 * MIB + 123], seed: 'trust-private', tag: 'v1' })
    await pushImage(image, `${registry.host}/${REPO}:v1`, { creds: registry.creds() })
    layer = image.layers[0] as BuiltBlob
    secret = readBlob(image, layer.digest)
    aliceToken = await registry.token(`repository:${REPO}:pull`, registry.creds())
    // The attacker's registry has a certificate the peers trust (a real attacker would
    // have a public one): `ns=` reaches it over https as well as the header over http.
    fakeCert = await makeTestCert(path.join(work.path, 'fake-tls'))
    fake = await startFakeRegistry({ tls: fakeCert })
    // "Yes, I have that digest, and it is this big" — then zeros.
    fake.setBlob(layer.digest, { size: layer.size })
  })

  after(async () => {
    await fake?.close()
    await registry?.close()
    await work?.cleanup()
  })

  /** One attacker request to `peer`, with `fake` named by `form`, recording what came back and what the fake saw. */
  async function attack (peer: TestPeer, who: string, form: Form, range: boolean, repo = REPO): Promise<Attempt> {
    fake.reset()
    const headers: Record<string, string> = range ? { range: `bytes=${RANGE.start}-${RANGE.end}` } : {}
    let seen: Seen
    if (form === 'header') {
      seen = await send({ port: peer.port, path: `/v2/${repo}/blobs/${layer.digest}`, headers: { ...headers, 'x-dragonfly-registry': fake.url } })
    } else if (form === 'ns') {
      seen = await send({ port: peer.port, path: `/v2/${repo}/blobs/${layer.digest}?ns=${encodeURIComponent(fake.host)}`, headers })
    } else {
      // The peer as a forward proxy: absolute form naming the attacker's registry.
      seen = await send({ port: peer.port, path: `http://${fake.host}/v2/x/blobs/${layer.digest}`, headers: { ...headers, host: fake.host } })
    }
    const offset = seen.status === 206 ? Number(/^bytes (\d+)-/.exec(String(seen.headers['content-range']))?.[1] ?? 0) : 0
    // Give a request the peer may still be making to the fake a moment to land.
    await delay(50)
    return {
      who,
      form,
      range,
      seen,
      leaked: seen.status >= 200 && seen.status < 300 ? leakedBytes(seen.body, secret, offset) : leakedBytes(seen.body, secret, 0),
      fakeRequests: fake.requests.length,
      fakeConnections: fake.connections()
    }
  }

  /** The contract's answers for every attempt, checked after all were made (so every figure is reported). */
  function assertRefused (t: TestContext, attempts: Attempt[]): void {
    for (const a of attempts) t.diagnostic(describeAttempt(a))
    const leaked = attempts.filter(a => a.leaked > 0)
    assert.equal(leaked.reduce((s, a) => s + a.leaked, 0), 0, `private bytes reached the attacker:\n${leaked.map(describeAttempt).join('\n')}`)
    for (const a of attempts) {
      if (a.form === 'proxy') {
        // Forwarded as a plain proxy request (the mirror is on loopback) or refused; never the swarm's bytes.
        const fakeBytes = a.range ? Buffer.alloc(RANGE.end - RANGE.start + 1) : Buffer.alloc(layer.size)
        const ok = a.seen.status === 403 || (a.seen.status >= 200 && a.seen.status < 300 && a.seen.body.equals(fakeBytes))
        assert.ok(ok, `absolute form is refused or is a pass-through of the attacker's registry: ${describeAttempt(a)}`)
        continue
      }
      assert.equal(a.seen.status, 403, describeAttempt(a))
      assert.equal(errorCode(a.seen.body), 'DENIED', describeAttempt(a))
      assert.equal(a.fakeRequests + a.fakeConnections, 0, `the attacker's registry was contacted: ${describeAttempt(a)}`)
    }
  }

  async function alicePulls (peer: TestPeer): Promise<void> {
    const res = await request(`${peer.url}/v2/${REPO}/blobs/${layer.digest}`, { headers: { authorization: `Bearer ${aliceToken}` } })
    const body = Buffer.from(await res.body.arrayBuffer())
    assert.equal(res.statusCode, 200, `alice pulls her layer through ${peer.name}: ${body.subarray(0, 300).toString()}`)
    assert.equal(sha256(body), layer.digest, 'alice got her layer intact')
  }

  for (const variant of [
    { name: 'without a cluster secret', secret: undefined, apiToken: undefined },
    { name: 'with a cluster secret (scheduler with an API token)', secret: 'trust-tests cluster secret 0123456789', apiToken: API_TOKEN }
  ]) {
    describe(variant.name, () => {
      let scheduler: TestScheduler
      let holder: TestPeer
      let second: TestPeer
      let seed: TestPeer
      const peers: TestPeer[] = []

      before(async () => {
        const secretArgs = variant.secret === undefined ? [] : ['--cluster-secret', variant.secret]
        scheduler = await startScheduler({ args: [...secretArgs, ...(variant.apiToken === undefined ? [] : ['--api-token', variant.apiToken])] })
        const args = ['--origin-ca', fakeCert.cert, ...secretArgs]
        const started = await Promise.allSettled([
          startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'holder', args }),
          startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'second', args }),
          startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'seed', seed: true, args })
        ])
        for (const s of started) if (s.status === 'fulfilled') peers.push(s.value)
        const failed = started.find(s => s.status === 'rejected')
        if (failed !== undefined) throw failed.reason
        ;[holder, second, seed] = peers as [TestPeer, TestPeer, TestPeer]
        // Alice pulls her private layer through one peer: it is now in that peer's cache and in the swarm.
        await alicePulls(holder)
        await waitFor(async () => {
          const tasks = await (await request(`${scheduler.httpUrl}/api/v1/tasks`, { headers: variant.apiToken === undefined ? {} : { authorization: `Bearer ${variant.apiToken}` } })).body.json() as Array<{ digest: string, completeHolders: string[] }>
          return (tasks.find(t => t.digest === layer.digest)?.completeHolders.length ?? 0) >= 1
        }, { timeoutMs: 15_000, what: 'the scheduler to know a holder of the private layer' })
      })

      after(async () => {
        await Promise.allSettled(peers.map(async p => { await p.close() }))
        await scheduler?.close()
      })

      test('(a) the peer holding the layer: header, ns= and absolute form, full and range reads', async (t) => {
        const attempts: Attempt[] = []
        for (const form of ['header', 'ns', 'proxy'] as const) {
          for (const range of [true, false]) attempts.push(await attack(holder, 'holder', form, range))
        }
        assertRefused(t, attempts)
      })

      test('(b) a second peer, which would fetch the layer through the swarm', async (t) => {
        const attempts: Attempt[] = []
        for (const form of ['header', 'ns', 'proxy'] as const) {
          for (const range of [true, false]) attempts.push(await attack(second, 'second', form, range))
        }
        const m = await second.metrics()
        t.diagnostic(`second peer fetched ${m.get('damselfly_fetched_bytes_total', { source: 'peer' })} bytes from peers, ${m.get('damselfly_fetched_bytes_total', { source: 'origin' })} from origins`)
        assertRefused(t, attempts)
      })

      test('(c) the seed', async (t) => {
        const attempts: Attempt[] = []
        for (const form of ['header', 'ns', 'proxy'] as const) {
          for (const range of [true, false]) attempts.push(await attack(seed, 'seed', form, range))
        }
        const m = await seed.metrics()
        t.diagnostic(`seed fetched ${m.get('damselfly_fetched_bytes_total', { source: 'peer' })} bytes from peers, ${m.get('damselfly_fetched_bytes_total', { source: 'origin' })} from origins`)
        assertRefused(t, attempts)
      })

      test('the configured registry\'s host with another port is another registry: refused', async (t) => {
        // The attacker's registry is on 127.0.0.1 like the real one, on another port.
        assert.notEqual(fake.port, registry.port)
        const closed = await freePort()
        const results: Array<{ label: string, seen: Seen }> = []
        for (const [label, path, headers] of [
          ['header, port of the attacker\'s registry', `/v2/${REPO}/blobs/${layer.digest}`, { 'x-dragonfly-registry': `http://127.0.0.1:${fake.port}` }],
          ['header, closed port', `/v2/${REPO}/blobs/${layer.digest}`, { 'x-dragonfly-registry': `http://127.0.0.1:${closed}` }],
          ['ns, closed port', `/v2/${REPO}/blobs/${layer.digest}?ns=127.0.0.1:${closed}`, {}]
        ] as const) {
          fake.reset()
          const seen = await send({ port: holder.port, path, headers: { ...headers } })
          results.push({ label, seen })
          t.diagnostic(`${label}: status ${seen.status} ${errorCode(seen.body) ?? ''}, ${leakedBytes(seen.body, secret)} private bytes, attacker registry saw ${fake.requests.length} requests`)
        }
        for (const { label, seen } of results) {
          assert.equal(leakedBytes(seen.body, secret), 0, `${label}: private bytes leaked`)
          assert.equal(seen.status, 403, `${label}: status ${seen.status} ${seen.body.subarray(0, 200).toString()}`)
          assert.equal(errorCode(seen.body), 'DENIED', label)
        }
      })

      test('the scheduler lists no origins or repositories without the API token', async (t) => {
        const texts: Record<string, string> = {}
        for (const [label, headers] of [
          ['no Authorization', {}],
          ['a wrong token', { authorization: 'Bearer not-the-api-token-at-all-0000' }],
          ['Basic credentials', { authorization: `Basic ${Buffer.from(registry.creds()).toString('base64')}` }]
        ] as const) {
          const res = await request(`${scheduler.httpUrl}/api/v1/tasks`, { headers: { ...headers } })
          texts[label] = await res.body.text()
          const tasks = JSON.parse(texts[label]) as Array<{ digest: string, origin?: unknown }>
          t.diagnostic(`GET /api/v1/tasks with ${label}: status ${res.statusCode}, ${tasks.length} tasks, ${tasks.filter(x => x.origin !== undefined).length} with an origin, mentions ${REPO}: ${texts[label].includes(REPO)}`)
          assert.ok(tasks.some(x => x.digest === layer.digest), `${label}: the task is still listed`)
        }
        const swarm = await (await request(`${scheduler.httpUrl}/api/v1/swarm`)).body.text()
        for (const [label, text] of Object.entries(texts)) {
          assert.equal(text.includes(REPO), false, `GET /api/v1/tasks with ${label} names the repository: ${text.slice(0, 400)}`)
          assert.equal(text.includes('"origin"'), false, `GET /api/v1/tasks with ${label} has origin fields`)
          assert.equal(text.includes(registry.host), false, `GET /api/v1/tasks with ${label} names the registry`)
        }
        assert.equal(swarm.includes(REPO), false, '/api/v1/swarm names the repository')
        if (variant.apiToken !== undefined) {
          const res = await request(`${scheduler.httpUrl}/api/v1/tasks`, { headers: { authorization: `Bearer ${variant.apiToken}` } })
          const tasks = await res.body.json() as Array<{ digest: string, origin?: unknown }>
          const shown = JSON.stringify(tasks.find(x => x.digest === layer.digest)?.origin ?? null)
          assert.ok(shown.includes(REPO) && shown.includes(registry.host), `with the API token the origin is shown: ${shown}`)
        }
      })

      if (variant.secret === undefined) {
        // An opt-in peer in the same swarm (the flag means nothing for a peer's own swarm membership).
        test('--allow-unlisted-registries: the attacker gets its own registry\'s bytes, never the cached or swarm-held private bytes; wrong bytes never complete', async (t) => {
          // The swarm holds the layer, and so will this peer's cache: alice pulls it through the peer.
          const peer = await startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'unlisted', args: ['--origin-ca', fakeCert.cert, '--allow-unlisted-registries'] })
          peers.push(peer)
          await alicePulls(peer)

          const attempts: Attempt[] = []
          for (const form of ['header', 'ns'] as const) {
            for (const range of [true, false]) attempts.push(await attack(peer, 'unlisted', form, range))
          }
          for (const a of attempts) t.diagnostic(describeAttempt(a))
          assert.equal(attempts.reduce((s, a) => s + a.leaked, 0), 0, `private bytes reached the attacker:\n${attempts.filter(a => a.leaked > 0).map(describeAttempt).join('\n')}`)
          for (const a of attempts) {
            if (a.range) {
              // A range is a pass-through: the attacker's own bytes (zeros), asked of its registry.
              assert.equal(a.seen.status, 206, describeAttempt(a))
              assert.ok(a.seen.body.equals(Buffer.alloc(RANGE.end - RANGE.start + 1)), `range is the attacker registry's bytes: ${describeAttempt(a)}`)
              assert.ok(a.fakeRequests > 0, `the range came from the attacker's registry: ${describeAttempt(a)}`)
            } else {
              // Zeros do not hash to the digest: never a complete 200.
              assert.ok(!(a.seen.status === 200 && a.seen.complete && a.seen.body.length === layer.size), `a full GET of bytes that fail the digest completed: ${describeAttempt(a)}`)
            }
          }

          // A digest no one holds, whose bytes from the registry do not hash to it: cut, never a complete 200.
          const cold = sha256(randomBytes(64))
          fake.setBlob(cold, { size: MIB + 5 })
          const wrong = await send({ port: peer.port, path: `/v2/x/blobs/${cold}`, headers: { 'x-dragonfly-registry': fake.url } })
          t.diagnostic(`cold digest, wrong bytes: status ${wrong.status}, ${wrong.body.length} of ${MIB + 5} bytes, complete ${wrong.complete}`)
          assert.ok(!(wrong.status === 200 && wrong.complete && wrong.body.length === MIB + 5), `a full GET of bytes that fail the digest completed (status ${wrong.status}, ${wrong.body.length} bytes)`)

          // A blob the attacker's registry really has is served, verified, and kept out of the cache and the swarm.
          const own = randomBytes(MIB + 17)
          const ownDigest = sha256(own)
          fake.setBlob(ownDigest, { size: own.length, bytes: own })
          const first = await send({ port: peer.port, path: `/v2/x/blobs/${ownDigest}`, headers: { 'x-dragonfly-registry': fake.url } })
          t.diagnostic(`attacker's own blob: status ${first.status}, ${first.body.length} bytes, intact ${sha256(first.body) === ownDigest}`)
          assert.equal(first.status, 200)
          assert.ok(first.complete && first.body.equals(own), 'the unlisted registry\'s own verified blob is passed through')
          // The registry now sends other bytes for it: a cached copy would show up as the old bytes.
          fake.setBlob(ownDigest, { size: own.length })
          const again = await send({ port: peer.port, path: `/v2/x/blobs/${ownDigest}`, headers: { 'x-dragonfly-registry': fake.url } })
          t.diagnostic(`attacker's own blob again, registry now sending zeros: status ${again.status}, ${again.body.length} bytes, ${leakedBytes(again.body, own)} bytes of the first answer`)
          assert.equal(leakedBytes(again.body, own), 0, 'nothing of the unlisted registry\'s blob was served from the cache')
          assert.ok(!(again.status === 200 && again.complete && again.body.length === own.length), 'bytes that fail the digest never complete')
          await delay(1_000)
          const tasks = await (await request(`${scheduler.httpUrl}/api/v1/tasks`)).body.json() as Array<{ digest: string }>
          assert.equal(tasks.some(x => x.digest === ownDigest), false, 'the unlisted registry\'s blob did not enter the swarm')
        })
      }
    })
  }
})
