import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { request } from 'node:http'
import { test, type TestContext } from 'node:test'
import { silentLogger } from '../../src/logger.ts'
import { MIB } from '../../src/pieces.ts'
import type { P2PNode } from '../../src/p2p/index.ts'
import { TokenBucket } from '../../src/rate.ts'
import { pieceUrlPath } from '../../peer/swarm/piece-http.ts'
import { createUploadServer } from '../../peer/upload/index.ts'
import { TaskRegistry } from '../../peer/upload/tasks.ts'
import { freePorts } from '../helpers/ports.ts'

const digest = `sha256:${'cd'.repeat(32)}`

/** An upload server on loopback holding two pieces, sending at `bytesPerSecond`. */
async function server (t: TestContext, onePerPiece: boolean, bytesPerSecond: number): Promise<{ get: (index: number) => Promise<{ status: number, bytes: number }> }> {
  const pieces = [randomBytes(MIB), randomBytes(MIB)]
  const [port] = await freePorts(1) as [number]
  const node = { peerId: 'parent', addrs: () => [`/ip4/127.0.0.1/tcp/${port}`], handle: async () => {} } as unknown as P2PNode
  const uploads = createUploadServer({
    logger: silentLogger(),
    node,
    supply: {
      async held (_digest, index) { return pieces[index] },
      whenLanded: () => undefined,
      async fetch () { throw new Error('not sent to the origin') },
      task: () => undefined
    },
    tasks: new TaskRegistry(),
    sentFor: () => false,
    rate: new TokenBucket(bytesPerSecond, { burst: 256 * 1024 })
  }, { http: { host: '127.0.0.1', port }, onePerPiece })
  await uploads.start()
  t.after(() => { uploads.stop() })
  const get = async (index: number): Promise<{ status: number, bytes: number }> => new Promise((resolve, reject) => {
    request({ host: '127.0.0.1', port, path: pieceUrlPath(digest, index, 0) }, (res) => {
      let bytes = 0
      res.on('data', (c: Buffer) => { bytes += c.length })
      res.on('end', () => { resolve({ status: res.statusCode ?? 0, bytes }) })
    }).on('error', reject).end()
  })
  return { get }
}

test('a seed sends a piece to one child at a time: a second child asking meanwhile is told busy, another piece is not held up', async (t) => {
  // 1 MiB at 1 MiB/s: the first send takes about a second.
  const { get } = await server(t, true, MIB)
  const first = get(0)
  await new Promise(resolve => setTimeout(resolve, 200))
  const [second, other] = await Promise.all([get(0), get(1)])
  assert.equal(second.status, 503, 'the same piece, while it is on its way to the first child')
  assert.equal(other.status, 200, 'a different piece')
  assert.equal(other.bytes, MIB)
  assert.deepEqual(await first, { status: 200, bytes: MIB })
  // Once the first send is done, the piece goes to whoever asks.
  assert.deepEqual(await get(0), { status: 200, bytes: MIB })
})

test('any other node sends a piece to every child that asks', async (t) => {
  const { get } = await server(t, false, 4 * MIB)
  const [a, b] = await Promise.all([get(0), get(0)])
  assert.deepEqual(a, { status: 200, bytes: MIB })
  assert.deepEqual(b, { status: 200, bytes: MIB })
})
