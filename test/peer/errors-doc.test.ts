import assert from 'node:assert/strict'
import { readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { STATUS } from '../../peer/mirror/errors.ts'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))

async function sources (dir: string): Promise<string[]> {
  const out: string[] = []
  for (const entry of await readdir(join(ROOT, dir), { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && entry.name.endsWith('.ts')) out.push(join(entry.parentPath, entry.name))
  }
  return out
}

async function documented (): Promise<Map<string, { status: string, oci: string }>> {
  const rows = new Map<string, { status: string, oci: string }>()
  for (const line of (await readFile(join(ROOT, 'docs', 'errors.md'), 'utf8')).split('\n')) {
    const m = /^\| `(DF_ERR_[A-Z_]+)` \| ([^|]+) \| ([^|]+) \|/.exec(line)
    if (m !== null) rows.set(m[1] as string, { status: (m[2] as string).trim(), oci: (m[3] as string).trim().replaceAll('`', '') })
  }
  return rows
}

test('every error code raised in the source is documented in docs/errors.md', async () => {
  const docs = await documented()
  const raised = new Set<string>()
  for (const dir of ['src', 'peer', 'scheduler', 'cli']) {
    for (const file of await sources(dir)) {
      for (const m of (await readFile(file, 'utf8')).matchAll(/'(DF_ERR_[A-Z_]+)'/g)) raised.add(m[1] as string)
    }
  }
  assert.ok(raised.size > 20, 'the scan found the codes')
  const missing = [...raised].filter(code => !docs.has(code))
  assert.deepEqual(missing, [], 'codes raised but not documented')
  const stale = [...docs.keys()].filter(code => !raised.has(code))
  assert.deepEqual(stale, [], 'codes documented but never raised')
})

test('the mirror answers each code with the status and OCI code the table gives', async () => {
  const docs = await documented()
  for (const [code, [status, oci]] of Object.entries(STATUS)) {
    const row = docs.get(code)
    assert.ok(row !== undefined, `${code} is mapped by the mirror but not documented`)
    assert.equal(row.status, String(status), `${code} status`)
    assert.equal(row.oci, oci, `${code} OCI code`)
  }
  for (const [code, row] of docs) {
    if (/^\d+$/.test(row.status)) assert.ok(STATUS[code] !== undefined, `${code} is documented with a status the mirror does not map`)
  }
})
