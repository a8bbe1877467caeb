import assert from 'node:assert/strict'
import { test } from 'node:test'
import { InvalidRegistryError, RegistryNotAllowedError } from '../../src/errors.ts'
import { createUpstreamSelector, parseRegistryUrl } from '../../peer/upstream/index.ts'

test('header, then ns, then the default', () => {
  const s = createUpstreamSelector({ defaultRegistry: 'http://127.0.0.1:5000', registries: ['http://harbor.local:8080'] })
  assert.equal(s.select('https://ghcr.io', 'quay.io').origin, 'https://ghcr.io')
  assert.equal(s.select(undefined, 'quay.io').origin, 'https://quay.io')
  assert.equal(s.select('', 'quay.io').origin, 'https://quay.io')
  assert.equal(s.select(undefined, undefined).origin, 'http://127.0.0.1:5000')
  // ns carries no scheme: hosts we know keep theirs, others are https.
  assert.equal(s.select(undefined, 'harbor.local:8080').origin, 'http://harbor.local:8080')
  assert.equal(s.select(undefined, '127.0.0.1:5000').origin, 'http://127.0.0.1:5000')
})

test('Docker Hub has one identity whatever it is called', () => {
  for (const name of ['https://docker.io', 'https://index.docker.io/', 'https://registry-1.docker.io']) {
    assert.equal(parseRegistryUrl(name).origin, 'https://registry-1.docker.io')
  }
  const s = createUpstreamSelector({ defaultRegistry: 'https://docker.io' })
  assert.equal(s.select(undefined, 'docker.io').origin, 'https://registry-1.docker.io')
  assert.equal(s.default.host, 'registry-1.docker.io')
})

test('default ports are dropped and IPv6 literals kept', () => {
  assert.equal(parseRegistryUrl('https://r.example:443').origin, 'https://r.example')
  assert.equal(parseRegistryUrl('http://r.example:80').origin, 'http://r.example')
  assert.equal(parseRegistryUrl('http://[::1]:5000').origin, 'http://[::1]:5000')
  assert.equal(parseRegistryUrl('HTTPS://R.Example').origin, 'https://r.example')
})

test('anything but http(s)://host[:port] is a 400', () => {
  const bad = ['ftp://r.example', 'file:///etc/passwd', 'gopher://x', 'r.example', '//r.example', 'http://', 'http://user:pw@r.example',
    'http://r.example/v2/', 'http://r.example?x=1', 'http://r.example:0', 'http://r.example:65536', 'http://r.example:12a',
    'http://-bad-.example', 'http://a..b', 'http://[::1', 'http://[nothex]:5', `http://${'a'.repeat(600)}.com`, 'http://exa mple.com', 'javascript:alert(1)']
  for (const value of bad) assert.throws(() => parseRegistryUrl(value), InvalidRegistryError, value)
  const s = createUpstreamSelector({ defaultRegistry: 'http://127.0.0.1:5000' })
  assert.throws(() => s.select(undefined, 'bad host'), InvalidRegistryError)
  assert.throws(() => s.select(undefined, 'r.example/../x'), InvalidRegistryError)
})

test('an allow-list turns every other upstream away', () => {
  const s = createUpstreamSelector({ defaultRegistry: 'http://127.0.0.1:5000', allowedHosts: ['127.0.0.1:5000', 'docker.io'] })
  assert.equal(s.select(undefined, 'docker.io').host, 'registry-1.docker.io')
  assert.throws(() => s.select('https://evil.example', undefined), RegistryNotAllowedError)
  assert.throws(() => s.select(undefined, '169.254.169.254'), RegistryNotAllowedError)
})
