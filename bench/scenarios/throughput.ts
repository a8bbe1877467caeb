import { createServer, connect } from 'node:net'
import type { AddressInfo } from 'node:net'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { buildImage, pushImage } from '../../test/helpers/image.ts'
import { startPeer, startScheduler } from '../../test/helpers/peer.ts'
import { startRegistry } from '../../test/helpers/registry.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
import { MIB, deployedPeerEnv, fetchVerified, round, type Row, type Scenario } from '../lib.ts'

/**
 * One large blob from one peer to another over the piece protocol (peer B
 * has nothing, peer A holds it all; read through B's mirror), against plain
 * HTTP from the same serving process (A's mirror, warm) and raw TCP over
 * loopback. Both peer figures include SHA-256 checks and HTTP to the reader.
 */
export const throughput: Scenario = {
  name: 'throughput',
  async run ({ quick, log }) {
    const size = quick ? 128 * MIB : 1024 * MIB
    const work = await tmpDir('df-bench-tput-')
    const registry = await startRegistry()
    const scheduler = await startScheduler()
    const peers = []
    try {
      const image = await buildImage(path.join(work.path, 'image'), { layers: [size], seed: 'bench-throughput', tag: 'v1' })
      await pushImage(image, `${registry.host}/bench/tput:v1`)
      const digest = (image.layers[0] as { digest: string }).digest
      const url = (base: string): string => `${base}/v2/bench/tput/blobs/${digest}`
      const a = await startPeer({ env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name: 'parent', args: ['--log-level', 'warn'] })
      peers.push(a)
      await fetchVerified(url(a.url), digest)
      const b = await startPeer({ env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name: 'child', args: ['--log-level', 'warn'] })
      peers.push(b)

      let t = performance.now()
      await fetchVerified(url(b.url), digest)
      const p2p = size / MIB / ((performance.now() - t) / 1000)
      const fromOrigin = (await b.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' })
      if (fromOrigin > 0) log(`throughput: the child took ${fromOrigin} bytes from the origin`)
      t = performance.now()
      await fetchVerified(url(a.url), digest)
      const http = size / MIB / ((performance.now() - t) / 1000)
      const tcp = await rawTcp(size)
      const detail = { blobBytes: size, pieceProtocolMiBs: Math.round(p2p), plainHttpMiBs: Math.round(http), rawTcpMiBs: Math.round(tcp), childBytesFromOrigin: fromOrigin }
      log(`throughput: ${JSON.stringify(detail)}`)
      return [
        { scenario: 'throughput', metric: 'piece protocol, peer to peer', value: Math.round(p2p), unit: 'MiB/s', detail },
        { scenario: 'throughput', metric: 'piece protocol ÷ plain HTTP (same serving process)', value: round(p2p / http), unit: 'x', target: { op: '>=', value: 0.7 }, detail },
        { scenario: 'throughput', metric: 'piece protocol ÷ raw TCP loopback', value: round(p2p / tcp), unit: 'x', detail }
      ] satisfies Row[]
    } finally {
      for (const p of peers) await p.close()
      await scheduler.close()
      await registry.close()
      await work.cleanup()
    }
  }
}

/** MiB/s of `size` bytes written through one loopback TCP connection and read on the other end. */
async function rawTcp (size: number): Promise<number> {
  const chunk = Buffer.alloc(256 * 1024, 7)
  const server = createServer((socket) => {
    let sent = 0
    const write = (): void => {
      while (sent < size) {
        sent += chunk.length
        if (!socket.write(chunk)) {
          socket.once('drain', write)
          return
        }
      }
      socket.end()
    }
    write()
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const started = performance.now()
  await new Promise<void>((resolve, reject) => {
    const socket = connect((server.address() as AddressInfo).port, '127.0.0.1')
    socket.on('data', () => {})
    socket.once('end', resolve)
    socket.once('error', reject)
  })
  const mibs = size / MIB / ((performance.now() - started) / 1000)
  await new Promise(resolve => server.close(resolve))
  return mibs
}
