import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdir, readFile } from 'node:fs/promises'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { choosePieceSize } from '../../src/pieces.ts'
import { ensureCommands, makeTorrent, startLeecher, startSeeder, startTracker, writeCompletionHook, type Aria2, type Torrent, type Tracker } from '../../test/helpers/bittorrent.ts'
import { buildImage, pushImage, type BuiltBlob } from '../../test/helpers/image.ts'
import { startPeer, startScheduler, type TestPeer } from '../../test/helpers/peer.ts'
import { freePort, freePorts } from '../../test/helpers/ports.ts'
import { startRegistry, type TestRegistry } from '../../test/helpers/registry.ts'
import { tmpDir } from '../../test/helpers/tmp.ts'
import { MIB, deployedPeerEnv, fetchVerified, percentile, round, type Row, type Scenario } from '../lib.ts'

const REPO = 'bench/bt'
/** No node of either system should take anywhere near this; past it the round has hung. */
const NODE_TIMEOUT_MS = 600_000
/** USER_HZ, the unit of /proc's CPU times: 100 on every Linux build this runs on. */
const CLOCK_TICKS = 100

/**
 * One blob to N cold nodes at once, by the swarm and by BitTorrent (aria2c
 * with an opentracker), in the same run on the same bytes. Each system gets
 * the same start: one warm seed holding the whole blob (a peer that has
 * pulled it through its mirror; an aria2c seeding the layer file), then N
 * nodes that all ask at the same moment, each timed from that moment to its
 * last verified byte (for BitTorrent that includes starting aria2c, a few
 * milliseconds; the peers are up beforehand, as on a node). It is like for like: both cut the blob into the same
 * pieces (the swarm's piece size for the blob, 1 MiB here), both hash every
 * piece, every node of both keeps serving what it has until the last one is
 * done (the leechers seed on; the peers stay up), and all of it runs on
 * loopback on the same two cores. The swarm's figure also carries what
 * BitTorrent has no part of: HTTP from each peer's mirror to its reader and a
 * SHA-256 of the whole blob there. Each N starts afresh: new nodes, seeds,
 * tracker and scheduler.
 */
export const bittorrent: Scenario = {
  name: 'bittorrent',
  async run ({ quick, log }) {
    await ensureCommands({ aria2c: 'aria2', opentracker: 'opentracker', mktorrent: 'mktorrent' })
    const size = quick ? 64 * MIB : 256 * MIB
    const counts = quick ? [4] : [4, 8, 16]
    const work = await tmpDir('df-bench-bt-')
    const registry = await startRegistry()
    const rows: Row[] = []
    try {
      const image = await buildImage(path.join(work.path, 'image'), { layers: [size], seed: 'bench-bittorrent', tag: 'v1' })
      await pushImage(image, `${registry.host}/${REPO}:v1`)
      const layer = image.layers[0] as BuiltBlob
      const pieceSize = choosePieceSize(layer.size)
      const hook = await writeCompletionHook(work.path)
      for (const n of counts) {
        const bt = await bitTorrentRound(layer, pieceSize, n, hook)
        const df = await damselflyRound(registry, layer, n)
        const btSlowest = Math.max(...bt.times)
        const btP50 = percentile(bt.times, 50)
        const dfSlowest = Math.max(...df.times)
        const dfP50 = percentile(df.times, 50)
        const detail = {
          n,
          blobBytes: layer.size,
          pieceBytes: pieceSize,
          bitTorrent: { slowestMs: Math.round(btSlowest), p50Ms: Math.round(btP50), ms: bt.times.map(Math.round), cpuSeconds: round(bt.cpuSeconds, 1) },
          damselfly: { slowestMs: Math.round(dfSlowest), p50Ms: Math.round(dfP50), ms: df.times.map(Math.round), cpuSeconds: round(df.cpuSeconds, 1), originBytes: df.originBytes, fallbacks: df.fallbacks }
        }
        log(`bittorrent N=${n}: BitTorrent slowest ${Math.round(btSlowest)} ms, p50 ${Math.round(btP50)} ms; damselfly slowest ${Math.round(dfSlowest)} ms, p50 ${Math.round(dfP50)} ms; ratios ${(dfSlowest / btSlowest).toFixed(2)}× / ${(dfP50 / btP50).toFixed(2)}×; CPU ${bt.cpuSeconds.toFixed(1)} s / ${df.cpuSeconds.toFixed(1)} s; cold peers took ${(df.originBytes / layer.size).toFixed(3)}× the blob from the origin${Object.keys(df.fallbacks).length > 0 ? `, origin fallbacks ${JSON.stringify(df.fallbacks)}` : ''}`)
        rows.push({ scenario: 'bittorrent', metric: `slowest node ÷ BitTorrent's slowest, N=${n}`, value: round(dfSlowest / btSlowest), unit: 'x', target: n === 8 ? { op: '<=', value: 1.0 } : undefined, detail })
        rows.push({ scenario: 'bittorrent', metric: `p50 ÷ BitTorrent's p50, N=${n}`, value: round(dfP50 / btP50), unit: 'x', detail })
      }
    } finally {
      await registry.close()
      await work.cleanup()
    }
    return rows
  }
}

/**
 * The torrent names its tracker's URL, and the tracker must know the
 * torrent's info hash when it starts: pick the port first, and on the rare
 * loss of it to another process before opentracker binds, do both again.
 */
async function trackedTorrent (file: string, dir: string, pieceSize: number): Promise<{ torrent: Torrent, tracker: Tracker }> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    const torrent = await makeTorrent(file, path.join(dir, `layer-${attempt}.torrent`), `http://127.0.0.1:${port}/announce`, pieceSize)
    try {
      return { torrent, tracker: await startTracker({ dir: path.join(dir, `tracker-${attempt}`), port, infoHashes: [torrent.infoHash] }) }
    } catch (err) {
      if (attempt >= 3) throw err
    }
  }
}

