import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { readFile, readdir } from 'node:fs/promises'
import path from 'node:path'
import { test, type TestContext } from 'node:test'
import { BlobUnknownError, DeniedError, MirrorStatusError, UnauthorizedError } from '../../src/errors.ts'
import { createImageGetter, parseImageRef, type ImageGetter } from '../../cli/get/index.ts'
import { ALICE, startTokenOrigin, type TokenOrigin, type TokenOriginOptions } from '../helpers/token-origin.ts'
import { tmpDir } from '../helpers/tmp.ts'

// `get` talks to the peer, which hands the registry's 401 and challenge back
// unchanged; the stand-in here is both that peer and the registry's realm.

const BYTES = Buffer.from('a layer, small enough to read at a glance')
const DIGEST = `sha256:${createHash('sha256').update(BYTES).digest('hex')}`
const REF = parseImageRef(`harbor.example/team/app@${DIGEST}`)
const BLOB = `/v2/team/app/blobs/${DIGEST}`

async function setup (t: TestContext, options: TokenOriginOptions = {}, credentials?: { username: string, password: string }): Promise<{ peer: TokenOrigin, getter: ImageGetter, dir: string }> {
  const peer = await startTokenOrigin(options)
  const dir = await tmpDir('df-get-unit-')
  const getter = createImageGetter({}, { peer: peer.url, ...credentials })
  t.after(async () => {
    await getter.close()
    await peer.close()
    await dir.cleanup()
  })
  return { peer, getter, dir: dir.path }
}

test('a Bearer challenge is answered with a pull token from the realm, once per repository', async (t) => {
  const { peer, getter, dir } = await setup(t, {}, ALICE)
  peer.routes.set(BLOB, { status: 200, headers: { 'content-length': String(BYTES.length) }, body: BYTES })
  await getter.blob(REF, path.join(dir, 'one'))
  await getter.blob(REF, path.join(dir, 'two'))
  assert.ok((await readFile(path.join(dir, 'two'))).equals(BYTES))
  assert.deepEqual(peer.tokenRequests.map(r => ({ ...r, authorization: r.authorization?.split(' ')[0] })), [{ service: 'token "origin"', scope: 'repository:team/app:pull', authorization: 'Basic' }])
  // Written without a scheme, the registry goes as containerd names it (ns=): the peer's list gives the scheme.
  assert.deepEqual(peer.requests.map(r => [r.headers.authorization?.split(' ')[0], r.search, r.headers['x-dragonfly-registry']]), [
    ['Basic', '?ns=harbor.example', undefined], ['Bearer', '?ns=harbor.example', undefined], ['Bearer', '?ns=harbor.example', undefined]
  ])
  // Written with one, it goes in the header, scheme and all.
  await getter.blob(parseImageRef(`https://harbor.example/team/app@${DIGEST}`), path.join(dir, 'three'))
  const last = peer.requests.at(-1)
  assert.deepEqual([last?.search, last?.headers['x-dragonfly-registry']], ['', 'https://harbor.example'])
})

test('refused credentials, a refusing peer, an unknown blob and other statuses keep their messages', async (t) => {
  const refused = await setup(t, { tokenStatus: 401 })
  await assert.rejects(refused.getter.blob(REF, path.join(refused.dir, 'x')), (err: unknown) => err instanceof UnauthorizedError && err.message === 'harbor.example/team/app requires credentials')
  const wrong = await setup(t, { tokenStatus: 401 }, { username: 'alice', password: 'wrong' })
  await assert.rejects(wrong.getter.blob(REF, path.join(wrong.dir, 'x')), (err: unknown) => err instanceof UnauthorizedError && err.message === 'the registry refused the credentials of "alice" for harbor.example/team/app')

  const { peer, getter, dir } = await setup(t, { challenge: 'basic' }, ALICE)
  const body = (message: string): string => JSON.stringify({ errors: [{ code: 'X', message }] })
  const cases: Array<[number, Record<string, string>, (err: unknown) => boolean]> = [
    [404, {}, (err) => err instanceof BlobUnknownError],
    [403, { 'x-dragonfly-error-type': 'proxy' }, (err) => err instanceof DeniedError && err.message === `the peer at ${peer.url} refused harbor.example: why`],
    [403, {}, (err) => err instanceof DeniedError && err.message === 'the registry denied access to harbor.example/team/app: why'],
    [429, {}, (err) => err instanceof MirrorStatusError && err.status === 429 && /: why$/.test(err.message)],
    [502, {}, (err) => err instanceof MirrorStatusError && err.status === 502]
  ]
  for (const [status, headers, check] of cases) {
    peer.routes.set(BLOB, { status, headers: { 'content-type': 'application/json', ...headers }, body: body('why') })
    await assert.rejects(getter.blob(REF, path.join(dir, 'x')), check, `${status} ${JSON.stringify(headers)}`)
  }
  assert.deepEqual(await readdir(dir), [], 'nothing left behind')
})
