import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { execFileSync } from 'node:child_process'
import { mkdtemp, open, readdir, readlink, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { InvalidDigestError, PieceDigestMismatchError } from '../../src/errors.ts'
import { silentLogger } from '../../src/logger.ts'
import { createMetricsRegistry } from '../../src/metrics.ts'
import { MIB, pieceBounds } from '../../src/pieces.ts'
import { createPieceStore, type PieceStore } from '../../peer/piece-store/index.ts'

function blob (size: number): { data: Buffer, digest: string } {
  const data = randomBytes(size)
  return { data, digest: `sha256:${createHash('sha256').update(data).digest('hex')}` }
}

function piece (data: Buffer, i: number): Buffer {
  const { offset, length } = pieceBounds(i, data.length, MIB)
  return data.subarray(offset, offset + length)
}

async function withStore (fn: (make: (init?: { quotaBytes?: number, memoryCacheBytes?: number, ttlMs?: number }) => Promise<PieceStore>, dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'df-store-'))
  const opened: PieceStore[] = []
  try {
    await fn(async (init = {}) => {
      const store = createPieceStore({ logger: silentLogger(), metrics: createMetricsRegistry() }, { dataDir: dir, flushDelayMs: 5, ...init })
      await store.start()
      opened.push(store)
      return store
    }, dir)
  } finally {
    for (const s of opened) await s.stop()
    await rm(dir, { recursive: true, force: true })
  }
}

test('a blob nobody reads is checked whole in the background once its last piece lands', async () => {
  await withStore(async (make) => {
    const store = await make()
    const { data, digest } = blob(3 * MIB + 17)
    const verified: string[] = []
    const announced = new Promise<void>(resolve => { store.on('verified', d => { verified.push(d); resolve() }) })
    const info = store.track(digest, data.length)
    assert.equal(info.pieceCount, 4)
    for (let i = 0; i < 4; i++) assert.equal(await store.writePiece(digest, i, piece(data, i)), true)
    await announced
    assert.deepEqual(verified, [digest])
    assert.equal(store.info(digest)?.verified, true)
    const back = Buffer.concat(await Promise.all([0, 1, 2, 3].map(async i => await store.readPiece(digest, i) as Buffer)))
    assert.ok(back.equals(data))
  })
})

test('out-of-order pieces still end in a whole-blob check', async () => {
  await withStore(async (make) => {
    const store = await make({ memoryCacheBytes: 1 })
    const { data, digest } = blob(4 * MIB)
    store.track(digest, data.length)
    for (const i of [3, 1, 2, 0]) await store.writePiece(digest, i, piece(data, i))
    assert.equal(await store.verifyBlob(digest), true)
    assert.equal(store.info(digest)?.verified, true)
  })
})

test('a pinned blob waits for its reader to vouch for it; only the recorded table is accepted', async () => {
  await withStore(async (make) => {
    const store = await make()
    const { data, digest } = blob(2 * MIB)
    store.track(digest, data.length)
    const unpin = store.pin(digest)
    for (let i = 0; i < 2; i++) await store.writePiece(digest, i, piece(data, i))
    await new Promise(resolve => setTimeout(resolve, 50))
    assert.equal(store.info(digest)?.verified, false, 'no background pass while a reader holds the blob')
    const table = (pieces: Buffer[]): string => createHash('sha256').update(Buffer.concat(pieces.map(p => createHash('sha256').update(p).digest()))).digest('hex')
    assert.equal(store.attest(digest, table([piece(data, 0), randomBytes(MIB)])), false, 'another table vouches for other bytes')
    assert.equal(store.attest(digest, table([piece(data, 0), piece(data, 1)])), true)
    assert.equal(store.info(digest)?.verified, true)
    assert.equal(store.isTrusted(digest, 1), true)
    unpin()
  })
})

test('a pinned blob nobody vouches for is checked when its last pin goes', async () => {
  await withStore(async (make) => {
    const store = await make()
    const { data, digest } = blob(2 * MIB)
    store.track(digest, data.length)
    const unpin = store.pin(digest)
    for (let i = 0; i < 2; i++) await store.writePiece(digest, i, piece(data, i))
    const announced = new Promise<void>(resolve => { store.on('verified', () => { resolve() }) })
    unpin()
    await announced
    assert.equal(store.info(digest)?.verified, true)
  })
})

test('a blob whose bytes do not hash to its digest is removed when it completes', async () => {
  await withStore(async (make) => {
    const store = await make()
    const { data } = blob(2 * MIB)
    const wrong = `sha256:${'ab'.repeat(32)}`
    const tables: string[] = []
    const reported = new Promise<void>(resolve => { store.on('mismatch', (_d, table) => { tables.push(table); resolve() }) })
    store.track(wrong, data.length)
    await store.writePiece(wrong, 0, piece(data, 0))
    await store.writePiece(wrong, 1, piece(data, 1))
    await reported
    assert.equal(store.info(wrong), undefined)
    assert.equal(await store.verifyBlob(wrong), false)
  })
})

