import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { open, rm } from 'node:fs/promises'
import { cpus } from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { fileURLToPath } from 'node:url'
import { buildImage, pushImage } from '../../test/helpers/image.ts'
import { startPeer, startScheduler, type TestPeer } from '../../test/helpers/peer.ts'
import { spawnProcess, type Spawned } from '../../test/helpers/process.ts'
import { startRegistry } from '../../test/helpers/registry.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
import { MIB, deployedPeerEnv, fetchVerified, portOf, round, type Row, type Scenario } from '../lib.ts'

/**
 * The data plane against the machine: one large blob read by the same
 * hashing reader from a plain Node HTTP server (its own process, the file
 * in the page cache), from a cold peer that takes it from a warm one (one
 * hop: receive, verify, store, forward), and from the warm peer's cache.
 * CPU per MiB comes from each process's own counters around the transfer.
 * The hop runs twice, the child free to use every core and limited to one,
 * which shows whether hashing and disk I/O keep off the event loop's core.
 */
export const throughput: Scenario = {
  name: 'throughput',
  async run ({ quick, log }) {
    const size = quick ? 128 * MIB : 1024 * MIB
    const work = await tmpDir('df-bench-tput-')
    const registry = await startRegistry()
    const scheduler = await startScheduler()
    const peers: TestPeer[] = []
    let plain: Spawned | undefined
    let floor: Spawned | undefined
    try {
      const image = await buildImage(path.join(work.path, 'image'), { layers: [size], seed: 'bench-throughput', tag: 'v1' })
      await pushImage(image, `${registry.host}/bench/tput:v1`)
      const layer = image.layers[0] as { digest: string, path: string }
      const digest = layer.digest
      const url = (base: string): string => `${base}/v2/bench/tput/blobs/${digest}`
      const startChild = async (name: string): Promise<TestPeer> => {
        const p = await startPeer({ env: deployedPeerEnv(), registry: registry.url, scheduler: scheduler.address, name, args: ['--log-level', 'warn'] })
        peers.push(p)
        return p
      }

      plain = spawnProcess(process.execPath, [fileURLToPath(new URL('../plain-server.ts', import.meta.url)), layer.path])
      const port = await portOf(plain, 'the plain HTTP server')
      const plainPid = plain.child.pid as number
      // The bare relay takes the blob from the plain server, as the child takes it from the warm parent.
      floor = spawnProcess(process.execPath, [fileURLToPath(new URL('../relay-floor.ts', import.meta.url)), layer.path, `127.0.0.1:${port}`])
      const floorPort = await portOf(floor, 'the bare relay')
      const floorPid = floor.child.pid as number
      const bareRelay = async (): Promise<Measured> => measure(size, [floorPid], async () => fetchVerified(`http://127.0.0.1:${floorPort}/blob`, digest))
      const parent = await startChild('parent')
      await fetchVerified(url(parent.url), digest)

      // The plain server twice, before and after the peers, so drift on a shared machine shows.
      const plainBefore = await measure(size, [plainPid], async () => fetchVerified(`http://127.0.0.1:${port}/blob`, digest))
      const used = path.join(work.path, 'used')
      const hop = async (name: string, core: number | undefined, usedMemory = false): Promise<Measured & { fromOrigin: number }> => {
        const child = await startChild(name)
        if (core !== undefined) execFileSync('taskset', ['-a', '-p', '-c', String(core), String(child.pid)], { stdio: 'ignore' })
        // Just before the transfer: freed pages soon go back to the host (the balloon's free page reporting).
        if (usedMemory) await useMemory(used, size + 64 * MIB)
        const m = await measure(size, [child.pid as number, parent.pid as number], async () => fetchVerified(url(child.url), digest))
        return { ...m, fromOrigin: (await child.metrics()).get('damselfly_fetched_bytes_total', { source: 'origin' }) }
      }
      const cores = cpus().length
      // A pass unmeasured first, so that the bare relay is compiled. Then the bare relay and the child each on
      // fresh memory (page-cache pages this VM never touched), and each again on memory used before.
      await bareRelay()
      const floorFresh = await bareRelay()
      // The bare relay freed its first pass's file as it finished: those pages go back to the host first.
      await new Promise(resolve => setTimeout(resolve, 5_000))
      const hopAll = await hop('child', undefined)
      await useMemory(used, size + 64 * MIB)
      const floorUsed = await bareRelay()
      const hopUsed = await hop('child-used-memory', undefined, true)
      const hopOne = cores > 1 ? await hop('child-one-core', cores - 1) : undefined
      const warm = await measure(size, [parent.pid as number], async () => fetchVerified(url(parent.url), digest))
      const plainAfter = await measure(size, [plainPid], async () => fetchVerified(`http://127.0.0.1:${port}/blob`, digest))

      const plainMiBs = (plainBefore.mibs + plainAfter.mibs) / 2
      const plainCpu = ((plainBefore.cpuMsPerMiB[0] as number) + (plainAfter.cpuMsPerMiB[0] as number)) / 2
      const detail = {
        blobBytes: size,
        cores,
        plainHttpMiBs: [Math.round(plainBefore.mibs), Math.round(plainAfter.mibs)],
        plainServerCpuMsPerMiB: round(plainCpu, 2),
        hopMiBs: Math.round(hopAll.mibs),
        hopOneCoreMiBs: hopOne === undefined ? undefined : Math.round(hopOne.mibs),
        warmServeMiBs: Math.round(warm.mibs),
        childCpuMsPerMiB: round(hopAll.cpuMsPerMiB[0] as number, 2),
        bareRelayCpuMsPerMiB: round(floorFresh.cpuMsPerMiB[0] as number, 2),
        bareRelayMiBs: Math.round(floorFresh.mibs),
        usedMemory: {
          hopMiBs: Math.round(hopUsed.mibs),
          childCpuMsPerMiB: round(hopUsed.cpuMsPerMiB[0] as number, 2),
          parentCpuMsPerMiB: round(hopUsed.cpuMsPerMiB[1] as number, 2),
          bareRelayCpuMsPerMiB: round(floorUsed.cpuMsPerMiB[0] as number, 2),
          bareRelayMiBs: Math.round(floorUsed.mibs)
        },
        parentCpuMsPerMiB: round(hopAll.cpuMsPerMiB[1] as number, 2),
        warmServeCpuMsPerMiB: round(warm.cpuMsPerMiB[0] as number, 2),
        childBytesFromOrigin: hopAll.fromOrigin + hopUsed.fromOrigin + (hopOne?.fromOrigin ?? 0)
      }
      log(`throughput: ${JSON.stringify(detail)}`)
      if (detail.childBytesFromOrigin > 0) log(`throughput: the children took ${detail.childBytesFromOrigin} bytes from the origin`)
      const rows: Row[] = [
        { scenario: 'throughput', metric: 'plain Node HTTP to the hashing reader', value: Math.round(plainMiBs), unit: 'MiB/s', detail },
        { scenario: 'throughput', metric: 'one hop ÷ plain HTTP', value: round(hopAll.mibs / plainMiBs), unit: 'x', target: { op: '>=', value: 0.5 }, detail },
        { scenario: 'throughput', metric: 'warm serve ÷ plain HTTP', value: round(warm.mibs / plainMiBs), unit: 'x', target: { op: '>=', value: 0.8 }, detail },
        { scenario: 'throughput', metric: 'relaying child, CPU per MiB', value: detail.childCpuMsPerMiB, unit: 'ms', target: { op: '<=', value: 2.5 }, detail },
        { scenario: 'throughput', metric: 'relaying child on memory used before, CPU per MiB', value: detail.usedMemory.childCpuMsPerMiB, unit: 'ms', target: { op: '<=', value: 2.5 }, detail },
        { scenario: 'throughput', metric: 'bare relay (receive, two hashes, write, send), CPU per MiB', value: detail.bareRelayCpuMsPerMiB, unit: 'ms', detail },
        { scenario: 'throughput', metric: 'bare relay on memory used before, CPU per MiB', value: detail.usedMemory.bareRelayCpuMsPerMiB, unit: 'ms', detail },
        { scenario: 'throughput', metric: 'relaying child ÷ bare relay, CPU per MiB', value: round(detail.childCpuMsPerMiB / detail.bareRelayCpuMsPerMiB), unit: 'x', detail },
        { scenario: 'throughput', metric: 'the same on memory used before', value: round(detail.usedMemory.childCpuMsPerMiB / detail.usedMemory.bareRelayCpuMsPerMiB), unit: 'x', detail },
        { scenario: 'throughput', metric: 'serving parent, CPU per MiB', value: detail.parentCpuMsPerMiB, unit: 'ms', target: { op: '<=', value: 1.5 }, detail },
        { scenario: 'throughput', metric: 'warm serve, CPU per MiB (plain server: see detail)', value: detail.warmServeCpuMsPerMiB, unit: 'ms', detail }
      ]
      if (hopOne !== undefined) rows.push({ scenario: 'throughput', metric: `one hop, child on ${cores} cores ÷ on 1`, value: round(hopAll.mibs / hopOne.mibs), unit: 'x', detail })
      return rows
    } finally {
      for (const p of peers) await p.close()
      await floor?.stop()
      await plain?.stop()
      await scheduler.close()
      await registry.close()
      await work.cleanup()
    }
  }
}

