import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { get } from 'node:http'
import path from 'node:path'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { portOf } from '../../bench/lib.ts'
import { spawnProcess, type Spawned } from '../helpers/process.ts'
import { tmpDir } from '../helpers/tmp.ts'

/**
 * The bare relay is the floor the relaying child's CPU is read against, so
 * it must do the work it is credited with: a piece that does not match its
 * table entry never reaches the reader, and the response is cut short.
 */
const MIB = 1024 * 1024
const script = (name: string): string => fileURLToPath(new URL(`../../bench/${name}`, import.meta.url))

async function read (url: string): Promise<{ bytes: Buffer, complete: boolean }> {
  return new Promise((resolve, reject) => {
    get(url, res => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('error', () => {})
      res.on('close', () => { resolve({ bytes: Buffer.concat(chunks), complete: res.complete }) })
    }).on('error', reject)
  })
}

test('the bare relay passes a blob on whole and verified, and cuts a response at a piece that does not match', async () => {
  const work = await tmpDir('df-relay-floor-test-')
  const running: Spawned[] = []
  const start = async (name: string, args: string[]): Promise<number> => {
    const p = spawnProcess(process.execPath, [script(name), ...args])
    running.push(p)
    return portOf(p, name)
  }
  try {
    const good = randomBytes(3 * MIB + 12345)
    const bad = Buffer.from(good)
    // A byte of piece 2 changed: pieces 0 and 1 may go out, piece 2 and after must not.
    bad[2 * MIB + 7] = (bad[2 * MIB + 7] as number) ^ 0xff
    const goodFile = path.join(work.path, 'good')
    const badFile = path.join(work.path, 'bad')
    await writeFile(goodFile, good)
    await writeFile(badFile, bad)

    const honest = await start('plain-server.ts', [goodFile])
    const relay = await start('relay-floor.ts', [goodFile, `127.0.0.1:${honest}`])
    const whole = await read(`http://127.0.0.1:${relay}/blob`)
    assert.equal(whole.complete, true)
    assert.equal(createHash('sha256').update(whole.bytes).digest('hex'), createHash('sha256').update(good).digest('hex'))

    // The table is the good file's; the parent sends the bad one.
    const lying = await start('plain-server.ts', [badFile])
    const checked = await start('relay-floor.ts', [goodFile, `127.0.0.1:${lying}`])
    const cut = await read(`http://127.0.0.1:${checked}/blob`)
    assert.equal(cut.complete, false)
    assert.ok(cut.bytes.length <= 2 * MIB, `${cut.bytes.length} bytes reached the reader, past the first bad piece`)
    assert.deepEqual(cut.bytes, good.subarray(0, cut.bytes.length))
  } finally {
    for (const p of running) await p.stop()
    await work.cleanup()
  }
})