test('a piece that contradicts the copy already held is refused, and the copy kept', async () => {
  await withStore(async (make) => {
    const store = await make()
    const { data, digest } = blob(2 * MIB)
    store.track(digest, data.length)
    assert.equal(await store.writePiece(digest, 1, piece(data, 1), { source: 'peer' }), true)
    await assert.rejects(store.writePiece(digest, 1, randomBytes(MIB), { source: 'peer' }), PieceDigestMismatchError)
    assert.ok((await store.readPiece(digest, 1))?.equals(piece(data, 1)))
    assert.equal(store.pieceDigest(digest, 1), createHash('sha256').update(piece(data, 1)).digest('hex'))
  })
})

test('a restart keeps pieces and piece digests; a corrupted piece is caught on read and dropped', async () => {
  await withStore(async (make, dir) => {
    const { data, digest } = blob(3 * MIB)
    const first = await make()
    first.track(digest, data.length)
    for (let i = 0; i < 3; i++) await first.writePiece(digest, i, piece(data, i))
    assert.equal(await first.verifyBlob(digest), true)
    await first.stop()

    // Flip a byte of piece 1 on disk, as bit rot or a tampering hand would.
    const file = join(dir, 'blobs', 'sha256', digest.slice(7), 'data')
    const fh = await open(file, 'r+')
    await fh.write(Buffer.from([piece(data, 1)[10]! ^ 0xff]), 0, 1, MIB + 10)
    await fh.close()

    const second = await make()
    assert.equal(second.info(digest)?.verified, true)
    assert.ok((await second.readPiece(digest, 0))?.equals(piece(data, 0)))
    const removed: Array<number | undefined> = []
    second.on('removed', (_d, _reason, index) => removed.push(index))
    assert.equal(await second.readPiece(digest, 1), undefined)
    assert.deepEqual(removed, [1])
    assert.equal(second.hasPiece(digest, 1), false)
    assert.equal(second.info(digest)?.verified, false)
    // Re-fetched good bytes make it whole and verified again.
    await second.writePiece(digest, 1, piece(data, 1))
    assert.equal(await second.verifyBlob(digest), true)
  })
})

test('a verified blob streams from its file only over pieces this run checked, and stays pinned while it does', async () => {
  await withStore(async (make, dir) => {
    const { data, digest } = blob(3 * MIB + 5)
    const first = await make()
    first.track(digest, data.length)
    for (let i = 0; i < 4; i++) await first.writePiece(digest, i, piece(data, i))
    assert.equal(await first.openVerified(digest, 0, data.length - 1), undefined, 'not verified yet')
    assert.equal(await first.verifyBlob(digest), true)
    const whole = await first.openVerified(digest, 0, data.length - 1)
    assert.ok(whole !== undefined)
    assert.ok(Buffer.concat(await whole.toArray()).equals(data))
    const range = await first.openVerified(digest, MIB - 3, 2 * MIB + 3)
    assert.ok(range !== undefined)
    assert.ok(Buffer.concat(await range.toArray()).equals(data.subarray(MIB - 3, 2 * MIB + 4)))
    assert.equal(await first.openVerified(digest, 0, data.length), undefined, 'past the end')
    await first.stop()

    // Flip a byte of piece 2 on disk: after a restart nothing is checked, so no read may skip the check.
    const fh = await open(join(dir, 'blobs', 'sha256', digest.slice(7), 'data'), 'r+')
    await fh.write(Buffer.from([piece(data, 2)[7]! ^ 0xff]), 0, 1, 2 * MIB + 7)
    await fh.close()
    const second = await make({ memoryCacheBytes: 1 })
    assert.equal(second.info(digest)?.verified, true)
    assert.equal(await second.openVerified(digest, 0, MIB - 1), undefined, 'piece 0 not checked in this run')
    assert.ok((await second.readPiece(digest, 0))?.equals(piece(data, 0)))
    const checked = await second.openVerified(digest, 0, MIB - 1)
    assert.ok(checked !== undefined)
    assert.ok(Buffer.concat(await checked.toArray()).equals(piece(data, 0)))
    assert.equal(await second.openVerified(digest, 2 * MIB, 2 * MIB + 10), undefined)
    assert.equal(await second.readPiece(digest, 2), undefined, 'the flipped piece fails its check')
    assert.equal(await second.openVerified(digest, 0, MIB - 1), undefined, 'no longer verified whole')

    // An open stream pins its blob: the quota cannot evict it under the reader.
    await second.remove(digest, 'test')
    await second.stop()
    const other = blob(2 * MIB)
    const third = await make({ quotaBytes: 4 * MIB })
    const small = blob(MIB)
    third.track(small.digest, small.data.length)
    await third.writePiece(small.digest, 0, small.data)
    assert.equal(await third.verifyBlob(small.digest), true)
    const held = await third.openVerified(small.digest, 0, MIB - 1)
    assert.ok(held !== undefined)
    third.track(other.digest, other.data.length)
    for (let i = 0; i < 2; i++) await third.writePiece(other.digest, i, piece(other.data, i))
    const more = blob(2 * MIB)
    third.track(more.digest, more.data.length)
    for (let i = 0; i < 2; i++) await third.writePiece(more.digest, i, piece(more.data, i))
    assert.ok(third.info(small.digest) !== undefined, 'pinned by the open stream')
    assert.equal(third.info(other.digest), undefined, 'the unpinned one went instead')
    assert.ok(Buffer.concat(await held.toArray()).equals(small.data))
  })
})

