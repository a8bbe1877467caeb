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