/**
 * Writes a file of `bytes` and removes it, so that the page-cache pages it
 * took are free again. A writer right after gets pages the VM has touched,
 * as on a node whose memory is in use, instead of pages the host must first
 * fault in: measured here, 1.5-2 ms of kernel time per MiB more. This VM's
 * balloon driver hands freed pages back to the host within seconds (free
 * page reporting), so the cost comes back for any page left free a while.
 */
async function useMemory (file: string, bytes: number): Promise<void> {
  const chunk = Buffer.alloc(MIB)
  const fh = await open(file, 'w')
  try {
    for (let at = 0; at < bytes; at += MIB) await fh.write(chunk, 0, MIB, at)
  } finally {
    await fh.close()
  }
  await rm(file)
}

interface Measured {
  mibs: number
  /** Per pid given, CPU milliseconds (user + system) per MiB moved. */
  cpuMsPerMiB: number[]
}

async function measure (size: number, pids: number[], transfer: () => Promise<unknown>): Promise<Measured> {
  const before = pids.map(cpuSeconds)
  const started = performance.now()
  await transfer()
  const seconds = (performance.now() - started) / 1000
  const after = pids.map(cpuSeconds)
  const mib = size / MIB
  return { mibs: mib / seconds, cpuMsPerMiB: pids.map((_, i) => ((after[i] as number) - (before[i] as number)) * 1000 / mib) }
}

/** CPU seconds a process has used, all threads, from /proc (in clock ticks, 100 a second on Linux). */
function cpuSeconds (pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  // The command name may hold spaces; the fields after it are fixed.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / 100
}
