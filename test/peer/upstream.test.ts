import assert from 'node:assert/strict'
import { test } from 'node:test'
import { InvalidRegistryError, RegistryNotAllowedError } from '../../src/errors.ts'
import { createUpstreamSelector, parseRegistryUrl } from '../../peer/upstream/index.ts'

test('header, then ns, then the default; unlisted registries only when allowed, and then untrusted', () => {
  const s = createUpstreamSelector({ defaultRegistry: 'http://127.0.0.1:5000', registries: ['http://harbor.local:8080', 'https://ghcr.io'], allowUnlisted: true })
  assert.equal(s.select('https://ghcr.io', 'quay.io').origin, 'https://ghcr.io')
  assert.equal(s.select('https://ghcr.io', 'quay.io').trusted, true)
  assert.equal(s.select(undefined, 'quay.io').origin, 'https://quay.io')
  assert.equal(s.select(undefined, 'quay.io').trusted, false)
  assert.equal(s.select('', 'quay.io').origin, 'https://quay.io')
  assert.equal(s.select(undefined, undefined).origin, 'http://127.0.0.1:5000')
  assert.equal(s.select(undefined, undefined).trusted, true)
  // ns carries no scheme: hosts we know keep theirs, others are https.
  assert.equal(s.select(undefined, 'harbor.local:8080').origin, 'http://harbor.local:8080')
  assert.equal(s.select(undefined, 'harbor.local:8080').trusted, true)
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

test('by default only configured registries are admitted, matched on scheme, host and port', () => {
  const s = createUpstreamSelector({ defaultRegistry: 'http://127.0.0.1:5000', registries: ['https://docker.io'] })
  assert.equal(s.select(undefined, 'docker.io').host, 'registry-1.docker.io')
  assert.equal(s.select('https://index.docker.io', undefined).trusted, true)
  assert.equal(s.select('http://127.0.0.1:5000/', undefined).trusted, true)
  for (const header of ['https://evil.example', 'http://127.0.0.1:5001', 'https://127.0.0.1:5000', 'http://169.254.169.254']) {
    assert.throws(() => s.select(header, undefined), RegistryNotAllowedError, header)
  }
  for (const ns of ['169.254.169.254', '127.0.0.1:5001', 'quay.io', '127.0.0.1']) {
    assert.throws(() => s.select(undefined, ns), RegistryNotAllowedError, ns)
  }
  assert.throws(() => s.parseUrl('https://evil.example'), RegistryNotAllowedError)
})

test('requireTrusted refuses unlisted registries even where they may be passed through', () => {
  const s = createUpstreamSelector({ defaultRegistry: 'http://127.0.0.1:5000', allowUnlisted: true })
  assert.equal(s.requireTrusted('http://127.0.0.1:5000').trusted, true)
  assert.throws(() => s.requireTrusted('https://evil.example'), RegistryNotAllowedError)
  assert.equal(s.parseUrl('https://evil.example').trusted, false)
})
