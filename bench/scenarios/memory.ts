import path from 'node:path'
import { buildImage, pushImage } from '../../test/helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../../test/helpers/peer.ts'
import { startRegistry } from '../../test/helpers/registry.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
import { compiledTree } from '../../test/helpers/compiled.ts'
import { MIB, deployedPeerEnv, fetchVerified, type Row, type Scenario } from '../lib.ts'

/** Peak RSS of a peer while it takes a large blob in, and while it serves it to 8 callers at once. */
export const memory: Scenario = {
  name: 'memory',
  async run ({ quick, log }) {
    const size = quick ? 256 * MIB : 2048 * MIB
    const work = await tmpDir('df-bench-mem-')
    const registry = await startRegistry()
    // As deployed: the scheduler is its own process, so the figure is the peer's alone.
    let scheduler: TestScheduler | undefined
    let peer: TestPeer | undefined
    try {
      const image = await buildImage(path.join(work.path, 'image'), { layers: [size], seed: 'bench-memory', tag: 'v1' })
      await pushImage(image, `${registry.host}/bench/mem:v1`)
      const digest = (image.layers[0] as { digest: string }).digest
      scheduler = await startScheduler()
      // As the image runs it: compiled to JavaScript (deploy/build.ts), with the DaemonSet's environment.
      const cli = await compiledTree(path.join(work.path, 'dist'))
      peer = await startPeer({ cli, env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name: 'memory', args: ['--log-level', 'warn', '--cache-size', `${Math.ceil(size / MIB) * 2}MiB`] })
      const url = `${peer.url}/v2/bench/mem/blobs/${digest}`
      const idle = await sample(peer)
      const takingIn = await peakWhile(peer, async () => { await fetchVerified(url, digest) })
      const serving = await peakWhile(peer, async () => { await Promise.all(Array.from({ length: 8 }, async () => fetchVerified(url, digest))) })
      const parts = (p: Sample): Omit<Sample, 'rss'> => ({ heapUsedMiB: p.heapUsedMiB, heapTotalMiB: p.heapTotalMiB, externalMiB: p.externalMiB, pieceBuffers: p.pieceBuffers })
      const detail = { blobBytes: size, idleMiB: Math.round(idle.rss / MIB), atIdle: parts(idle), takingInMiB: Math.round(takingIn.rss / MIB), servingMiB: Math.round(serving.rss / MIB), atPeakTakingIn: parts(takingIn), atPeakServing: parts(serving) }
      log(`memory: ${JSON.stringify(detail)}`)
      return [
        { scenario: 'memory', metric: `peer peak RSS taking in a ${size / MIB} MiB blob`, value: Math.round(takingIn.rss / MIB), unit: 'MiB', target: { op: '<=', value: 150 }, detail },
        { scenario: 'memory', metric: 'peer peak RSS serving it to 8 callers', value: Math.round(serving.rss / MIB), unit: 'MiB', target: { op: '<=', value: 150 }, detail }
      ] satisfies Row[]
    } finally {
      await peer?.close()
      await scheduler?.close()
      await registry.close()
      await work.cleanup()
    }
  }
}

/** What RSS is made of at one moment: V8's heap, memory outside it (piece buffers among it), and the pool's buffers. */
interface Sample {
  rss: number
  heapUsedMiB: number
  heapTotalMiB: number
  externalMiB: number
  pieceBuffers: Record<string, number>
}

async function sample (peer: TestPeer): Promise<Sample> {
  const m = await peer.metrics()
  const rss = m.get('damselfly_process_resident_memory_bytes')
  if (!(rss > 0)) throw new Error(`${peer.name} exports no damselfly_process_resident_memory_bytes`)
  const mib = (name: string): number => Math.round(m.get(name) / MIB)
  return {
    rss,
    heapUsedMiB: mib('damselfly_nodejs_heap_size_used_bytes'),
    heapTotalMiB: mib('damselfly_nodejs_heap_size_total_bytes'),
    externalMiB: mib('damselfly_nodejs_external_memory_bytes'),
    pieceBuffers: m.byLabel('damselfly_piece_buffers', 'count')
  }
}

/** The sample with the highest RSS while `work` runs, taken every 100 ms. */
async function peakWhile (peer: TestPeer, work: () => Promise<void>): Promise<Sample> {
  let peak: Sample | undefined
  const state = { done: false }
  const take = async (): Promise<void> => {
    const s = await sample(peer)
    if (peak === undefined || s.rss > peak.rss) peak = s
  }
  const sampler = (async () => {
    while (!state.done) {
      await take()
      await new Promise(resolve => setTimeout(resolve, 100))
    }
  })()
  try {
    await work()
  } finally {
    state.done = true
    await sampler
  }
  await take()
  return peak as Sample
}
