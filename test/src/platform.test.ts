import assert from 'node:assert/strict'
import { test } from 'node:test'
import { formatPlatform, matchesPlatform, parsePlatform, pickPlatform } from '../../src/oci/platform.ts'

const index = [
  { digest: 'amd64', platform: { os: 'linux', architecture: 'amd64' } },
  { digest: 'arm-v7', platform: { os: 'linux', architecture: 'arm', variant: 'v7' } },
  { digest: 'arm64-v8', platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
  { digest: 'attestation', platform: { os: 'unknown', architecture: 'unknown' } },
  { digest: 'none' }
]

test('os/arch[/variant] and nothing else', () => {
  assert.deepEqual(parsePlatform('linux/arm64'), { os: 'linux', architecture: 'arm64', variant: undefined })
  assert.deepEqual(parsePlatform(' linux/arm/v7 '), { os: 'linux', architecture: 'arm', variant: 'v7' })
  for (const bad of ['arm64', 'linux/arm/v7/x', 'Linux/amd64', 'linux//v7', '', `linux/${'a'.repeat(33)}`]) assert.equal(parsePlatform(bad), undefined, bad)
  assert.equal(formatPlatform({ os: 'linux', architecture: 'arm', variant: 'v7' }), 'linux/arm/v7')
  assert.equal(formatPlatform({ os: 'linux', architecture: 'amd64' }), 'linux/amd64')
})

test('a platform without a variant takes any variant; one with a variant only that one', () => {
  const want = (value: string): { os: string, architecture: string, variant?: string | undefined } => parsePlatform(value) as { os: string, architecture: string }
  assert.equal(pickPlatform(index, want('linux/arm64'))?.digest, 'arm64-v8')
  assert.equal(pickPlatform(index, want('linux/arm64/v8'))?.digest, 'arm64-v8')
  assert.equal(pickPlatform(index, want('linux/arm64/v9')), undefined)
  assert.equal(pickPlatform(index, want('linux/amd64/v2')), undefined, 'an entry without a variant does not have v2')
  assert.deepEqual(index.filter(d => matchesPlatform(d.platform, want('linux/arm'))).map(d => d.digest), ['arm-v7'])
  assert.equal(matchesPlatform(undefined, want('linux/amd64')), false)
})