/**
 * A tracker, a seeder and N leechers; each leecher's time from their common
 * start to its completion, in ms. A tracker of its own each round: aria2c
 * does not tell the tracker it leaves, so one kept across rounds would hand
 * out the last round's dead leechers.
 */
async function bitTorrentRound (layer: BuiltBlob, pieceSize: number, n: number, hook: string): Promise<{ times: number[], cpuSeconds: number }> {
  const dir = await tmpDir('df-bench-bt-round-')
  const nodes: Aria2[] = []
  let tracker: Tracker | undefined
  try {
    const tracked = await trackedTorrent(layer.path, dir.path, pieceSize)
    tracker = tracked.tracker
    const torrent = tracked.torrent
    // The seeder serves the layer file where the image was built (named after its digest, as the torrent is).
    nodes.push(await startSeeder(torrent, path.dirname(layer.path)))
    const ports = await freePorts(n)
    const dirs = ports.map((_, i) => path.join(dir.path, `leecher-${i}`))
    await Promise.all(dirs.map(async d => mkdir(d)))
    const cpuBefore = await cpuSeconds(nodes.map(node => node.proc.child.pid))
    const started = Date.now()
    const leechers = ports.map((port, i) => startLeecher(torrent, dirs[i] as string, port, hook, NODE_TIMEOUT_MS))
    nodes.push(...leechers)
    const done = await Promise.all(leechers.map(async l => l.completed))
    const cpu = await cpuSeconds(nodes.map(node => node.proc.child.pid)) - cpuBefore
    // aria2c checks every piece's SHA-1; one whole-file SHA-256 shows the bytes are the layer's, without timing it.
    const last = done.indexOf(Math.max(...done))
    const digest = await sha256File(path.join(dirs[last] as string, path.basename(layer.path)))
    if (digest !== layer.digest) throw new Error(`leecher ${last} holds ${digest}, not ${layer.digest}`)
    return { times: done.map(t => t - started), cpuSeconds: cpu }
  } finally {
    await Promise.all(nodes.map(async node => node.stop()))
    await tracker?.close()
    await dir.cleanup()
  }
}

/**
 * A scheduler, a peer warmed with the blob, and N cold peers reading it
 * through their own mirrors at once; each one's time from the common start,
 * and what the cold peers took from the origin.
 */
async function damselflyRound (registry: TestRegistry, layer: BuiltBlob, n: number): Promise<{ times: number[], cpuSeconds: number, originBytes: number, fallbacks: Record<string, number> }> {
  const scheduler = await startScheduler()
  const peers: TestPeer[] = []
  const url = (base: string): string => `${base}/v2/${REPO}/blobs/${layer.digest}`
  const start = async (name: string): Promise<TestPeer> => startPeer({ registry: registry.url, scheduler: scheduler.address, name, args: ['--log-level', 'warn'], env: deployedPeerEnv() })
  try {
    const seed = await start('bt-seed')
    peers.push(seed)
    await fetchVerified(url(seed.url), layer.digest)
    const cold: TestPeer[] = []
    // A few at a time: sixteen Node processes compiling at once on two cores miss any sane start deadline.
    for (let first = 0; first < n; first += 4) {
      const batch = await Promise.allSettled(Array.from({ length: Math.min(4, n - first) }, async (_, i) => start(`bt-cold-${first + i}`)))
      for (const r of batch) {
        if (r.status === 'fulfilled') {
          cold.push(r.value)
          peers.push(r.value)
        }
      }
      const failed = batch.find(r => r.status === 'rejected')
      if (failed !== undefined) throw failed.reason
    }
    const cpuBefore = await cpuSeconds(peers.map(p => p.pid))
    const started = performance.now()
    const times = await Promise.all(cold.map(async p => {
      await fetchVerified(url(p.url), layer.digest)
      return performance.now() - started
    }))
    const cpu = await cpuSeconds(peers.map(p => p.pid)) - cpuBefore
    let originBytes = 0
    // Pieces the cold peers took from the origin because the swarm did not deliver them, by reason.
    const fallbacks: Record<string, number> = {}
    for (const m of await Promise.all(cold.map(async p => p.metrics()))) {
      originBytes += m.get('damselfly_fetched_bytes_total', { source: 'origin' })
      for (const [reason, v] of Object.entries(m.byLabel('damselfly_swarm_origin_fallbacks_total', 'reason'))) {
        if (v > 0) fallbacks[reason] = (fallbacks[reason] ?? 0) + v
      }
    }
    return { times, cpuSeconds: cpu, originBytes, fallbacks }
  } finally {
    await Promise.all(peers.map(async p => p.close()))
    await scheduler.close()
  }
}

async function sha256File (file: string): Promise<string> {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer)
  return `sha256:${hash.digest('hex')}`
}

/**
 * CPU seconds (user and system) the processes have used so far, from
 * /proc: on two shared cores, how much of the machine each system's nodes
 * need says as much as their times do. Read before the common start and
 * after the last node is done, so start-up is left out (and so are the
 * scheduler and the tracker, and the bench's own reading of the mirrors).
 */
async function cpuSeconds (pids: Array<number | undefined>): Promise<number> {
  let ticks = 0
  for (const pid of pids) {
    if (pid === undefined) continue
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined)
    if (stat === undefined) continue
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    ticks += Number(fields[11]) + Number(fields[12])
  }
  return ticks / CLOCK_TICKS
}
