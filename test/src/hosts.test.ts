import assert from 'node:assert/strict'
import { test } from 'node:test'
import { canonicalHost, isDockerHub, parseHost, withoutDefaultPort } from '../../src/oci/hosts.ts'

const fail = (why: string): never => { throw new Error(why) }

test('Docker Hub\'s names are one registry, whose API is registry-1.docker.io', () => {
  for (const name of ['docker.io', 'index.docker.io', 'registry-1.docker.io', 'registry.hub.docker.com']) {
    assert.ok(isDockerHub(name), name)
    assert.equal(canonicalHost(name), 'registry-1.docker.io')
  }
  assert.equal(canonicalHost('docker.io:5000'), 'docker.io:5000')
  assert.equal(canonicalHost('ghcr.io'), 'ghcr.io')
})

test('host, host:port and IPv6 literals are split; everything else is refused with a reason', () => {
  assert.deepEqual(parseHost('harbor.example', fail), { hostname: 'harbor.example', port: undefined })
  assert.deepEqual(parseHost('127.0.0.1:5000', fail), { hostname: '127.0.0.1', port: 5000 })
  assert.deepEqual(parseHost('[::1]:5000', fail), { hostname: '::1', port: 5000 })
  assert.deepEqual(parseHost('[::1]', fail), { hostname: '::1', port: undefined })
  const bad: Array<[string, RegExp]> = [
    ['[::1', /unterminated IPv6 literal/],
    ['[::1]x', /malformed host/],
    ['[nothex]:5', /malformed IPv6 address/],
    ['', /malformed host/],
    [`${'a'.repeat(254)}`, /malformed host/],
    ['-lead.example', /malformed host name/],
    ['a..b', /malformed host name/],
    ['h:0', /port must be 1-65535/],
    ['h:65536', /port must be 1-65535/],
    ['h:12a', /port must be 1-65535/],
    ['h:', /port must be 1-65535/]
  ]
  for (const [value, why] of bad) assert.throws(() => parseHost(value, fail), why, value)
})

test('the scheme\'s default port is dropped, any other kept', () => {
  assert.equal(withoutDefaultPort('https', 'r.example:443'), 'r.example')
  assert.equal(withoutDefaultPort('http', 'r.example:80'), 'r.example')
  assert.equal(withoutDefaultPort('http', 'r.example:443'), 'r.example:443')
  assert.equal(withoutDefaultPort('https', '[::1]:443'), '[::1]')
  assert.equal(withoutDefaultPort('https', 'r.example:0443'), 'r.example:0443')
})
