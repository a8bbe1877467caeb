import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { request } from 'undici'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

/*
 * Attack 7 (notes/trust-contract.md, "Restarts keep what stale-if-error
 * needs"): the origins are down and the node is restarted (peer and
 * scheduler). Public content the peer holds must still be pulled anonymously
 * (the tag answered stale); private content must still be refused to callers
 * without credentials. The public image lives on an anonymous registry (behind
 * a relay that can go down), the private one on an htpasswd registry; the peer
 * is given both.
 */

const MIB = 1024 * 1024
const USER = 'alice'
const PASSWORD = 'restart-s3cret-pass'
const BASIC = `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`
const WRONG = `Basic ${Buffer.from(`${USER}:not-the-password`).toString('base64')}`
const ACCEPT = 'application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json'

interface Answer { what: string, status: number, bytes: number, sha256: string, warning: string | undefined, stale: string | undefined, body: string }

async function get (peer: TestPeer, pathAndQuery: string, what: string, headers: Record<string, string> = {}, method: 'GET' | 'HEAD' = 'GET'): Promise<Answer> {
  const res = await request(`${peer.url}${pathAndQuery}`, { method, headers, signal: AbortSignal.timeout(60_000) })
  const data = Buffer.from(await res.body.arrayBuffer())
  const header = (name: string): string | undefined => { const v = res.headers[name]; return v === undefined ? undefined : String(v) }
  return {
    what,
    status: res.statusCode,
    bytes: data.length,
    sha256: `sha256:${createHash('sha256').update(data).digest('hex')}`,
    warning: header('warning'),
    stale: header('x-damselfly-stale'),
    body: res.statusCode >= 300 ? data.toString('utf8').slice(0, 200) : ''
  }
}

/** The manifest by tag, then every blob by digest, as containerd asks through a mirror (?ns=). */
async function pull (peer: TestPeer, host: string, repo: string, image: BuiltImage, headers: Record<string, string> = {}): Promise<Answer[]> {
  const ns = `ns=${encodeURIComponent(host)}`
  const answers = [await get(peer, `/v2/${repo}/manifests/${image.tag}?${ns}`, `manifest ${repo}:${image.tag}`, { accept: ACCEPT, ...headers })]
  for (const b of [image.config, ...image.layers]) answers.push(await get(peer, `/v2/${repo}/blobs/${b.digest}?${ns}`, `blob ${b.digest.slice(0, 19)}…`, headers))
  return answers
}

function show (answers: Answer[]): string {
  return answers.map((a) => `${a.what}: ${a.status}${a.status < 300 ? ` (${a.bytes} bytes${a.warning === undefined ? '' : `, Warning ${a.warning}`}${a.stale === undefined ? '' : `, X-Damselfly-Stale ${a.stale}`})` : ` ${a.body}`}`).join('; ')
}

function assertIntact (answers: Answer[], image: BuiltImage, who: string): void {
  const [manifest, ...blobs] = answers as [Answer, ...Answer[]]
  assert.equal(manifest.status, 200, `${who}: ${show(answers)}`)
  assert.equal(manifest.sha256, image.manifest.digest, `${who}: the manifest`)
  for (const [i, b] of [image.config, ...image.layers].entries()) {
    assert.equal(blobs[i]?.status, 200, `${who}: ${show(answers)}`)
    assert.equal(blobs[i]?.sha256, b.digest, `${who}: blob ${b.digest}`)
    assert.equal(blobs[i]?.bytes, readBlob(image, b.digest).length, `${who}: blob ${b.digest} complete`)
  }
}

