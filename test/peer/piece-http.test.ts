import assert from 'node:assert/strict'
import { createSecretKey, randomBytes } from 'node:crypto'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { test } from 'node:test'
import { authorizationFor, checkAuthorization, createPieceHttpClient, parsePiecePath, pieceUrlPath, uploadUrls } from '../../peer/swarm/piece-http.ts'

const digest = `sha256:${'ab'.repeat(32)}`
const SECRET = 'a cluster secret of some length'
const secret = createSecretKey(Buffer.from(SECRET))

test('piece paths round-trip and anything else is refused', () => {
  assert.deepEqual(parsePiecePath(pieceUrlPath(digest, 17, 60_000)), { digest, index: 17, waitMs: 60_000 })
  assert.deepEqual(parsePiecePath(`/damselfly/v1/pieces/${digest}/3`), { digest, index: 3, waitMs: 0 })
  for (const bad of [
    `/damselfly/v1/pieces/${digest}/-1`,
    `/damselfly/v1/pieces/${digest}/1?wait=999999`,
    '/damselfly/v1/pieces/sha256:zz/1',
    `/damselfly/v1/pieces/${digest}/../../etc/passwd`,
    `/v2/x/blobs/${digest}`
  ]) assert.equal(parsePiecePath(bad), undefined, bad)
})

test('a run\'s count round-trips, is signed, and is bounded', () => {
  assert.deepEqual(parsePiecePath(pieceUrlPath(digest, 17, 0, 4)), { digest, index: 17, waitMs: 0, count: 4 })
  assert.deepEqual(parsePiecePath(pieceUrlPath(digest, 17, 0, 1)), { digest, index: 17, waitMs: 0 }, 'a run of one is a plain request')
  for (const bad of [`/damselfly/v1/pieces/${digest}/1?wait=0&count=17`, `/damselfly/v1/pieces/${digest}/1?wait=0&count=0`, `/damselfly/v1/pieces/${digest}/1?count=2`]) assert.equal(parsePiecePath(bad), undefined, bad)
  const now = 1_800_000_000_000
  const header = authorizationFor(secret, 'child-id', 'parent-id', { digest, index: 4, waitMs: 0, count: 4 }, now)
  assert.equal(checkAuthorization(secret, 'parent-id', { digest, index: 4, waitMs: 0, count: 4 }, header, now), 'child-id')
  assert.equal(checkAuthorization(secret, 'parent-id', { digest, index: 4, waitMs: 0, count: 16 }, header, now), undefined, 'another count')
  assert.equal(checkAuthorization(secret, 'parent-id', { digest, index: 4, waitMs: 0 }, header, now), undefined, 'no count')
})

test('each secret signs for itself, however often either was used before', () => {
  const now = 1_800_000_000_000
  const request = { digest, index: 2, waitMs: 0 }
  const other = createSecretKey(Buffer.alloc(SECRET.length, 7))
  const mine = authorizationFor(secret, 'child-id', 'parent-id', request, now)
  const theirs = authorizationFor(other, 'child-id', 'parent-id', request, now)
  assert.notEqual(mine, theirs)
  for (let i = 0; i < 3; i++) {
    assert.equal(checkAuthorization(secret, 'parent-id', request, mine, now), 'child-id')
    assert.equal(checkAuthorization(other, 'parent-id', request, theirs, now), 'child-id')
    assert.equal(checkAuthorization(secret, 'parent-id', request, theirs, now), undefined, 'signed under another secret')
    assert.equal(checkAuthorization(other, 'parent-id', request, mine, now), undefined, 'signed under another secret')
    assert.equal(checkAuthorization(createSecretKey(Buffer.from(SECRET)), 'parent-id', request, mine, now), 'child-id', 'an equal secret in another key')
  }
})

test('a parent from before runs (its upload port has no such path) is asked again for the one piece, and from then on for one at a time', async (t) => {
  const piece = randomBytes(4096)
  const paths: string[] = []
  // What an upload port before runs answers: the old path or a 404 saying it is none.
  const old = /^\/damselfly\/v1\/pieces\/sha256:[0-9a-f]{64}\/\d{1,8}(?:\?wait=\d{1,6})?$/
  const server = createServer((req, res) => {
    paths.push(req.url ?? '')
    res.setHeader('x-damselfly-peer', 'old-parent')
    if (!old.test(req.url ?? '')) {
      const body = Buffer.from(JSON.stringify({ status: 'refused', message: 'not a piece path' }))
      res.writeHead(404, { 'content-type': 'application/json', 'content-length': body.length }).end(body)
      return
    }
    res.writeHead(200, { 'content-length': piece.length }).end(piece)
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const client = createPieceHttpClient({ self: 'child' })
  t.after(async () => { await client.close(); server.closeAllConnections(); await new Promise(resolve => server.close(resolve)) })
  const parent = { peerId: 'old-parent', upload: [`http://127.0.0.1:${(server.address() as AddressInfo).port}`] }
  for (const index of [0, 4]) {
    const got = await client.fetch(parent, { digest, index, waitMs: 0, count: 3 }, [4096, 4096, 4096], { signal: AbortSignal.timeout(5_000) })
    assert.equal(got.length, 1)
    assert.ok(got[0]?.data.equals(piece))
  }
  assert.deepEqual(paths, [pieceUrlPath(digest, 0, 0, 3), pieceUrlPath(digest, 0, 0), pieceUrlPath(digest, 4, 0)])
})

test('a request signed with the secret names its child; forged, altered or stale ones do not pass', () => {
  const request = { digest, index: 4, waitMs: 0 }
  const now = 1_800_000_000_000
  const header = authorizationFor(secret, 'child-id', 'parent-id', request, now)
  assert.equal(checkAuthorization(secret, 'parent-id', request, header, now + 1000), 'child-id')
  assert.equal(checkAuthorization(secret, 'other-parent', request, header, now), undefined, 'made for another parent')
  assert.equal(checkAuthorization(secret, 'parent-id', { ...request, index: 5 }, header, now), undefined, 'another piece')
  assert.equal(checkAuthorization(createSecretKey(Buffer.from('another secret entirely!!')), 'parent-id', request, header, now), undefined, 'another secret')
  assert.equal(checkAuthorization(secret, 'parent-id', request, header, now + 10 * 60_000), undefined, 'too old')
  assert.equal(checkAuthorization(secret, 'parent-id', request, undefined, now), undefined)
  assert.equal(checkAuthorization(secret, 'parent-id', request, 'Damselfly-Piece child-id 1 zz', now), undefined)
})

test('upload URLs come from the listen addresses, wildcard dropped and loopback last', () => {
  assert.deepEqual(uploadUrls([
    '/ip4/127.0.0.1/tcp/4000/p2p/x',
    '/ip4/0.0.0.0/tcp/4000',
    '/ip4/10.1.2.3/tcp/4000/p2p/x',
    '/ip6/fd00::5/tcp/4000',
    '/dns4/node-a.example/tcp/4000',
    '/ip4/10.1.2.3/tcp/4000'
  ], 4002), ['http://10.1.2.3:4002', 'http://[fd00::5]:4002', 'http://node-a.example:4002', 'http://127.0.0.1:4002'])
})
