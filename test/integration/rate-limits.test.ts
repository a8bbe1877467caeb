import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { after, before, describe, test } from 'node:test'
import { request } from 'undici'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { tmpDir } from '../helpers/tmp.ts'

// Bandwidth limits on what a peer takes in, with real processes: from the
// origin ("back to source"), from everywhere (download), and for prefetch.
// Only lower bounds on time are asserted: a limit can make a transfer slower
// than its rate allows on a busy machine, never faster.

const MIB = 1024 * 1024
// Far below what loopback gives even on a loaded machine, so the limit and not the machine sets the pace.
const RATE = 2 * MIB
const BURST = 256 * 1024

async function timedGet (url: string, headers: Record<string, string> = {}): Promise<{ ms: number, status: number, digest: string, bytes: number }> {
  const started = performance.now()
  const res = await request(url, { headers })
  const hash = createHash('sha256')
  let bytes = 0
  for await (const chunk of res.body) {
    hash.update(chunk as Buffer)
    bytes += (chunk as Buffer).length
  }
  return { ms: performance.now() - started, status: res.statusCode, digest: `sha256:${hash.digest('hex')}`, bytes }
}

describe('bandwidth limits on what a peer takes in', () => {
  let registry: TestRegistry
  let scheduler: TestScheduler
  let image: BuiltImage
  let work: { path: string, cleanup: () => Promise<void> }
  const peers: TestPeer[] = []

  before(async () => {
    work = await tmpDir('df-rate-it-')
    registry = await startRegistry()
    scheduler = await startScheduler()
    image = await buildImage(path.join(work.path, 'image'), { layers: [8 * MIB, 8 * MIB + 5], seed: 'rate-limits', tag: 'v1' })
    await pushImage(image, `${registry.host}/rate/app:v1`)
  })

  after(async () => {
    for (const p of peers) await p.close()
    await scheduler?.close()
    await registry?.close()
    await work?.cleanup()
  })

  const peer = async (name: string, args: string[] = []): Promise<TestPeer> => {
    const p = await startPeer({ registry: registry.url, scheduler: scheduler.address, name, args })
    peers.push(p)
    return p
  }
  const waited = async (p: TestPeer, limit: string): Promise<number> => (await p.metrics()).get('damselfly_rate_limit_wait_seconds_total', { limit })

  test('--origin-rate-limit: a cold pull from the registry takes at least size ÷ rate', async () => {
    const layer = image.layers[0] as { digest: string, size: number }
    const limited = await peer('origin-limited', ['--origin-rate-limit', '2MiB'])
    const got = await timedGet(`${limited.url}/v2/rate/app/blobs/${layer.digest}`)
    assert.equal(got.status, 200)
    assert.equal(got.digest, layer.digest)
    // The bucket starts with a burst.
    const floor = (layer.size - BURST) / RATE * 1000
    assert.ok(got.ms >= floor * 0.95, `8 MiB from the origin in ${Math.round(got.ms)} ms, under the ${Math.round(floor)} ms the limit allows`)
    assert.ok(await waited(limited, 'origin') > 2, 'the wait shows in damselfly_rate_limit_wait_seconds_total{limit="origin"}')
    assert.equal(await waited(limited, 'download'), 0, 'download is unlimited here')
  })

  test('--download-rate-limit: pieces from a peer wait too', async () => {
    const layer = image.layers[0] as { digest: string, size: number }
    const parent = await peer('parent')
    assert.equal((await timedGet(`${parent.url}/v2/rate/app/blobs/${layer.digest}`)).digest, layer.digest)
    const child = await peer('download-limited', ['--download-rate-limit', '2MiB'])
    const got = await timedGet(`${child.url}/v2/rate/app/blobs/${layer.digest}`)
    assert.equal(got.digest, layer.digest)
    // A piece is paid for once it is in: the first whole piece comes before any wait.
    const floor = (layer.size - MIB) / RATE * 1000
    assert.ok(got.ms >= floor * 0.95, `8 MiB in ${Math.round(got.ms)} ms, under the ${Math.round(floor)} ms the limit allows`)
    const m = await child.metrics()
    assert.ok(m.get('damselfly_fetched_bytes_total', { source: 'peer' }) >= layer.size / 2, 'most of it came from the parent')
    assert.ok(m.get('damselfly_rate_limit_wait_seconds_total', { limit: 'download' }) > 2)
  })

  test('--prefetch-rate-limit: a prefetch fills the cache slowly; the range the client asked for does not wait for it', async () => {
    const layer = image.layers[1] as { digest: string, size: number }
    const limited = await peer('prefetch-limited', ['--prefetch-rate-limit', '2MiB'])
    const url = `${limited.url}/v2/rate/app/blobs/${layer.digest}`
    const range = await request(url, { headers: { range: 'bytes=0-1048575', 'x-dragonfly-prefetch': 'true' } })
    assert.equal(range.statusCode, 206)
    assert.ok(Buffer.from(await range.body.arrayBuffer()).equals(readBlob(image, layer.digest).subarray(0, MIB)))
    const started = performance.now()
    await waitFor(async () => {
      const whole = (await limited.metrics()).get('damselfly_fetched_bytes_total')
      return whole >= layer.size
    }, { timeoutMs: 60_000, what: 'the prefetch to fill the cache' })
    const ms = performance.now() - started
    // 8 MiB at 2 MiB/s, less the burst and the piece the range already took.
    assert.ok(ms >= 2_500, `the prefetch took ${Math.round(ms)} ms`)
    assert.ok(await waited(limited, 'prefetch') > 2, 'the prefetch waited on its limit')
    const whole = await timedGet(url)
    assert.equal(whole.digest, layer.digest)
  })
})
