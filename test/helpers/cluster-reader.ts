/**
 * One node's image pull, run inside the node's network namespace by
 * test/helpers/cluster.ts: `node cluster-reader.ts '<json>'` with
 * `{ base, repo, tag, ns? }`. It loads, prints `ready`, waits for a line on
 * stdin (so every reader starts at the same moment, Node's start-up not
 * counted), then pulls as containerd does through a mirror: the manifest by
 * tag, then every blob by digest, three at a time, each hashed as it streams.
 * Its last line is a JSON `ReaderResult`; it exits 0 either way.
 */
import { createHash } from 'node:crypto'
import { Agent, get, type IncomingMessage } from 'node:http'
import { createInterface } from 'node:readline'

export interface ReaderInit {
  /** The mirror (or, without the swarm, the origin registry) as http://host:port. */
  base: string
  repo: string
  tag: string
  /** containerd's `ns=` query parameter: the registry the mirror stands for. */
  ns?: string
}

export interface ReaderResult {
  ok: boolean
  /** Epoch milliseconds at which the last byte was verified (or the pull failed). */
  finishedAt: number
  /** Verified bytes: the manifest and every blob. */
  bytes: number
  blobs: number
  /** CPU time this reader used pulling, in milliseconds. */
  cpuMs: number
  error?: string
}

interface Descriptor { digest: string, size: number }

/**
 * Node's own HTTP client, not undici: undici parses with llhttp compiled to
 * WebAssembly, and 32 readers optimising it while they pulled took 13% of the
 * machine's CPU from the peers being measured (perf, N = 32, 2026-12-03).
 * containerd, which the readers stand for, is Go and pays nothing like it.
 */
async function fetchFrom (url: string, agent: Agent, headers: Record<string, string> = {}): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    get(url, { agent, headers }, resolve).once('error', reject)
  })
}

async function whole (res: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of res) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}

async function pull (init: ReaderInit, agent: Agent): Promise<{ bytes: number, blobs: number }> {
  const query = init.ns === undefined ? '' : `?ns=${encodeURIComponent(init.ns)}`
  const res = await fetchFrom(`${init.base}/v2/${init.repo}/manifests/${init.tag}${query}`, agent, { accept: 'application/vnd.oci.image.manifest.v1+json' })
  const body = await whole(res)
  if (res.statusCode !== 200) throw new Error(`manifest: ${res.statusCode} ${body.toString().slice(0, 200)}`)
  const manifest = JSON.parse(body.toString()) as { config: Descriptor, layers: Descriptor[] }
  const queue = [manifest.config, ...manifest.layers]
  let bytes = body.length
  await Promise.all([0, 1, 2].map(async () => {
    for (let d = queue.shift(); d !== undefined; d = queue.shift()) {
      const n = await fetchVerified(`${init.base}/v2/${init.repo}/blobs/${d.digest}${query}`, d, agent)
      bytes += n
    }
  }))
  return { bytes, blobs: manifest.layers.length + 1 }
}

async function fetchVerified (url: string, d: Descriptor, agent: Agent): Promise<number> {
  const res = await fetchFrom(url, agent)
  if (res.statusCode !== 200) {
    const text = (await whole(res)).toString()
    throw new Error(`${d.digest}: ${res.statusCode} ${text.slice(0, 200)}`)
  }
  const hash = createHash('sha256')
  let bytes = 0
  for await (const chunk of res) {
    hash.update(chunk as Buffer)
    bytes += (chunk as Buffer).length
  }
  if (bytes !== d.size) throw new Error(`${d.digest}: ${bytes} bytes, the manifest says ${d.size}`)
  if (`sha256:${hash.digest('hex')}` !== d.digest) throw new Error(`${d.digest}: the bytes do not match the digest`)
  return bytes
}

/** CPU time since the start signal (loading Node and this script is not the pull's). */
let cpuAtStart: NodeJS.CpuUsage | undefined
function cpuMs (): number {
  const { user, system } = process.cpuUsage(cpuAtStart)
  return (user + system) / 1000
}

const init = JSON.parse(process.argv[2] ?? '{}') as ReaderInit
const agent = new Agent({ keepAlive: true, maxSockets: 3 })
const lines = createInterface({ input: process.stdin })
const go = new Promise<boolean>(resolve => {
  lines.once('line', () => {
    cpuAtStart = process.cpuUsage()
    resolve(true)
  })
  lines.once('close', () => { resolve(false) })
})
process.stdout.write('ready\n')
let result: ReaderResult
if (!await go) {
  result = { ok: false, finishedAt: Date.now(), bytes: 0, blobs: 0, cpuMs: cpuMs(), error: 'stdin closed before the start' }
} else {
  try {
    const { bytes, blobs } = await pull(init, agent)
    result = { ok: true, finishedAt: Date.now(), bytes, blobs, cpuMs: cpuMs() }
  } catch (err) {
    result = { ok: false, finishedAt: Date.now(), bytes: 0, blobs: 0, cpuMs: cpuMs(), error: (err as Error).message }
  }
}
process.stdout.write(JSON.stringify(result) + '\n')
lines.close()
agent.destroy()
