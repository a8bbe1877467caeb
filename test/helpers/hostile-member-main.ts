/**
 * A HOSTILE member of a damselfly cluster, as its own OS process (started by
 * hostile-member.ts). It holds the cluster secret and speaks the wire
 * protocol with the project's own src/p2p and src/protocol modules: it
 * registers with the scheduler (as a seed if told to, so it is made first
 * fetcher of cold blobs), answers `fetch` commands, fetches the blob from the
 * origin itself, announces 1 MiB pieces with SHA-256s and serves them on its
 * own HTTP upload port. What it lies about is chosen by the test.
 *
 * Control channel: one JSON object per line on stdin, `{"id":N,"cmd":...}`;
 * one answer per line on stdout, `{"id":N,"ok":true,...}` or
 * `{"id":N,"ok":false,"error":"..."}`. First line out: `{"event":"ready",...}`.
 * stdin closing (the test ended or died) makes it leave and exit. Logs go to stderr.
 */
import { createHash, randomBytes } from 'node:crypto'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { hostname } from 'node:os'
import { createInterface } from 'node:readline'
import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { request } from 'undici'
import { createLogger } from '../../src/logger.ts'
import { createChannel } from '../../src/p2p/channel.ts'
import { createP2PNode, messages } from '../../src/p2p/index.ts'
import { choosePieceSize, pieceBounds, pieceCount } from '../../src/pieces.ts'
import {
  AckResponse, CONTROL_PROTOCOL, ControlCommand, ErrorResponse, PIECE_HTTP_PEER_HEADER, RegisterResponse, SCHEDULER_SESSION_PROTOCOL,
  type ControlResponse, type HostInfo, type OriginRef, type Report, type SchedulerRequest
} from '../../src/protocol/messages.ts'

export interface HostileConfig {
  /** The scheduler, `host:port`. */
  scheduler: string
  clusterSecret: string
  dataDir: string
  /** Registry base URL blobs are fetched from (`http://127.0.0.1:PORT`); the fetch command's origin when absent. */
  registry?: string | undefined
  /** Claim to be a seed, so the scheduler appoints this node first fetcher of cold blobs. */
  seed: boolean
  name: string
}

/**
 * How the blobs this node is told to fetch are announced and served:
 * `honest`; `wrong-digests`: true bytes served, a random SHA-256 announced for
 * the listed pieces (all when none are listed); `corrupt`: the listed pieces'
 * bytes altered, their (wrong) SHA-256 announced and those bytes served.
 */
export type Lie = { kind: 'honest' } | { kind: 'wrong-digests', pieces?: number[] } | { kind: 'corrupt', pieces: number[] }

interface Held {
  digest: string
  size: number
  pieceSize: number
  count: number
  origin: OriginRef | undefined
  mediaType: string | undefined
  lie: Lie | { kind: 'preannounced', fill: 'zeros' }
  /** Bytes served per piece. */
  bytes: Map<number, Buffer>
  /** What was announced per piece. */
  announced: Map<number, string>
  waiters: Map<number, Array<() => void>>
  error?: string
}

const config = JSON.parse(process.argv[2] ?? '{}') as HostileConfig
const logger = createLogger({ level: 'info', destination: process.stderr, base: { hostile: config.name } })
const node = await createP2PNode({ logger }, {
  dataDir: config.dataDir,
  keyName: 'peer.key',
  listen: ['/ip4/127.0.0.1/tcp/0'],
  clusterSecret: config.clusterSecret
})

let lie: Lie = { kind: 'honest' }
const held = new Map<string, Held>()
const fetches: Array<{ digest: string, size: number, lie: string, at: number }> = []
const evictions: string[] = []
const reports: Array<{ report: Report, answer: unknown }> = []
/** Pieces served per digest, and bytes. */
const served = new Map<string, number>()
let servedBytes = 0
let refused = 0

/* The upload port */

const http = createServer((req, res) => { void serve(req, res) })
await new Promise<void>((resolve) => http.listen(0, '127.0.0.1', resolve))
const uploadUrl = `http://127.0.0.1:${(http.address() as AddressInfo).port}`

async function serve (req: IncomingMessage, res: ServerResponse): Promise<void> {
  res.setHeader(PIECE_HTTP_PEER_HEADER, node.peerId)
  const m = /^\/damselfly\/v1\/pieces\/(sha256:[0-9a-f]{64})\/(\d{1,8})(?:\?wait=(\d{1,6}))?$/.exec(req.url ?? '')
  if (m === null || req.method !== 'GET') {
    res.writeHead(404).end()
    return
  }
  const digest = m[1] as string
  const index = Number(m[2])
  const waitMs = Math.min(120_000, Number(m[3] ?? 0))
  let data = held.get(digest)?.bytes.get(index)
  if (data === undefined && waitMs > 0) {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, waitMs)
      const wake = (): void => { clearTimeout(timer); resolve() }
      const blob = held.get(digest)
      if (blob === undefined) return
      const list = blob.waiters.get(index) ?? []
      list.push(wake)
      blob.waiters.set(index, list)
    })
    data = held.get(digest)?.bytes.get(index)
  }
  if (data === undefined) {
    refused++
    res.writeHead(404, { 'content-type': 'application/json' }).end('{"status":"not-found"}')
    return
  }
  served.set(digest, (served.get(digest) ?? 0) + 1)
  servedBytes += data.length
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': data.length }).end(data)
}

