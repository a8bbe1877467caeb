import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net'
import { test } from 'node:test'
import { PeerBusyError, PeerUnavailableError, ProtocolError } from '../../src/errors.ts'
import { PieceConnectionPool, answerError, busyHints } from '../../peer/swarm/piece-client.ts'

/**
 * The piece client against a raw TCP server that answers whatever each test
 * scripts: a well-behaved upload port, and the ways a hostile or broken one
 * can answer. The client reads a body straight into the piece's buffer, so
 * what matters is that it never takes more or fewer bytes than the response
 * declared, never lets one response's bytes leak into the next, and never
 * hangs.
 */

type Script = (socket: Socket, request: string) => void

async function rawServer (script: Script): Promise<{ base: string, server: Server, connections: () => number, close: () => Promise<void> }> {
  let connections = 0
  const sockets = new Set<Socket>()
  const server = createServer((socket) => {
    connections++
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.on('error', () => {})
    let pending = ''
    socket.on('data', (chunk) => {
      pending += chunk.toString('latin1')
      let end
      while ((end = pending.indexOf('\r\n\r\n')) >= 0) {
        const request = pending.slice(0, end)
        pending = pending.slice(end + 4)
        script(socket, request)
      }
    })
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    server,
    connections: () => connections,
    close: async () => {
      for (const s of sockets) s.destroy()
      await new Promise(resolve => server.close(resolve))
    }
  }
}

const ok = (body: Buffer, extra = ''): Buffer => Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\ncontent-length: ${body.length}\r\nx-damselfly-peer: parent\r\n${extra}\r\n`), body])
const signal = (): AbortSignal => AbortSignal.timeout(10_000)

/** Sends a response in odd-sized writes, one per turn: headers and body split anywhere. */
function dribble (socket: Socket, bytes: Buffer): void {
  let off = 0
  const step = (): void => {
    if (off >= bytes.length) return
    const size = 1 + Math.floor(Math.random() * 70_000)
    socket.write(bytes.subarray(off, off + size))
    off += size
    setImmediate(step)
  }
  step()
}

test('bodies arrive whole and exact, over one kept-alive connection, however the bytes are split', async (t) => {
  const pieces = [randomBytes(1 << 20), randomBytes(12345), randomBytes(1 << 20)]
  let n = 0
  const srv = await rawServer((socket) => {
    dribble(socket, ok(pieces[n++ % pieces.length] as Buffer))
  })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  for (const expected of [...pieces, ...pieces]) {
    const res = await pool.get(srv.base, '/p', {}, expected.length, signal())
    assert.equal(res.status, 200)
    assert.equal(res.peer, 'parent')
    assert.ok(res.body?.equals(expected))
  }
  assert.equal(srv.connections(), 1, 'one connection, reused')
})

test('a run of pieces arrives back to back, each in a buffer of its own, however the bytes are split; a parent may send fewer, never more', async (t) => {
  // A short last piece, as a blob's last piece is: its end falls inside a socket read.
  const run = [randomBytes(1 << 20), randomBytes(1 << 20), randomBytes(777)]
  let n = 0
  const srv = await rawServer((socket) => {
    n++
    const sent = n === 2 ? run.slice(0, 2) : run
    dribble(socket, ok(Buffer.concat(sent), `x-damselfly-pieces: ${sent.length}\r\n`))
  })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  const lengths = run.map(x => x.length)
  const whole = await pool.get(srv.base, '/p', {}, lengths, signal())
  assert.ok(whole.body?.equals(run[0] as Buffer))
  assert.equal(whole.rest?.length, 2)
  assert.ok(whole.rest?.every((x, k) => x.data.equals(run[k + 1] as Buffer)))
  const fewer = await pool.get(srv.base, '/p', {}, lengths, signal())
  assert.ok(fewer.body?.equals(run[0] as Buffer))
  assert.deepEqual(fewer.rest?.map(x => x.data.length), [1 << 20])
  // Asked for two, the parent offers three: refused before a byte of them is taken.
  await assert.rejects(pool.get(srv.base, '/p', {}, lengths.slice(0, 2), signal()), ProtocolError)
  const after = await pool.get(srv.base, '/p', {}, lengths, signal())
  assert.ok(after.rest?.[1]?.data.equals(run[2] as Buffer))
  assert.equal(srv.connections(), 2, 'the connection that offered too many was closed; the others reused')
})

test('a run whose declared length does not match its pieces, or whose piece count is malformed, is refused', async (t) => {
  const piece = randomBytes(4096)
  let n = 0
  const srv = await rawServer((socket) => {
    n++
    if (n === 1) socket.write(ok(Buffer.concat([piece, piece.subarray(0, 4000)]), 'x-damselfly-pieces: 2\r\n'))
    else if (n === 2) socket.write(ok(Buffer.concat([piece, piece]), 'x-damselfly-pieces: two\r\n'))
    else if (n === 3) socket.write(ok(Buffer.concat([piece, piece]), 'x-damselfly-pieces: 0\r\n'))
    else socket.write(ok(Buffer.concat([piece, piece]), 'x-damselfly-pieces: 2\r\n'))
  })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  for (let k = 0; k < 3; k++) await assert.rejects(pool.get(srv.base, '/p', {}, [4096, 4096, 4096], signal()), ProtocolError)
  const good = await pool.get(srv.base, '/p', {}, [4096, 4096, 4096], signal())
  assert.ok(good.body?.equals(piece) && good.rest?.[0]?.data.equals(piece))
})

test('a body longer or shorter than the piece is refused, and nothing of it reaches the next request', async (t) => {
  const good = randomBytes(4096)
  let n = 0
  const srv = await rawServer((socket) => {
    n++
    if (n === 1) socket.write(ok(randomBytes(4097)))
    else if (n === 2) socket.end(Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\ncontent-length: 4096\r\nx-damselfly-peer: parent\r\n\r\n'), randomBytes(100)]))
    else if (n === 3) socket.write(Buffer.concat([ok(good), randomBytes(64)]))
    else socket.write(ok(good))
  })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  await assert.rejects(pool.get(srv.base, '/p', {}, 4096, signal()), ProtocolError, 'declared a different length')
  await assert.rejects(pool.get(srv.base, '/p', {}, 4096, signal()), PeerUnavailableError, 'stopped short')
  // The third answers the piece and then bytes nobody asked for.
  await assert.rejects(pool.get(srv.base, '/p', {}, 4096, signal()), ProtocolError, 'bytes past the body')
  await new Promise(resolve => setTimeout(resolve, 50))
  const fourth = await pool.get(srv.base, '/p', {}, 4096, signal())
  assert.ok(fourth.body?.equals(good), 'the stray bytes did not become the start of the next body')
  assert.ok(srv.connections() >= 3)
})

test('answers the protocol does not use are refused; error bodies are bounded', async (t) => {
  const answers = [
    'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-damselfly-peer: parent\r\n\r\n',
    'HTTP/1.1 200 OK\r\nx-damselfly-peer: parent\r\n\r\n',
    'HTTP/1.1 200 OK\r\ncontent-length: 10\r\ncontent-length: 11\r\n\r\n',
    'SSH-2.0-OpenSSH\r\n\r\n',
    `HTTP/1.1 404 Not Found\r\ncontent-length: 100000\r\n\r\n${'x'.repeat(100)}`,
    `HTTP/1.1 200 OK\r\n${'x-filler: y\r\n'.repeat(3000)}\r\n`
  ]
  let n = 0
  const srv = await rawServer((socket) => { socket.write(answers[n++] as string) })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  for (const answer of answers) await assert.rejects(pool.get(srv.base, '/p', {}, 10, signal()), ProtocolError, answer.slice(0, 40))
})

test('a refusal sent chunked (as older peers do) still comes back as its status; the connection is not reused', async (t) => {
  const srv = await rawServer((socket) => {
    socket.write('HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\nx-damselfly-peer: parent\r\n\r\n16\r\n{"status":"not-found"}\r\n0\r\n\r\n')
  })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  assert.equal((await pool.get(srv.base, '/p', {}, 10, signal())).status, 404)
  assert.equal((await pool.get(srv.base, '/p', {}, 10, signal())).status, 404)
  assert.equal(srv.connections(), 2)
})

test('a non-200 answer comes back with its status and words', async (t) => {
  const srv = await rawServer((socket) => {
    const body = '{"status":"busy"}'
    socket.write(`HTTP/1.1 503 Service Unavailable\r\ncontent-length: ${body.length}\r\nx-damselfly-peer: parent\r\n\r\n${body}`)
  })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  const res = await pool.get(srv.base, '/p', {}, 1 << 20, signal())
  assert.equal(res.status, 503)
  assert.equal(res.text, '{"status":"busy"}')
  assert.equal(res.body, undefined)
})

test('a kept-alive connection the server closed is replaced once; a server that never answers is given up on', async (t) => {
  const body = randomBytes(1000)
  let silent = false
  const srv = await rawServer((socket) => {
    if (silent) return
    socket.write(ok(body))
    // Close the idle connection the way a server's keep-alive timeout does.
    setTimeout(() => socket.end(), 20)
  })
  const pool = new PieceConnectionPool()
  t.after(async () => { pool.close(); await srv.close() })
  assert.ok((await pool.get(srv.base, '/p', {}, 1000, signal())).body?.equals(body))
  await new Promise(resolve => setTimeout(resolve, 100))
  assert.ok((await pool.get(srv.base, '/p', {}, 1000, signal())).body?.equals(body), 'the closed connection was not held against us')
  silent = true
  const started = Date.now()
  await assert.rejects(pool.get(srv.base, '/p', {}, 1000, AbortSignal.timeout(300)), (err: Error) => err.name === 'TimeoutError')
  assert.ok(Date.now() - started < 2_000)
})

test('connections to one address are bounded; waiting requests proceed in turn or leave when aborted', async (t) => {
  const held: Socket[] = []
  const srv = await rawServer((socket) => { held.push(socket) })
  const pool = new PieceConnectionPool({ perAddress: 2, maxWaiting: 1 })
  t.after(async () => { pool.close(); await srv.close() })
  const a = pool.get(srv.base, '/p', {}, 3, signal())
  const b = pool.get(srv.base, '/p', {}, 3, signal())
  const leaving = new AbortController()
  const c = pool.get(srv.base, '/p', {}, 3, leaving.signal)
  await assert.rejects(pool.get(srv.base, '/p', {}, 3, signal()), /already wait/, 'the waiting room is full')
  while (held.length < 2) await new Promise(resolve => setTimeout(resolve, 10))
  assert.equal(srv.connections(), 2)
  leaving.abort()
  await assert.rejects(c)
  const d = pool.get(srv.base, '/p', {}, 3, signal())
  for (const s of held.splice(0)) s.write(ok(Buffer.from('abc')))
  assert.equal((await a).status, 200)
  assert.equal((await b).status, 200)
  while (held.length < 1) await new Promise(resolve => setTimeout(resolve, 10))
  held[0]?.write(ok(Buffer.from('xyz')))
  assert.equal((await d).body?.toString(), 'xyz')
})

test('a body that keeps coming, however slowly, is read whole; one that stops, or never starts, fails once quiet for the stall time', async (t) => {
  const body = randomBytes(64 * 1024)
  const srv = await rawServer((socket, request) => {
    const bytes = ok(body)
    if (request.includes('/slow')) {
      // 16 writes 150 ms apart: 2.4 s in all, longer than the stall time, never quiet that long.
      let off = 0
      const step = (): void => {
        const next = Math.min(bytes.length, off + Math.ceil(bytes.length / 16))
        socket.write(bytes.subarray(off, next))
        off = next
        if (off < bytes.length) setTimeout(step, 150)
      }
      step()
    } else if (request.includes('/stops')) {
      socket.write(bytes.subarray(0, 1000))
    }
    // '/never': no answer at all.
  })
  t.after(async () => { await srv.close() })
  const pool = new PieceConnectionPool()
  t.after(() => { pool.close() })
  const stall = { firstByteMs: 700, idleMs: 700 }
  const slow = await pool.get(srv.base, '/slow', {}, body.length, signal(), stall)
  assert.ok(slow.body?.equals(body), 'the slow body arrives whole')
  for (const path of ['/stops', '/never']) {
    const started = performance.now()
    await assert.rejects(pool.get(srv.base, path, {}, body.length, signal(), stall), (err: Error) => err instanceof PeerUnavailableError && /for 700 ms/.test(err.message))
    const ms = performance.now() - started
    assert.ok(ms >= 650 && ms < 5_000, `${path} failed after ${Math.round(ms)} ms`)
  }
})

test('a busy answer brings the peers it names; a malformed list, or hints on any other answer, bring none', () => {
  const named = { status: 'busy', try: [{ peerId: 'childA', upload: ['http://10.0.0.7:4003'] }] }
  const err = answerError({ status: 503, peer: 'parent', body: undefined, text: JSON.stringify(named) }, 'parent', 3)
  assert.ok(err instanceof PeerBusyError)
  assert.deepEqual(err.hints, named.try)
  assert.deepEqual(busyHints(JSON.stringify({ status: 'busy', try: [{ peerId: 'childA', upload: ['http://10.0.0.7:4003/elsewhere'] }] })), [], 'an address with a path')
  assert.deepEqual(busyHints(JSON.stringify({ status: 'busy', try: Array.from({ length: 5 }, (_, i) => ({ peerId: `c${i}`, upload: [`http://10.0.0.${i}:4003`] })) })), [], 'more than four')
  assert.deepEqual(busyHints(JSON.stringify({ status: 'not-found', try: named.try })), [])
  assert.deepEqual(busyHints('{"status":"busy"'), [])
  assert.deepEqual(busyHints(JSON.stringify({ status: 'busy' })), [])
})
