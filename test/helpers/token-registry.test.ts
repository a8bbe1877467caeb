// The token-auth registry helper (token-registry.ts) against a real docker-registry and skopeo.
import assert from 'node:assert/strict'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { request } from 'undici'
import { buildImage, pushImage, readBlob, type BuiltImage } from './image.ts'
import { skopeoCopyToDir } from './skopeo.ts'
import { tmpDir, type TmpDir } from './tmp.ts'
import { startTokenRegistry, type TokenRegistry } from './token-registry.ts'

describe('token-auth registry helper', () => {
  let work: TmpDir
  let registry: TokenRegistry
  let image: BuiltImage

  before(async () => {
    work = await tmpDir('df-token-helper-')
    registry = await startTokenRegistry()
    image = await buildImage(path.join(work.path, 'img'), { layers: [256 * 1024 + 7], seed: 'token-helper', tag: 'v1' })
    // skopeo does the whole Bearer dance: 401 from /v2/, then the realm with alice's Basic credentials.
    await pushImage(image, `${registry.host}/private/app:v1`, { creds: registry.creds() })
    await pushImage(image, `${registry.host}/public/app:v1`, { creds: registry.creds() })
  })

  after(async () => {
    await registry?.close()
    await work?.cleanup()
  })

  test('alice can pull private/app; anonymous callers and wrong passwords cannot', async () => {
    const layer = image.layers[0]?.digest as string
    const blobUrl = `${registry.url}/v2/private/app/blobs/${layer}`

    const bare = await request(blobUrl)
    assert.equal(bare.statusCode, 401)
    assert.match(String(bare.headers['www-authenticate']), new RegExp(`^Bearer realm="${registry.realm}",service="${registry.service}",scope="repository:private/app:pull"`))
    await bare.body.dump()

    const alice = await registry.token('repository:private/app:pull', registry.creds())
    const ok = await request(blobUrl, { headers: { authorization: `Bearer ${alice}` } })
    assert.equal(ok.statusCode, 200)
    assert.ok(Buffer.from(await ok.body.arrayBuffer()).equals(readBlob(image, layer)))

    const anonymous = await registry.token('repository:private/app:pull')
    const refused = await request(blobUrl, { headers: { authorization: `Bearer ${anonymous}` } })
    assert.equal(refused.statusCode, 401, 'an anonymous token carries no access to private/app')
    await refused.body.dump()

    assert.equal(await registry.tokenStatus('repository:private/app:pull', 'alice:wrong-password'), 401)
    assert.equal(await registry.tokenStatus('repository:private/app:pull', 'mallory:alice-password'), 401)

    // The same with skopeo as the client.
    await skopeoCopyToDir(`docker://${registry.host}/private/app:v1`, path.join(work.path, 'alice'), { creds: registry.creds() })
    await assert.rejects(skopeoCopyToDir(`docker://${registry.host}/private/app:v1`, path.join(work.path, 'anon'), { timeoutMs: 30_000 }))
  })

  test('anonymous callers can pull public/*', async () => {
    const anonymous = await registry.token('repository:public/app:pull')
    const res = await request(`${registry.url}/v2/public/app/blobs/${image.config.digest}`, { headers: { authorization: `Bearer ${anonymous}` } })
    assert.equal(res.statusCode, 200)
    assert.ok(Buffer.from(await res.body.arrayBuffer()).equals(readBlob(image, image.config.digest)))
    await skopeoCopyToDir(`docker://${registry.host}/public/app:v1`, path.join(work.path, 'public'))
    // Anonymous push is not granted.
    const push = await registry.token('repository:public/app:pull,push')
    const parts = push.split('.')
    const claims = JSON.parse(Buffer.from(parts[1] as string, 'base64url').toString('utf8')) as { access: Array<{ actions: string[] }> }
    assert.deepEqual(claims.access.map(a => a.actions), [['pull']])
  })
})
