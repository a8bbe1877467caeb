import assert from 'node:assert/strict'
import { test, type TestContext } from 'node:test'
import { Agent } from 'undici'
import {
  BlobUnknownError, DeniedError, ManifestUnknownError, OriginStatusError, OriginUnavailableError, TooManyRequestsError, UnauthorizedError
} from '../../src/errors.ts'
import { silentLogger } from '../../src/logger.ts'
import { createOriginClient, type OriginClient } from '../../peer/origin/index.ts'
import { parseRegistryUrl, type Upstream } from '../../peer/upstream/index.ts'
import { ALICE, startTokenOrigin, type TokenOrigin, type TokenOriginOptions } from '../helpers/token-origin.ts'

const DIGEST = `sha256:${'ab'.repeat(32)}`

async function setup (t: TestContext, options: TokenOriginOptions = {}): Promise<{ origin: TokenOrigin, client: OriginClient, upstream: Upstream }> {
  const origin = await startTokenOrigin(options)
  const dispatcher = new Agent({ keepAliveTimeout: 10, keepAliveMaxTimeout: 10 })
  t.after(async () => {
    await dispatcher.close()
    await origin.close()
  })
  const client = createOriginClient({ logger: silentLogger(), dispatcher }, { attempts: 2, retryBaseMs: 1 })
  return { origin, client, upstream: { ...parseRegistryUrl(origin.url), trusted: true } }
}

test('authorize answers a Bearer challenge with a pull token from the realm, and keeps it', async (t) => {
  const { origin, client, upstream } = await setup(t, { expiresIn: 300 })
  const anonymous = await client.authorize(upstream, 'team/app', undefined)
  assert.deepEqual(anonymous, { authorization: 'Bearer tok-1' })
  assert.deepEqual(origin.tokenRequests, [{ service: 'token "origin"', scope: 'repository:team/app:pull', authorization: undefined }])
  assert.deepEqual(await client.authorize(upstream, 'team/app', undefined), anonymous, 'cached')
  assert.equal(origin.tokenRequests.length, 1)

  const alice = await client.authorize(upstream, 'team/app', ALICE)
  assert.deepEqual(alice, { authorization: 'Bearer tok-2' }, 'another identity, another token')
  assert.match(origin.tokenRequests[1]?.authorization ?? '', /^Basic /)

  origin.routes.set('/v2/team/app/manifests/v1', { status: 200, headers: { 'content-type': 'application/vnd.oci.image.manifest.v1+json' }, body: '{"schemaVersion":2}' })
  const manifest = await client.getManifest(upstream, 'team/app', 'v1', 'application/vnd.oci.image.manifest.v1+json', alice)
  assert.equal(manifest.body.toString(), '{"schemaVersion":2}')
})

test('a Basic challenge takes the identity as it is; a refused token request is the origin refusing', async (t) => {
  const basic = await setup(t, { challenge: 'basic' })
  const credentials = await basic.client.authorize(basic.upstream, 'team/app', ALICE)
  assert.match(credentials.authorization ?? '', /^Basic /)
  assert.equal(basic.origin.tokenRequests.length, 0)

  const refusing = await setup(t, { tokenStatus: 401 })
  await assert.rejects(refusing.client.authorize(refusing.upstream, 'team/app', { username: 'alice', password: 'wrong' }), UnauthorizedError)
})

test('statuses become the errors the mirror maps back to OCI codes', async (t) => {
  const { origin, client, upstream } = await setup(t, { challenge: 'basic' })
  const credentials = await client.authorize(upstream, 'team/app', ALICE)
  const blob = `/v2/team/app/blobs/${DIGEST}`
  const cases: Array<[number, Record<string, string>, (err: unknown) => boolean]> = [
    [404, {}, (err) => err instanceof BlobUnknownError],
    [403, {}, (err) => err instanceof DeniedError],
    [429, { 'retry-after': '7' }, (err) => err instanceof TooManyRequestsError && err.retryAfter === '7'],
    [503, {}, (err) => err instanceof OriginUnavailableError],
    [418, {}, (err) => err instanceof OriginStatusError && err.status === 418]
  ]
  for (const [status, headers, check] of cases) {
    origin.routes.set(blob, { status, headers, body: 'nope' })
    await assert.rejects(client.getBlob(upstream, 'team/app', DIGEST, undefined, credentials), check, String(status))
  }
  assert.equal(origin.requests.filter(r => r.path === blob && r.headers.authorization === undefined).length, 0)
  await assert.rejects(client.getBlob(upstream, 'team/app', DIGEST, undefined, {}), (err: unknown) => err instanceof UnauthorizedError && err.challenge === 'Basic realm="registry"')
  await assert.rejects(client.getManifest(upstream, 'team/app', 'v2', 'application/json', credentials), (err: unknown) => err instanceof ManifestUnknownError && /manifest v2 /.test(err.message))
})
