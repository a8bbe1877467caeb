import { randomInt } from 'node:crypto'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { request } from 'undici'
import { buildImage, pushImage, readBlob } from '../../test/helpers/image.ts'
import { startPeer, startScheduler } from '../../test/helpers/peer.ts'
import { startRegistry } from '../../test/helpers/registry.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
import { MIB, deployedPeerEnv, percentile, round, type Row, type Scenario } from '../lib.ts'

interface Read { start: number, end: number }

/** The blob each process warms up on before its replay, and the reads it takes. */
const WARMUP_BLOB = 16 * MIB
const WARMUP_READS = 16

/** nydusd's on-demand reads: unaligned, about 1 MiB, anywhere in the blob. */
function randomReads (size: number, count: number): Read[] {
  const reads: Read[] = []
  for (let i = 0; i < count; i++) {
    const len = MIB - 4096 + randomInt(8192)
    const start = randomInt(size - len)
    reads.push({ start, end: start + len - 1 })
  }
  return reads
}

/**
 * nydusd's pattern: unaligned ~1 MiB Range GETs with X-Dragonfly-Registry,
 * random offsets then a sequential prefetch pass, 8 at once. Replayed
 * against the origin itself, a cold peer whose neighbours hold the blob (its
 * table certified), and a warm peer; latencies are reported as ratios to the
 * origin's.
 *
 * "Cold" is cold for the blob, not a process that has never served: a
 * DaemonSet's peer is up long before a container starts. Before its replay,
 * the origin and the cold peer each serve a few range reads of another blob
 * of the image; without that, a fresh process's first eight reads (code not
 * yet optimised, connections not yet open) are the slowest 1.6% and so the
 * p99, for the origin as for the peer. Those reads are reported apart, in
 * `detail`.
 */
export const lazy: Scenario = {
  name: 'lazy-reads',
  async run ({ quick, log }) {
    const blobSize = quick ? 48 * MIB : 256 * MIB
    const randomCount = quick ? 48 : 256
    const work = await tmpDir('df-bench-lazy-')
    const registry = await startRegistry()
    const scheduler = await startScheduler()
    const peers = []
    try {
      const image = await buildImage(path.join(work.path, 'image'), { layers: [blobSize, WARMUP_BLOB], seed: 'bench-lazy', tag: 'v1' })
      await pushImage(image, `${registry.host}/bench/lazy:v1`)
      const layer = image.layers[0] as { digest: string, size: number }
      const other = image.layers[1] as { digest: string, size: number }
      const otherBytes = readBlob(image, other.digest)
      const warmUp = async (base: string, header: string | undefined): Promise<number[]> => replay(base, header, other.digest, randomReads(other.size, WARMUP_READS), otherBytes, 8)
      const bytes = readBlob(image, layer.digest)
      const pullWhole = async (base: string): Promise<void> => {
        for (const [blob, data] of [[layer, bytes], [other, otherBytes]] as const) await replay(base, registry.url, blob.digest, [{ start: 0, end: blob.size - 1 }], data, 1)
      }
      const reads: Read[] = randomReads(layer.size, randomCount)
      // The prefetch pass: consecutive merged ranges from an unaligned start, as nydusd's prefetch workers send.
      for (let start = 12345; start < layer.size; start += MIB + 777) reads.push({ start, end: Math.min(layer.size, start + MIB + 777) - 1 })

      const neighbour = await startPeer({ env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name: 'neighbour', args: ['--log-level', 'warn'] })
      peers.push(neighbour)
      await pullWhole(neighbour.url)
      // A range is served from the swarm only once someone besides the table's
      // author has vouched for it: here a second node pulls the blob whole and
      // so certifies the table, as a second seed does in a deployment.
      const witness = await startPeer({ env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name: 'witness', args: ['--log-level', 'warn'] })
      peers.push(witness)
      await pullWhole(witness.url)
      const cold = await startPeer({ env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name: 'cold', args: ['--log-level', 'warn'] })
      peers.push(cold)

      const originFirst = await warmUp(registry.url, undefined)
      const originLat = await replay(registry.url, undefined, layer.digest, reads, bytes, 8)
      const coldFirst = await warmUp(cold.url, registry.url)
      const coldLat = await replay(cold.url, registry.url, layer.digest, reads, bytes, 8)
      const coldMetrics = await cold.metrics()
      const coldFetched = { peer: coldMetrics.get('damselfly_fetched_bytes_total', { source: 'peer' }), origin: coldMetrics.get('damselfly_fetched_bytes_total', { source: 'origin' }) }
      const warmLat = await replay(neighbour.url, registry.url, layer.digest, reads, bytes, 8)
      const o50 = percentile(originLat, 50)
      const o99 = percentile(originLat, 99)
      const figures = (l: number[]): Record<string, number> => ({ p50ms: round(percentile(l, 50), 2), p99ms: round(percentile(l, 99), 2) })
      const ms = (l: number[]): number[] => l.map(x => Math.round(x))
      const detail = { blobBytes: layer.size, reads: reads.length, concurrency: 8, origin: figures(originLat), coldNeighbour: figures(coldLat), coldFetched, warm: figures(warmLat), warmUpReadsMs: { origin: ms(originFirst), coldPeer: ms(coldFirst) } }
      log(`lazy reads: ${JSON.stringify(detail)}`)
      return [
        { scenario: 'lazy-reads', metric: 'p50 from a neighbour ÷ origin p50', value: round(percentile(coldLat, 50) / o50), unit: 'x', detail },
        { scenario: 'lazy-reads', metric: 'p99 from a neighbour ÷ origin p99', value: round(percentile(coldLat, 99) / o99), unit: 'x', target: { op: '<=', value: 1 }, detail },
        { scenario: 'lazy-reads', metric: 'p50 warm peer ÷ origin p50', value: round(percentile(warmLat, 50) / o50), unit: 'x', detail },
        { scenario: 'lazy-reads', metric: 'p99 warm peer ÷ origin p99', value: round(percentile(warmLat, 99) / o99), unit: 'x', target: { op: '<=', value: 0.5 }, detail }
      ] satisfies Row[]
    } finally {
      for (const p of peers) await p.close()
      await scheduler.close()
      await registry.close()
      await work.cleanup()
    }
  }
}

/** Sends the reads `concurrency` at a time; checks every byte; returns each read's latency (ms, to the last byte). */
async function replay (base: string, registryHeader: string | undefined, digest: string, reads: Read[], bytes: Buffer, concurrency: number): Promise<number[]> {
  const latencies: number[] = []
  let next = 0
  await Promise.all(Array.from({ length: concurrency }, async () => {
    for (let i = next++; i < reads.length; i = next++) {
      const { start, end } = reads[i] as Read
      const started = performance.now()
      const res = await request(`${base}/v2/bench/lazy/blobs/${digest}`, { headers: { range: `bytes=${start}-${end}`, ...(registryHeader === undefined ? {} : { 'x-dragonfly-registry': registryHeader }) } })
      const body = Buffer.from(await res.body.arrayBuffer())
      latencies.push(performance.now() - started)
      if (res.statusCode !== 206 && !(res.statusCode === 200 && start === 0 && end === bytes.length - 1)) throw new Error(`${base}: ${res.statusCode}`)
      if (!body.equals(bytes.subarray(start, end + 1))) throw new Error(`${base}: wrong bytes for ${start}-${end}`)
    }
  }))
  return latencies
}
