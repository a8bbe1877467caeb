import assert from 'node:assert/strict'
import { writeFile } from 'node:fs/promises'
import path from 'node:path'
import { test } from 'node:test'
import { loadSchedulerConfig, SchedulerConfig, settingsOf } from '../../src/config/index.ts'
import { tmpDir } from '../helpers/tmp.ts'

const TOKEN = 'a-scheduler-api-token-123'

test('api.token has the usual three names and defaults to an open API', () => {
  const setting = settingsOf(SchedulerConfig).find(s => s.key === 'api.token')
  assert.equal(setting?.flag, 'api-token')
  assert.equal(setting?.env, 'DAMSELFLY_API_TOKEN')
  assert.equal(loadSchedulerConfig({}).apiToken, '')
  assert.equal(loadSchedulerConfig({ env: { DAMSELFLY_API_TOKEN: TOKEN } }).apiToken, TOKEN)
  assert.equal(loadSchedulerConfig({ flags: { 'api-token': TOKEN } }).apiToken, TOKEN)
})

test('api.tokenFile is read and trimmed; a short token, spaces, or both keys are refused naming the key', async (t) => {
  const dir = await tmpDir('df-sched-config-')
  t.after(async () => { await dir.cleanup() })
  const file = path.join(dir.path, 'token')
  await writeFile(file, `${TOKEN}\n`)
  assert.equal(loadSchedulerConfig({ flags: { 'api-token-file': file } }).apiToken, TOKEN)
  assert.throws(() => loadSchedulerConfig({ flags: { 'api-token': 'short' } }), /api\.token: must be at least 16 characters/)
  assert.throws(() => loadSchedulerConfig({ flags: { 'api-token': 'has a space in the middle' } }), /api\.token: must be printable ASCII without spaces/)
  assert.throws(() => loadSchedulerConfig({ flags: { 'api-token': TOKEN, 'api-token-file': file } }), /api\.tokenFile: set either/)
  assert.throws(() => loadSchedulerConfig({ flags: { 'api-token-file': path.join(dir.path, 'missing') } }), /api\.tokenFile: cannot read/)
})

test('state is memory by default, or a redis URL; its password comes from a file, never the URL', async (t) => {
  const dir = await tmpDir('df-sched-state-')
  t.after(async () => { await dir.cleanup() })
  assert.equal(loadSchedulerConfig({}).state, 'memory')
  const setting = settingsOf(SchedulerConfig).find(s => s.key === 'state')
  assert.equal(setting?.flag, 'state')
  assert.equal(setting?.env, 'DAMSELFLY_STATE')
  assert.equal(loadSchedulerConfig({ flags: { state: 'redis://redis.internal:6379/2' } }).state, 'redis://redis.internal:6379/2')
  assert.equal(loadSchedulerConfig({ flags: { state: 'redis://scheduler@redis.internal:6379' } }).statePassword, undefined)
  for (const bad of ['redis', 'http://redis:6379', 'redis://', 'redis://host:6379/zero', 'postgres://db/x']) {
    assert.throws(() => loadSchedulerConfig({ flags: { state: bad } }), /^.*state: expected memory, or redis:\/\/\[user@\]host:port\[\/db\] \(rediss:\/\/ for TLS\)/, bad)
  }
  assert.throws(() => loadSchedulerConfig({ flags: { state: 'redis://user:hunter2@redis:6379' } }), /state: the URL holds a password: put it in statePasswordFile/)
  const password = path.join(dir.path, 'password')
  await writeFile(password, 'a-redis-password\n')
  assert.equal(loadSchedulerConfig({ flags: { state: 'redis://redis:6379', 'state-password-file': password } }).statePassword, 'a-redis-password')
  assert.throws(() => loadSchedulerConfig({ flags: { state: 'redis://redis:6379', 'state-password-file': path.join(dir.path, 'missing') } }), /statePasswordFile: cannot read/)
  const ca = path.join(dir.path, 'ca.pem')
  await writeFile(ca, '-----BEGIN CERTIFICATE-----\n')
  assert.equal(loadSchedulerConfig({ flags: { state: 'rediss://redis:6380', 'state-ca-file': ca } }).stateCa, '-----BEGIN CERTIFICATE-----\n')
  assert.throws(() => loadSchedulerConfig({ flags: { state: 'redis://redis:6379', 'state-ca-file': ca } }), /stateCaFile: a CA bundle is for a TLS connection/)
})
