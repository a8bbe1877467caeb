import { createReadStream } from 'node:fs'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { buildImage, pushImage, type BuiltImage } from '../../test/helpers/image.ts'
import { startPeer, startScheduler, type TestPeer } from '../../test/helpers/peer.ts'
import { run } from '../../test/helpers/process.ts'
import { startRegistry } from '../../test/helpers/registry.ts'
import { startThrottleProxy, type ThrottleProxy } from '../../test/helpers/throttle.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
import { MIB, deployedPeerEnv, pullImage, round, type Row, type Scenario } from '../lib.ts'

/**
 * N peers pull the same cold image at once through their own mirrors, the
 * origin throttled. Each N runs twice: with the swarm (one scheduler) and
 * without it (every peer alone with its embedded scheduler, so each goes to
 * the origin — what a plain pull-through cache per node costs).
 */
export const distribution: Scenario = {
  name: 'distribution',
  async run ({ quick, log }) {
    const sizes = quick ? [16 * MIB, 10 * MIB, 6 * MIB] : [96 * MIB, 80 * MIB, 48 * MIB, 32 * MIB]
    // For looking into one case by hand: DAMSELFLY_BENCH_COUNTS=16 DAMSELFLY_BENCH_MIB=64.
    const counts = process.env.DAMSELFLY_BENCH_COUNTS?.split(',').map(Number) ?? (quick ? [1, 4] : [1, 4, 8, 16])
    const scale = process.env.DAMSELFLY_BENCH_MIB === undefined ? 1 : Number(process.env.DAMSELFLY_BENCH_MIB) * MIB / sizes.reduce((a, b) => a + b, 0)
    for (let i = 0; i < sizes.length; i++) sizes[i] = Math.round((sizes[i] as number) * scale)
    const rate = 50 * MIB
    const work = await tmpDir('df-bench-dist-')
    const registry = await startRegistry()
    const origin = await startThrottleProxy({ targetPort: registry.port, bytesPerSecond: rate })
    const rows: Row[] = []
    try {
      const image = await buildImage(path.join(work.path, 'image'), { layers: sizes, seed: 'bench-distribution', tag: 'v1' })
      await pushImage(image, `${registry.host}/bench/dist:v1`)
      const imageBytes = image.totalBytes
      const originFloorMs = imageBytes / rate * 1000
      const timesAt1: Record<string, number> = {}
      for (const p2p of [true, false]) {
        for (const n of counts) {
          const plainMs = await plainHttpFloor(image, n)
          const floorMs = Math.max(originFloorMs, plainMs)
          const { slowestMs, originBytes, fallbacks } = await pullAll(origin, image, n, p2p)
          const mode = p2p ? 'p2p' : 'no-p2p'
          if (n === 1) timesAt1[mode] = slowestMs
          log(`distribution ${mode} N=${n}: slowest ${Math.round(slowestMs)} ms, floor ${Math.round(floorMs)} ms (origin ${Math.round(originFloorMs)}, plain http ${Math.round(plainMs)}), origin sent ${(originBytes / imageBytes).toFixed(3)}× the image${p2p ? `, origin fallbacks ${JSON.stringify(fallbacks)}` : ''}`)
          const big = n === counts[counts.length - 1]
          const detail = { n, p2p, imageBytes, originBytes, slowestMs: Math.round(slowestMs), floorMs: Math.round(floorMs), originFloorMs: Math.round(originFloorMs), plainHttpMs: Math.round(plainMs), rateMiBs: rate / MIB, ...(p2p ? { fallbacks } : {}) }
          rows.push({ scenario: 'distribution', metric: `origin bytes ÷ image, N=${n}, ${mode}`, value: round(originBytes / imageBytes), unit: 'x', target: p2p && big ? { op: '<=', value: 1.05 } : undefined, detail })
          rows.push({ scenario: 'distribution', metric: `slowest peer ÷ floor, N=${n}, ${mode}`, value: round(slowestMs / floorMs), unit: 'x', target: p2p && big ? { op: '<=', value: 1.3 } : undefined, detail })
          if (n > 1) rows.push({ scenario: 'distribution', metric: `time at N=${n} ÷ time at N=1, ${mode}`, value: round(slowestMs / (timesAt1[mode] as number)), unit: 'x', target: p2p && big ? { op: '<=', value: 1.5 } : undefined, detail })
        }
      }
    } finally {
      await origin.close()
      await registry.close()
      await work.cleanup()
    }
    return rows
  }
}

async function pullAll (origin: ThrottleProxy, image: BuiltImage, n: number, p2p: boolean): Promise<{ slowestMs: number, originBytes: number, fallbacks: Record<string, number> }> {
  const scheduler = p2p ? await startScheduler() : undefined
  const peers: TestPeer[] = []
  try {
    // A few at a time: sixteen Node processes compiling at once on two cores miss any sane start deadline.
    for (let first = 0; first < n; first += 4) {
      const batch = await Promise.allSettled(Array.from({ length: Math.min(4, n - first) }, async (_, i) => startPeer({
        registry: origin.url,
        scheduler: scheduler?.address,
        name: `bench-${first + i}`,
        args: ['--log-level', 'warn'],
        env: deployedPeerEnv()
      })))
      for (const r of batch) if (r.status === 'fulfilled') peers.push(r.value)
      const failed = batch.find(r => r.status === 'rejected')
      if (failed !== undefined) throw failed.reason
    }
    origin.reset()
    const times = await Promise.all(peers.map(async p => pullImage(p.url, origin.host, 'bench/dist', image)))
    // Pieces peers took from the origin because the swarm did not deliver them, by reason.
    const fallbacks: Record<string, number> = {}
    for (const m of await Promise.all(peers.map(async p => p.metrics()))) {
      for (const [reason, v] of Object.entries(m.byLabel('damselfly_swarm_origin_fallbacks_total', 'reason'))) {
        if (v > 0) fallbacks[reason] = (fallbacks[reason] ?? 0) + v
      }
    }
    return { slowestMs: Math.max(...times), originBytes: origin.bytesDown(), fallbacks }
  } finally {
    await Promise.all(peers.map(async p => p.close()))
    await scheduler?.close()
  }
}

/** N separate processes (curl) read the image from a plain local HTTP server at the same moment. */
async function plainHttpFloor (image: BuiltImage, n: number): Promise<number> {
  const files = new Map([image.config, ...image.layers].map(b => [`/${b.digest}`, b.path]))
  const server = createServer((req, res) => {
    const file = files.get(req.url ?? '')
    if (file === undefined) {
      res.writeHead(404).end()
      return
    }
    createReadStream(file).pipe(res)
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  try {
    const args = [...files.keys()].flatMap(p => ['-o', '/dev/null', `${base}${p}`])
    const started = performance.now()
    await Promise.all(Array.from({ length: n }, async () => run('curl', ['-sSf', ...args], { timeoutMs: 600_000 })))
    return performance.now() - started
  } finally {
    server.closeAllConnections()
    await new Promise(resolve => server.close(resolve))
  }
}