/* The scheduler session */

const schedulerPeer = await node.connect({ addr: config.scheduler })
// One session stream, with a peer's heartbeat, as a peer has.
const session = createChannel(await node.openStream({ peerId: schedulerPeer, addrs: [] }, SCHEDULER_SESSION_PROTOCOL), { name: 'the scheduler session', heartbeatMs: 30_000 })
void session.ended.then((err) => { logger.warn({ err: err?.message }, 'the scheduler session ended') })

/** Each answer's schema or an error (one union per schema: checkers are compiled once per schema object). */
const orError = new Map<TSchema, TSchema>()
async function ask<T extends TSchema> (req: SchedulerRequest, schema: T): Promise<Static<T> | Static<typeof ErrorResponse>> {
  let union = orError.get(schema)
  if (union === undefined) orError.set(schema, union = Type.Union([schema, ErrorResponse]))
  return session.request(req, union as T, `scheduler ${req.type} response`, { timeoutMs: 15_000 })
}

const hostInfo: HostInfo = {
  peerId: node.peerId,
  addrs: node.addrs(),
  hostname: `${hostname()}-${config.name}`,
  seed: config.seed,
  location: '',
  idc: '',
  uploadCapacity: 64,
  version: '0.1.0',
  upload: [uploadUrl]
}
const registered = await ask({ type: 'register', host: hostInfo }, RegisterResponse)
if (!registered.ok) throw new Error(`the scheduler refused the registration: ${JSON.stringify(registered)}`)

async function announce (blob: Held, pieces: Array<[number, string]>): Promise<unknown> {
  return ask({
    type: 'announce',
    tasks: [{
      digest: blob.digest,
      size: blob.size,
      ...(blob.mediaType === undefined ? {} : { mediaType: blob.mediaType }),
      ...(blob.origin === undefined ? {} : { origin: blob.origin }),
      add: pieces
    }]
  }, AckResponse)
}

function track (digest: string, size: number, origin: OriginRef | undefined, mediaType: string | undefined, how: Held['lie']): Held {
  const pieceSize = choosePieceSize(size)
  const blob: Held = { digest, size, pieceSize, count: pieceCount(size, pieceSize), origin, mediaType, lie: how, bytes: new Map(), announced: new Map(), waiters: new Map() }
  held.set(digest, blob)
  return blob
}

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex')

/** What this node says about piece `index` of a blob it fetched, and the bytes it serves for it. */
function disguise (blob: Held, index: number, truth: Buffer): { data: Buffer, hex: string } {
  const how = blob.lie
  switch (how.kind) {
    case 'wrong-digests':
      if (how.pieces === undefined || how.pieces.includes(index)) return { data: truth, hex: randomBytes(32).toString('hex') }
      return { data: truth, hex: sha256(truth) }
    case 'corrupt': {
      if (!how.pieces.includes(index)) return { data: truth, hex: sha256(truth) }
      const data = Buffer.from(truth)
      // Bytes that still look like the blob's (a tar of random data): flip 64 of them in the middle.
      const at = Math.max(0, Math.floor(data.length / 2) - 32)
      for (let i = at; i < Math.min(data.length, at + 64); i++) data[i] = (data[i] as number) ^ 0xa5
      return { data, hex: sha256(data) }
    }
    default:
      return { data: truth, hex: sha256(truth) }
  }
}

function land (blob: Held, index: number, data: Buffer, hex: string): void {
  blob.bytes.set(index, data)
  blob.announced.set(index, hex)
  const list = blob.waiters.get(index) ?? []
  blob.waiters.delete(index)
  for (const wake of list) wake()
}

/** Fetches a whole blob from the origin, piece by piece, announcing each as it lands. */
async function fetchFromOrigin (blob: Held): Promise<void> {
  const origin = blob.origin
  const base = config.registry ?? origin?.registry
  if (origin === undefined || base === undefined) throw new Error(`no origin for ${blob.digest}`)
  const kind = origin.kind === 'manifest' ? 'manifests' : 'blobs'
  const res = await request(`${base}/v2/${origin.repo}/${kind}/${blob.digest}`, {
    headers: { accept: 'application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, */*' },
    signal: AbortSignal.timeout(120_000)
  })
  if (res.statusCode !== 200) {
    await res.body.dump()
    throw new Error(`origin answered ${res.statusCode}`)
  }
  let index = 0
  let buf = Buffer.allocUnsafe(pieceBounds(0, blob.size, blob.pieceSize).length)
  let filled = 0
  for await (const c of res.body) {
    const chunk = c as Buffer
    let off = 0
    while (off < chunk.length && index < blob.count) {
      const n = Math.min(chunk.length - off, buf.length - filled)
      chunk.copy(buf, filled, off, off + n)
      filled += n
      off += n
      if (filled < buf.length) continue
      const { data, hex } = disguise(blob, index, buf)
      land(blob, index, data, hex)
      await announce(blob, [[index, hex]])
      index++
      if (index < blob.count) {
        buf = Buffer.allocUnsafe(pieceBounds(index, blob.size, blob.pieceSize).length)
        filled = 0
      }
    }
  }
  if (index < blob.count) throw new Error(`origin body ended at piece ${index} of ${blob.count}`)
}

