import assert from 'node:assert/strict'
import { test } from 'node:test'
import { authorizationFor, checkAuthorization, parsePiecePath, pieceUrlPath, uploadUrls } from '../../peer/swarm/piece-http.ts'

const digest = `sha256:${'ab'.repeat(32)}`
const secret = Buffer.from('a cluster secret of some length')

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

test('a request signed with the secret names its child; forged, altered or stale ones do not pass', () => {
  const request = { digest, index: 4, waitMs: 0 }
  const now = 1_800_000_000_000
  const header = authorizationFor(secret, 'child-id', 'parent-id', request, now)
  assert.equal(checkAuthorization(secret, 'parent-id', request, header, now + 1000), 'child-id')
  assert.equal(checkAuthorization(secret, 'other-parent', request, header, now), undefined, 'made for another parent')
  assert.equal(checkAuthorization(secret, 'parent-id', { ...request, index: 5 }, header, now), undefined, 'another piece')
  assert.equal(checkAuthorization(Buffer.from('another secret entirely!!'), 'parent-id', request, header, now), undefined, 'another secret')
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