describe('restarts keep what stale-if-error needs (attack 7)', () => {
  let work: TmpDir
  let publicRegistry: TestRegistry
  let origin: ThrottleProxy
  let privateRegistry: TestRegistry
  let scheduler: TestScheduler
  let peer: TestPeer
  let publicImage: BuiltImage
  let privateImage: BuiltImage

  before(async () => {
    work = await tmpDir('df-trust-restarts-')
    publicRegistry = await startRegistry()
    origin = await startThrottleProxy({ targetPort: publicRegistry.port })
    privateRegistry = await startRegistry({ auth: { username: USER, password: PASSWORD } })
    publicImage = await buildImage(path.join(work.path, 'public'), { layers: [6 * MIB + 11, 2 * MIB], seed: 'trust-restarts-public', tag: 'v1' })
    privateImage = await buildImage(path.join(work.path, 'private'), { layers: [3 * MIB + 5], seed: 'trust-restarts-private', tag: 'v1' })
    await pushImage(publicImage, `${publicRegistry.host}/trust/public:v1`)
    await pushImage(privateImage, `${privateRegistry.host}/trust/private:v1`, { creds: `${USER}:${PASSWORD}` })
    scheduler = await startScheduler()
    peer = await startPeer({ registry: origin.url, scheduler: scheduler.address, name: 'restarted', args: ['--registries', privateRegistry.url] })
  })

  after(async () => {
    origin?.setDown(false)
    await peer?.close()
    await scheduler?.close()
    await origin?.close()
    await privateRegistry?.close()
    await publicRegistry?.close()
    await work?.cleanup()
  })

  test('with the origins down after a peer and scheduler restart: public content is pulled anonymously, private content is not', async (t) => {
    // Warm: the public image anonymously, the private one with credentials.
    assertIntact(await pull(peer, origin.host, 'trust/public', publicImage), publicImage, 'the warm public pull')
    const anonymousBefore = await pull(peer, privateRegistry.host, 'trust/private', privateImage)
    assert.ok(anonymousBefore.every((a) => a.status >= 400), `private content to an anonymous caller while the origin is up: ${show(anonymousBefore)}`)
    assertIntact(await pull(peer, privateRegistry.host, 'trust/private', privateImage, { authorization: BASIC }), privateImage, 'the warm private pull')

    // The origins go down; the node restarts.
    origin.setDown(true)
    await privateRegistry.stop()
    await peer.stop()
    await scheduler.stop()
    await scheduler.start()
    await peer.start()

    const publicAfter = await pull(peer, origin.host, 'trust/public', publicImage)
    const privateAnonymous = await pull(peer, privateRegistry.host, 'trust/private', privateImage)
    const privateWrong = await pull(peer, privateRegistry.host, 'trust/private', privateImage, { authorization: WRONG })
    const privateHeads = await Promise.all([privateImage.config, ...privateImage.layers].map(async (b) =>
      get(peer, `/v2/trust/private/blobs/${b.digest}?ns=${encodeURIComponent(privateRegistry.host)}`, `HEAD ${b.digest.slice(0, 19)}…`, {}, 'HEAD')))
    t.diagnostic(`public, anonymous: ${show(publicAfter)}`)
    t.diagnostic(`private, anonymous: ${show(privateAnonymous)}`)
    t.diagnostic(`private, wrong password: ${show(privateWrong)}`)

    // Private content: nothing to a caller the origin never accepted (checked first: it holds however the public pull goes).
    const leaked = [...privateAnonymous, ...privateWrong, ...privateHeads].filter((a) => a.status >= 200 && a.status < 300)
    assert.deepEqual(leaked.map((a) => `${a.what}: ${a.status} (${a.bytes} bytes)`), [], 'private content answered 2xx to a caller without credentials after the restart')

    // Public content: the tag answered stale, every blob whole.
    const manifest = publicAfter[0] as Answer
    assertIntact(publicAfter, publicImage, 'the public pull after the restarts')
    assert.match(manifest.warning ?? '', /^110 /, `the tag is answered with Warning: 110 (${show([manifest])})`)
    assert.notEqual(manifest.stale, undefined, `the tag is answered with X-Damselfly-Stale (${show([manifest])})`)
  })
})
