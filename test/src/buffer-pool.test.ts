import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer, request, type IncomingMessage } from 'node:http'
import type { AddressInfo } from 'node:net'
import { test } from 'node:test'
import { BufferPool, giveBack, giveBackWhenWritten, isLent, lend } from '../../src/buffer-pool.ts'

test('a buffer goes back to the pool only when every lease on it is released', () => {
  const pool = new BufferPool(1024, 4)
  const first = pool.take(100)
  assert.equal(first.data.length, 100)
  const second = first.share()
  assert.ok(second !== undefined)
  first.release()
  assert.equal(pool.free, 0, 'still held by the share')
  const third = pool.take()
  assert.notEqual(third.data.buffer, first.data.buffer, 'a held buffer is not handed out again')
  second.release()
  assert.equal(pool.free, 1)
  const again = pool.take(1024)
  assert.equal(again.data.buffer, first.data.buffer, 'reused once free')
  assert.equal(pool.reused, 1)
  assert.equal(pool.allocated, 2)
})

test('releasing twice takes nobody else\'s share, and a released lease cannot be shared', () => {
  const pool = new BufferPool(64, 4)
  const a = pool.take()
  const b = a.share() as NonNullable<ReturnType<typeof a.share>>
  a.release()
  a.release()
  assert.equal(pool.free, 0, 'b still holds it')
  assert.equal(a.share(), undefined)
  assert.equal(a.held, false)
  assert.equal(b.held, true)
  b.release()
  assert.equal(pool.free, 1)
})

test('each lease has a view of its own, and lengths past the pool\'s size are never pooled', () => {
  const pool = new BufferPool(64, 1)
  const a = pool.take()
  const b = a.share() as NonNullable<ReturnType<typeof a.share>>
  assert.notEqual(a.data, b.data, 'told apart when lent down a stream')
  assert.equal(a.data.buffer, b.data.buffer)
  const big = pool.take(65)
  assert.equal(big.data.length, 65)
  big.release()
  assert.equal(pool.free, 0)
  a.release()
  b.release()
  // The free list is bounded.
  const c = pool.take()
  const d = pool.take()
  c.release()
  d.release()
  assert.equal(pool.free, 1)
})

test('a lent chunk is given back once; one never lent is ignored', () => {
  const chunk = Buffer.alloc(8)
  let released = 0
  lend(chunk, () => { released++ })
  assert.ok(isLent(chunk))
  giveBack(chunk)
  giveBack(chunk)
  giveBack(Buffer.alloc(8))
  giveBack(undefined)
  assert.equal(released, 1)
  assert.equal(isLent(chunk), false)
})

test('chunks written to an HTTP response are given back after the socket took them, with their bytes intact until then', async (t) => {
  const pool = new BufferPool(256 * 1024, 8)
  const expected: Buffer[] = []
  let given = 0
  let intact = true
  const server = createServer((_req, res) => {
    giveBackWhenWritten(res)
    res.writeHead(200, { 'content-length': 16 * 256 * 1024 })
    let i = 0
    const next = (): void => {
      while (i < 16) {
        const lease = pool.take()
        lease.data.fill(i)
        expected.push(Buffer.from(lease.data))
        const chunk = lease.data
        const fill = i
        lend(chunk, () => {
          // Nothing may have been written over it while the socket still had it.
          if (!chunk.every(b => b === fill)) intact = false
          given++
          lease.release()
        })
        i++
        if (!res.write(chunk)) {
          res.once('drain', next)
          return
        }
      }
      res.end()
    }
    next()
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(() => { server.close() })
  const res = await new Promise<IncomingMessage>((resolve, reject) => {
    request({ port: (server.address() as AddressInfo).port, host: '127.0.0.1' }, resolve).on('error', reject).end()
  })
  const got: Buffer[] = []
  for await (const c of res) {
    got.push(c as Buffer)
    // A slow reader: the server's socket fills and writes wait.
    await new Promise(resolve => setTimeout(resolve, 2))
  }
  assert.ok(Buffer.concat(got).equals(Buffer.concat(expected)))
  assert.equal(given, 16)
  assert.ok(intact)
  assert.ok(pool.reused > 0, 'buffers were reused while the response was under way')
})
