import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test, type TestContext } from 'node:test'
import { BufferPool, giveBack, isLent } from '../../src/buffer-pool.ts'
import { StorageError } from '../../src/errors.ts'
import { PooledFileStream } from '../../peer/piece-store/file-stream.ts'

async function file (t: TestContext, data: Buffer): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'df-filestream-'))
  t.after(async () => { await rm(dir, { recursive: true, force: true }) })
  const path = join(dir, 'data')
  await writeFile(path, data)
  return path
}

test('a range of a file comes out exact, in lent chunks that are reused once given back', async (t) => {
  const data = randomBytes(3 * 1024 * 1024 + 123)
  const path = await file(t, data)
  const pool = new BufferPool(64 * 1024, 4)
  for (const [start, end] of [[0, data.length - 1], [17, 1_000_000], [65_536, 65_536 * 2 - 1], [5, 5]] as Array<[number, number]>) {
    const stream = new PooledFileStream(await open(path, 'r'), start, end, pool)
    const got: Buffer[] = []
    for await (const chunk of stream) {
      assert.ok(isLent(chunk))
      got.push(Buffer.from(chunk as Buffer))
      giveBack(chunk)
    }
    assert.ok(Buffer.concat(got).equals(data.subarray(start, end + 1)), `bytes ${start}-${end}`)
  }
  assert.ok(pool.reused > pool.allocated, `reused ${pool.reused}, allocated ${pool.allocated}`)
})

test('chunks nobody gives back are left alone: what a slow consumer holds is never overwritten', async (t) => {
  const data = randomBytes(1024 * 1024)
  const path = await file(t, data)
  const pool = new BufferPool(64 * 1024, 4)
  const stream = new PooledFileStream(await open(path, 'r'), 0, data.length - 1, pool)
  const held: Buffer[] = []
  for await (const chunk of stream) held.push(chunk as Buffer)
  assert.ok(Buffer.concat(held).equals(data))
  assert.equal(pool.reused, 0)
})

test('a file shorter than the range fails the stream; destroying it closes the file', async (t) => {
  const data = randomBytes(100_000)
  const path = await file(t, data)
  const pool = new BufferPool(64 * 1024, 4)
  const short = new PooledFileStream(await open(path, 'r'), 0, 200_000, pool)
  await assert.rejects(async () => { for await (const chunk of short) giveBack(chunk) }, StorageError)
  const fh = await open(path, 'r')
  const stream = new PooledFileStream(fh, 0, data.length - 1, pool)
  const closed = new Promise(resolve => stream.once('close', resolve))
  const first: unknown = await new Promise(resolve => stream.once('data', resolve))
  giveBack(first)
  stream.destroy()
  await closed
  await assert.rejects(fh.stat(), /closed|EBADF/)
})
