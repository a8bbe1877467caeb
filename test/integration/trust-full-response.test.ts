import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { mkdir, statfs } from 'node:fs/promises'
import { createServer, type Server } from 'node:http'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { request } from 'undici'
import { startPeer, type TestPeer } from '../helpers/peer.ts'
import { run } from '../helpers/process.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

/*
 * Attack 6 (notes/trust-contract.md, "Whole-digest checks whatever the cache
 * does"): a configured registry sends a blob whose bytes do not hash to the
 * digest it is asked for (the right size, one byte changed). A peer checks the
 * whole digest before the last byte leaves only while its cache holds the
 * whole blob; with a cache smaller than the blob, or a data dir that is full,
 * does the client get a complete 200 of bytes that are not the blob?
 */

const MIB = 1024 * 1024
const SIZE = 8 * MIB + 4321

function sha256 (data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

interface LyingRegistry {
  url: string
  /** Requests seen, as "METHOD path range". */
  seen: string[]
  /** Serves `bytes` under `digest`, whatever they hash to. */
  put: (digest: string, bytes: Buffer) => void
  close: () => Promise<void>
}

/** A registry that answers /v2/ and blob HEAD/GET (ranges too) with whatever bytes it was given. */
async function startLyingRegistry (): Promise<LyingRegistry> {
  const blobs = new Map<string, Buffer>()
  const seen: string[] = []
  const server: Server = createServer((req, res) => {
    seen.push(`${req.method ?? ''} ${req.url ?? ''} ${req.headers.range ?? ''}`)
    if (req.url === '/v2/' || req.url === '/v2') {
      res.writeHead(200, { 'content-type': 'application/json', 'docker-distribution-api-version': 'registry/2.0' }).end('{}')
      return
    }
    const m = /^\/v2\/(.+)\/blobs\/(sha256:[0-9a-f]{64})$/.exec(req.url ?? '')
    const data = m === null ? undefined : blobs.get(m[2] as string)
    if (m === null || data === undefined || (req.method !== 'GET' && req.method !== 'HEAD')) {
      res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ errors: [{ code: 'BLOB_UNKNOWN', message: 'blob unknown' }] }))
      return
    }
    const headers = { 'content-type': 'application/octet-stream', 'docker-content-digest': m[2] as string, 'accept-ranges': 'bytes' }
    const r = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '')
    if (r !== null) {
      const start = Number(r[1])
      const end = Math.min(r[2] === '' ? data.length - 1 : Number(r[2]), data.length - 1)
      if (start > end) {
        res.writeHead(416, { 'content-range': `bytes */${data.length}` }).end()
        return
      }
      res.writeHead(206, { ...headers, 'content-length': end - start + 1, 'content-range': `bytes ${start}-${end}/${data.length}` })
      res.end(req.method === 'HEAD' ? undefined : data.subarray(start, end + 1))
      return
    }
    res.writeHead(200, { ...headers, 'content-length': data.length })
    res.end(req.method === 'HEAD' ? undefined : data)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  return {
    url: `http://127.0.0.1:${port}`,
    seen,
    put: (digest, bytes) => { blobs.set(digest, bytes) },
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => { resolve() }))
    }
  }
}

interface FullGet { status: number, declared: number, received: number, sha256: string, error: string | undefined }

/** A full blob GET as a client sees it: status, Content-Length, what arrived, and how it ended. */
async function fullGet (peer: TestPeer, repo: string, digest: string): Promise<FullGet> {
  const res = await request(`${peer.url}/v2/${repo}/blobs/${digest}`, { signal: AbortSignal.timeout(60_000) })
  const hash = createHash('sha256')
  let received = 0
  let error: string | undefined
  try {
    for await (const chunk of res.body) {
      hash.update(chunk as Buffer)
      received += (chunk as Buffer).length
    }
  } catch (err) {
    const e = err as { code?: string, message: string }
    error = e.code ?? e.message
  }
  return { status: res.statusCode, declared: Number(res.headers['content-length'] ?? -1), received, sha256: `sha256:${hash.digest('hex')}`, error }
}

