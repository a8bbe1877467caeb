import path from 'node:path'
import { buildImage, pushImage } from '../../test/helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../../test/helpers/peer.ts'
import { startRegistry } from '../../test/helpers/registry.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
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
      peer = await startPeer({ env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name: 'memory', args: ['--log-level', 'warn', '--cache-size', `${Math.ceil(size / MIB) * 2}MiB`] })
      const url = `${peer.url}/v2/bench/mem/blobs/${digest}`
      const idle = await rss(peer)
      const takingIn = await peakWhile(peer, async () => { await fetchVerified(url, digest) })
      const serving = await peakWhile(peer, async () => { await Promise.all(Array.from({ length: 8 }, async () => fetchVerified(url, digest))) })
      const detail = { blobBytes: size, idleMiB: Math.round(idle / MIB), takingInMiB: Math.round(takingIn / MIB), servingMiB: Math.round(serving / MIB) }
      log(`memory: ${JSON.stringify(detail)}`)
      return [
        { scenario: 'memory', metric: `peer peak RSS taking in a ${size / MIB} MiB blob`, value: Math.round(takingIn / MIB), unit: 'MiB', target: { op: '<=', value: 150 }, detail },
        { scenario: 'memory', metric: 'peer peak RSS serving it to 8 callers', value: Math.round(serving / MIB), unit: 'MiB', target: { op: '<=', value: 150 }, detail }
      ] satisfies Row[]
    } finally {
      await peer?.close()
      await scheduler?.close()
      await registry.close()
      await work.cleanup()
    }
  }
}

async function rss (peer: TestPeer): Promise<number> {
  const value = (await peer.metrics()).get('damselfly_process_resident_memory_bytes')
  if (!(value > 0)) throw new Error(`${peer.name} exports no damselfly_process_resident_memory_bytes`)
  return value
}

async function peakWhile (peer: TestPeer, work: () => Promise<void>): Promise<number> {
  let peak = 0
  const state = { done: false }
  const sampler = (async () => {
    while (!state.done) {
      peak = Math.max(peak, await rss(peer))
      await new Promise(resolve => setTimeout(resolve, 100))
    }
  })()
  try {
    await work()
  } finally {
    state.done = true
    await sampler
  }
  return Math.max(peak, await rss(peer))
}