test('a piece read into the caller\'s buffer is not kept: reusing that buffer changes no later read', async () => {
  await withStore(async (make) => {
    const { data, digest } = blob(2 * MIB)
    const first = await make()
    first.track(digest, data.length)
    for (let i = 0; i < 2; i++) await first.writePiece(digest, i, piece(data, i))
    assert.equal(await first.verifyBlob(digest), true)
    await first.stop()

    const store = await make()
    const into = Buffer.alloc(MIB)
    const got = await store.readPiece(digest, 1, { into })
    assert.ok(got !== undefined && got.buffer === into.buffer, 'read into the buffer given')
    assert.ok(got.equals(piece(data, 1)))
    into.fill(0)
    const again = await store.readPiece(digest, 1)
    assert.ok(again?.equals(piece(data, 1)), 'the reused buffer is not what a later read returns')
    // A buffer too small is left alone.
    const small = Buffer.alloc(10)
    assert.ok((await store.readPiece(digest, 0, { into: small }))?.equals(piece(data, 0)))
    assert.ok(small.equals(Buffer.alloc(10)))
  })
})

test('past the disk\'s high watermark the least recently used blobs go until it is under the low one; whoever filled the disk', async (t) => {
  // A real file system of a known size: a 16 MiB tmpfs (root only).
  const mnt = await mkdtemp(join(tmpdir(), 'df-gc-fs-'))
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', mnt], { stdio: 'pipe' })
  } catch (err) {
    await rm(mnt, { recursive: true, force: true })
    t.skip(`could not mount a tmpfs (root is needed): ${(err as Error).message.split('\n')[0] ?? ''}`)
    return
  }
  const opened: PieceStore[] = []
  try {
    const store = createPieceStore({ logger: silentLogger(), metrics: createMetricsRegistry() }, { dataDir: mnt, flushDelayMs: 5, diskHighWatermark: 0.5, diskLowWatermark: 0.4, gcIntervalMs: 3_600_000 })
    opened.push(store)
    await store.start()
    const blobs = [blob(2 * MIB), blob(2 * MIB), blob(2 * MIB)]
    for (const b of blobs) {
      store.track(b.digest, b.data.length)
      for (let i = 0; i < 2; i++) await store.writePiece(b.digest, i, piece(b.data, i))
    }
    await store.sweep()
    assert.equal(store.list().length, 3, '6 of 16 MiB: under the high watermark, nothing goes')
    // The oldest is read again: now the second is the least recently used.
    await store.readPiece(blobs[0]!.digest, 0)
    // Someone else fills the disk: 4 MiB more takes it to 10 of 16 MiB, past 50%.
    await writeFile(join(mnt, 'filler'), Buffer.alloc(4 * MIB, 1))
    const removed: string[] = []
    store.on('removed', (d) => removed.push(d))
    await store.sweep()
    // Under 40% (6.4 MiB) takes two of them: the second and the third, least recently used first.
    assert.deepEqual(removed, [blobs[1]!.digest, blobs[2]!.digest])
    assert.deepEqual(store.list().map(b => b.digest), [blobs[0]!.digest])
    assert.deepEqual(await readdir(join(mnt, 'blobs', 'sha256')), [blobs[0]!.digest.slice(7)], 'their files are gone from the disk')
  } finally {
    for (const s of opened) await s.stop()
    execFileSync('umount', [mnt])
    await rm(mnt, { recursive: true, force: true })
  }
})