function show (g: FullGet): string {
  return `${g.status}, Content-Length ${g.declared}, ${g.received} bytes received${g.error === undefined ? ', ended cleanly' : `, ended with ${g.error}`}, body ${g.sha256.slice(0, 19)}…`
}

describe('whole-digest checks whatever the cache does (attack 6)', () => {
  let registry: LyingRegistry
  let work: TmpDir
  let tmpfs: string | undefined
  let tmpfsSkip: string | undefined
  const peers: Array<{ peer: TestPeer, what: string }> = []
  const real = randomBytes(SIZE)
  const badDigest = sha256(real)
  const lie = Buffer.from(real)
  lie[5 * MIB + 3] = (lie[5 * MIB + 3] as number) ^ 0x01
  const good = randomBytes(SIZE)
  const goodDigest = sha256(good)

  before(async () => {
    work = await tmpDir('df-trust-full-')
    registry = await startLyingRegistry()
    registry.put(badDigest, lie)
    registry.put(goodDigest, good)
    peers.push({ peer: await startPeer({ registry: registry.url, name: 'small-cache', args: ['--cache-size', '1MiB'] }), what: '--cache-size 1MiB' })
    const dir = path.join(work.path, 'tmpfs')
    await mkdir(dir)
    try {
      await run('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', dir], { timeoutMs: 10_000 })
      tmpfs = dir
    } catch (err) {
      tmpfsSkip = `could not mount a 2 MiB tmpfs (root is needed): ${(err as Error).message.split('\n')[0] ?? ''}`
    }
    if (tmpfs !== undefined) peers.push({ peer: await startPeer({ registry: registry.url, name: 'full-disk', dataDir: tmpfs }), what: 'data dir on a 2 MiB tmpfs' })
    peers.push({ peer: await startPeer({ registry: registry.url, name: 'normal' }), what: 'default cache' })
  })

  after(async () => {
    await Promise.allSettled(peers.map(async ({ peer }) => { await peer.close() }))
    if (tmpfs !== undefined) await run('umount', [tmpfs], { timeoutMs: 30_000 }).catch(async () => run('umount', ['-l', tmpfs as string]))
    await registry?.close()
    await work?.cleanup()
  })

  test('a correct blob: every peer answers a complete 200 with the right bytes', async (t) => {
    if (tmpfsSkip !== undefined) t.diagnostic(tmpfsSkip)
    const figures: string[] = []
    for (const { peer, what } of peers) {
      const got = await fullGet(peer, 'trust/good', goodDigest)
      figures.push(`${what}: ${show(got)}`)
      assert.equal(got.status, 200, `${what}: ${show(got)}`)
      assert.equal(got.error, undefined, `${what}: ${show(got)}`)
      assert.equal(got.received, SIZE, `${what}: ${show(got)}`)
      assert.equal(got.sha256, goodDigest, `${what}: ${show(got)}`)
    }
    if (tmpfs !== undefined) {
      const fs = await statfs(tmpfs)
      figures.push(`tmpfs free after the pull: ${fs.bavail * fs.bsize} of ${fs.blocks * fs.bsize} bytes`)
    }
    t.diagnostic(figures.join(' | '))
  })

  test('bytes that do not hash to the digest: no peer ever completes a 200 with all Content-Length bytes', async (t) => {
    if (tmpfsSkip !== undefined) t.diagnostic(tmpfsSkip)
    const figures: string[] = []
    const completed: string[] = []
    for (const { peer, what } of peers) {
      // Twice: the second read may find the pieces in the cache or in memory.
      for (const attempt of ['first', 'second']) {
        const got = await fullGet(peer, 'trust/bad', badDigest)
        figures.push(`${what}, ${attempt} GET: ${show(got)}`)
        if (got.status === 200 && got.error === undefined && got.received === got.declared) completed.push(`${what} (${attempt} GET)`)
        assert.notEqual(got.sha256, badDigest, 'the lying registry never sent the real blob')
      }
    }
    t.diagnostic(figures.join(' | '))
    assert.deepEqual(completed, [], `complete 200s of bytes that are not ${badDigest}: ${figures.join(' | ')}`)
    assert.ok(registry.seen.some((s) => s.startsWith('GET') && s.includes(badDigest)), 'the peers fetched the blob from the configured registry')
  })
})