/* Scheduler → this node: take every command, do what a seed would (with the chosen lie). */

await node.handle(CONTROL_PROTOCOL, async (stream) => {
  const io = messages(stream)
  const command = await io.read(ControlCommand, 'control command', { signal: AbortSignal.timeout(10_000) })
  let answer: ControlResponse = { ok: true }
  if (command.type === 'fetch') {
    fetches.push({ digest: command.digest, size: command.size, lie: lie.kind, at: Date.now() })
    if (!held.has(command.digest)) {
      const blob = track(command.digest, command.size, command.origin, command.mediaType, lie)
      void fetchFromOrigin(blob).catch((err: unknown) => {
        blob.error = (err as Error).message
        logger.warn({ digest: blob.digest, err: blob.error }, 'origin fetch failed')
      })
    }
  } else if (command.type === 'evict') {
    // Noted, and ignored: a hostile member keeps what it has.
    evictions.push(command.digest)
  } else {
    answer = { ok: false, code: 'DF_ERR_NOT_SEED', message: 'no preheat here' }
  }
  await io.write(answer, { signal: AbortSignal.timeout(10_000) })
  await stream.close().catch(() => {})
}, { maxInboundStreams: 64 })

/* The control channel */

type Command =
  | { id: number, cmd: 'status' }
  | { id: number, cmd: 'lie', lie: Lie }
  | { id: number, cmd: 'report', report: Report }
  | { id: number, cmd: 'preannounce', digest: string, size: number, origin?: OriginRef, mediaType?: string }
  | { id: number, cmd: 'exit' }

function status (): Record<string, unknown> {
  return {
    peerId: node.peerId,
    upload: uploadUrl,
    seed: config.seed,
    lie,
    fetches,
    evictions,
    reports,
    served: Object.fromEntries(served),
    servedBytes,
    refused,
    blobs: [...held.values()].map(b => ({ digest: b.digest, size: b.size, pieces: b.bytes.size, count: b.count, lie: b.lie.kind, ...(b.error === undefined ? {} : { error: b.error }) }))
  }
}

async function run (command: Command): Promise<Record<string, unknown>> {
  switch (command.cmd) {
    case 'status':
      return status()
    case 'lie':
      lie = command.lie
      return { lie }
    case 'report': {
      const answer = await ask({ type: 'report', report: command.report }, AckResponse)
      reports.push({ report: command.report, answer })
      return { answer }
    }
    case 'preannounce': {
      // Claim a whole blob nobody holds yet: zero-filled pieces, their SHA-256s announced, zeros served.
      const blob = track(command.digest, command.size, command.origin, command.mediaType, { kind: 'preannounced', fill: 'zeros' })
      const pieces: Array<[number, string]> = []
      for (let i = 0; i < blob.count; i++) {
        const data = Buffer.alloc(pieceBounds(i, blob.size, blob.pieceSize).length)
        const hex = sha256(data)
        land(blob, i, data, hex)
        pieces.push([i, hex])
      }
      return { answer: await announce(blob, pieces) }
    }
    case 'exit':
      setImmediate(() => { void shutdown() })
      return {}
  }
}

let stopping: Promise<void> | undefined
async function shutdown (): Promise<void> {
  stopping ??= (async () => {
    await ask({ type: 'leave' }, AckResponse).catch(() => {})
    http.closeAllConnections()
    await new Promise<void>((resolve) => http.close(() => { resolve() }))
    await node.stop().catch(() => {})
    process.exit(0)
  })()
  await stopping
}

process.on('SIGTERM', () => { void shutdown() })
process.on('SIGINT', () => { void shutdown() })

const lines = createInterface({ input: process.stdin })
lines.on('line', (line) => {
  if (line.trim() === '') return
  let command: Command
  try {
    command = JSON.parse(line) as Command
  } catch {
    process.stdout.write(`${JSON.stringify({ id: -1, ok: false, error: 'not JSON' })}\n`)
    return
  }
  run(command).then(
    (result) => { process.stdout.write(`${JSON.stringify({ id: command.id, ok: true, ...result })}\n`) },
    (err: unknown) => { process.stdout.write(`${JSON.stringify({ id: command.id, ok: false, error: (err as Error).message })}\n`) }
  )
})
lines.on('close', () => { void shutdown() })

process.stdout.write(`${JSON.stringify({ event: 'ready', peerId: node.peerId, upload: uploadUrl, addrs: node.addrs() })}\n`)
logger.info({ peerId: node.peerId, upload: uploadUrl, seed: config.seed }, 'hostile member joined the cluster')
