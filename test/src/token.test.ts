import assert from 'node:assert/strict'
import { test } from 'node:test'
import { OriginProtocolError } from '../../src/errors.ts'
import { parseChallenge } from '../../src/oci/challenge.ts'
import { basicAuthorization, parsePullToken, pullTokenUrl } from '../../src/oci/token.ts'

test('challenges: the scheme lowercased, quoted (with escapes) and bare parameters', () => {
  assert.deepEqual(parseChallenge('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"'), {
    scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull' }
  })
  assert.deepEqual(parseChallenge('Bearer realm="r", Service="a \\"b\\"", error=insufficient_scope'), { scheme: 'bearer', params: { realm: 'r', service: 'a "b"', error: 'insufficient_scope' } })
  assert.deepEqual(parseChallenge('Basic realm="registry"'), { scheme: 'basic', params: { realm: 'registry' } })
  assert.equal(parseChallenge(undefined), undefined)
  assert.equal(parseChallenge(''), undefined)
})

test('the token URL is the realm with the service and a pull scope for one repository', () => {
  const url = pullTokenUrl(parseChallenge('Bearer realm="https://auth.example/token?x=1",service="reg"'), 'team/app')
  assert.equal(url?.toString(), 'https://auth.example/token?x=1&service=reg&scope=repository%3Ateam%2Fapp%3Apull')
  assert.equal(pullTokenUrl(parseChallenge('Basic realm="registry"'), 'team/app'), undefined, 'Basic takes credentials as they are')
  assert.equal(pullTokenUrl(parseChallenge('Bearer service="reg"'), 'team/app'), undefined, 'no realm, nowhere to ask')
  assert.equal(pullTokenUrl(undefined, 'team/app'), undefined)
  assert.throws(() => pullTokenUrl(parseChallenge('Bearer realm="not a url"'), 'a'), (err: unknown) => err instanceof OriginProtocolError && /not a URL/.test(err.message))
  assert.throws(() => pullTokenUrl(parseChallenge('Bearer realm="file:///etc/passwd"'), 'a'), (err: unknown) => err instanceof OriginProtocolError && /not an http\(s\) URL/.test(err.message))
})

test('token answers: token, else access_token; anything else is the registry\'s fault', () => {
  assert.deepEqual(parsePullToken(Buffer.from('{"token":"t","expires_in":300}')), { authorization: 'Bearer t', expiresIn: 300 })
  assert.deepEqual(parsePullToken(Buffer.from('{"token":"","access_token":"a"}')), { authorization: 'Bearer a', expiresIn: undefined })
  for (const body of ['not json', 'null', '{}', '{"token":7}']) assert.throws(() => parsePullToken(Buffer.from(body)), OriginProtocolError, body)
  assert.equal(basicAuthorization('alice', 'pw:with:colons'), `Basic ${Buffer.from('alice:pw:with:colons').toString('base64')}`)
})
