import assert from 'node:assert/strict'
import { Readable } from 'node:stream'
import { test } from 'node:test'
import { BlobUnknownError, DeniedError, ManifestUnknownError, OriginProtocolError, TooManyRequestsError, UnauthorizedError } from '../../src/errors.ts'
import { readBounded } from '../../src/oci/response.ts'
import { ociErrorMessage, refusalError } from '../../src/oci/status.ts'

const words = { unauthorized: 'who are you', denied: 'no' }

test('refusals by status; other statuses are the caller\'s to judge', () => {
  const challenged = refusalError(401, { headers: { 'www-authenticate': ['Bearer realm="r"', 'Basic'] } }, words)
  assert.ok(challenged instanceof UnauthorizedError && challenged.challenge === 'Bearer realm="r"' && challenged.message === 'who are you')
  assert.ok(refusalError(403, { headers: {} }, words) instanceof DeniedError)
  assert.ok(refusalError(404, { headers: {} }, { ...words, digest: 'sha256:x' }) instanceof BlobUnknownError)
  const manifest = refusalError(404, { headers: {} }, { ...words, manifest: 'r/a:v1' })
  assert.ok(manifest instanceof ManifestUnknownError && manifest.message === 'manifest r/a:v1 is unknown to the origin')
  assert.equal(refusalError(429, { headers: {} }, words), undefined, 'a 429 is a refusal only for a client that names it')
  const limited = refusalError(429, { headers: { 'retry-after': '3' } }, { ...words, rateLimited: 'slow down' })
  assert.ok(limited instanceof TooManyRequestsError && limited.retryAfter === '3')
  for (const status of [200, 400, 500, 503]) assert.equal(refusalError(status, { headers: {} }, words), undefined, String(status))
})

test('OCI error bodies give their first message, other bodies their text', () => {
  assert.equal(ociErrorMessage(Buffer.from('{"errors":[{"code":"DENIED","message":"not yours"},{"message":"x"}]}')), 'not yours')
  assert.equal(ociErrorMessage(Buffer.from('{"errors":[]}')), undefined)
  assert.equal(ociErrorMessage(Buffer.from(`  ${'e'.repeat(300)} `)), 'e'.repeat(200))
  assert.equal(ociErrorMessage(Buffer.alloc(0)), undefined)
})

test('bounded reads refuse a longer body, or cut it short when asked, and destroy it either way', async () => {
  assert.equal((await readBounded(Readable.from([Buffer.from('abc'), Buffer.from('def')]), 6)).toString(), 'abcdef')
  const long = Readable.from([Buffer.from('abc'), Buffer.from('def'), Buffer.from('ghi')])
  await assert.rejects(readBounded(long, 5), OriginProtocolError)
  assert.ok(long.destroyed)
  const cut = Readable.from([Buffer.from('abc'), Buffer.from('def')])
  assert.equal((await readBounded(cut, 4, { truncate: true })).toString(), 'abc')
  assert.ok(cut.destroyed)
})