test('blobs unused past the TTL go, unless a reader holds them', async () => {
  await withStore(async (make) => {
    const store = await make({ ttlMs: 200 })
    const old = blob(MIB)
    const held = blob(MIB)
    for (const b of [old, held]) {
      store.track(b.digest, b.data.length)
      await store.writePiece(b.digest, 0, b.data)
    }
    const unpin = store.pin(held.digest)
    await store.sweep()
    assert.equal(store.list().length, 2, 'young blobs stay')
    await new Promise(resolve => setTimeout(resolve, 300))
    await store.sweep()
    assert.deepEqual(store.list().map(b => b.digest), [held.digest], 'the pinned one stays')
    unpin()
    await store.readPiece(held.digest, 0)
    await store.sweep()
    assert.deepEqual(store.list().map(b => b.digest), [held.digest], 'a read makes it young again')
  })
})

test('the quota evicts the least recently used unpinned blob', async () => {
  await withStore(async (make, dir) => {
    const store = await make({ quotaBytes: 5 * MIB })
    const a = blob(2 * MIB)
    const b = blob(2 * MIB)
    const c = blob(2 * MIB)
    for (const x of [a, b]) {
      store.track(x.digest, x.data.length)
      for (let i = 0; i < 2; i++) await store.writePiece(x.digest, i, piece(x.data, i))
    }
    await store.readPiece(a.digest, 0) // a is now more recent than b
    const unpinA = store.pin(a.digest)
    store.track(c.digest, c.data.length)
    for (let i = 0; i < 2; i++) assert.equal(await store.writePiece(c.digest, i, piece(c.data, i)), true)
    assert.equal(store.info(b.digest), undefined, 'b was least recently used')
    assert.ok(store.info(a.digest) !== undefined)
    assert.ok(store.usage().bytes <= 5 * MIB)
    // With everything else pinned there is no room, and the store says so instead of overrunning.
    const unpinC = store.pin(c.digest)
    const d = blob(2 * MIB)
    store.track(d.digest, d.data.length)
    assert.equal(await store.writePiece(d.digest, 0, piece(d.data, 0)), true)
    assert.equal(await store.writePiece(d.digest, 1, piece(d.data, 1)), false)
    unpinA()
    unpinC()
    // The evicted blob's files are gone from disk too.
    await new Promise(resolve => setTimeout(resolve, 50))
    const dirs = await readdir(join(dir, 'blobs', 'sha256'))
    assert.equal(dirs.includes(b.digest.slice(7)), false)
    assert.equal(dirs.includes(a.digest.slice(7)), true)
  })
})

test('only well-formed digests become paths', async () => {
  await withStore(async (make, dir) => {
    const store = await make()
    for (const bad of ['sha256:../../etc/passwd', `sha256:${'A'.repeat(64)}`, `md5:${'a'.repeat(32)}`, 'sha256:', '../x']) {
      assert.throws(() => store.track(bad, 10), InvalidDigestError, bad)
    }
    const entries = await readdir(join(dir, 'blobs'))
    assert.deepEqual(entries, [])
    assert.ok((await stat(dir)).isDirectory())
  })
})

test('the empty blob verifies without any piece', async () => {
  await withStore(async (make) => {
    const store = await make()
    const digest = `sha256:${createHash('sha256').digest('hex')}`
    store.track(digest, 0)
    assert.equal(await store.verifyBlob(digest), true)
  })
})

test('reads and writes of a blob share one open data file, closed when the blob goes and when the store stops', async () => {
  await withStore(async (make, dir) => {
    // No memory cache: every read goes to the disk.
    const store = await make({ memoryCacheBytes: 1 })
    const openCount = async (digest: string): Promise<number> => {
      const file = join(dir, 'blobs', 'sha256', digest.slice(7), 'data')
      let n = 0
      for (const fd of await readdir('/proc/self/fd')) {
        const target = await readlink(join('/proc/self/fd', fd)).catch(() => '')
        if (target === file || target === `${file} (deleted)`) n++
      }
      return n
    }
    const a = blob(4 * MIB)
    const b = blob(2 * MIB)
    store.track(a.digest, a.data.length)
    store.track(b.digest, b.data.length)
    await Promise.all([0, 1, 2, 3].map(async i => store.writePiece(a.digest, i, piece(a.data, i))))
    for (let round = 0; round < 3; round++) {
      const got = await Promise.all([0, 1, 2, 3].map(async i => store.readPiece(a.digest, i)))
      got.forEach((p, i) => { assert.ok(p?.equals(piece(a.data, i))) })
    }
    assert.equal(await openCount(a.digest), 1, 'one descriptor for every read and write of the blob')
    await store.writePiece(b.digest, 0, piece(b.data, 0))
    assert.equal(await openCount(b.digest), 1)

    await store.remove(a.digest, 'test')
    assert.equal(await openCount(a.digest), 0, 'a removed blob keeps nothing open')
    await store.stop()
    assert.equal(await openCount(b.digest), 0, 'a stopped store keeps nothing open')
  })
})
