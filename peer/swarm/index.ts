import { hostname } from 'node:os'
import { LRUCache } from 'lru-cache'
import type { AbortOptions } from '../../src/abort.ts'
import type { Logger } from '../../src/logger.ts'
import type { Registry } from '../../src/metrics.ts'
import { createP2PNode, type P2PNode } from '../../src/p2p/index.ts'
import { LookupTagResponse, type Fact, type Load, type OriginRef } from '../../src/protocol/messages.ts'
import { VERSION } from '../../src/version.ts'
import type { PublicFacts } from '../auth/index.ts'
import type { BlobService, BlobTask, OriginDirective, PieceSourceContext, RemotePiece, RemotePieceSource } from '../blobs/index.ts'
import type { OriginClient } from '../origin/index.ts'
import type { PieceStore } from '../piece-store/index.ts'
import type { PublicContent } from '../facts/public.ts'
import type { TagCache, TagRecord } from '../facts/tags.ts'
import type { UpstreamSelector } from '../upstream/index.ts'
import { createControlHandler, type ControlHandler } from './control.ts'
import { createPieceFetcher, type PieceFetcher } from './fetcher.ts'
import { createPieceHttpClient } from './piece-http.ts'
import { createPieceServer, type PieceServer } from './piece-server.ts'
import { createSchedulerClient, type SchedulerClient } from './scheduler-client.ts'

export interface SwarmComponents {
  logger: Logger
  store: PieceStore
  tags: TagCache
  /** What this peer saw registries serve anonymously; shared with the swarm. */
  publicContent: PublicContent
  metrics?: Registry | undefined
}

export interface SwarmInit {
  dataDir: string
  /** Multiaddrs the piece exchange listens on. */
  listen: string[]
  announce?: string[] | undefined
  /** Scheduler address: `host:port` or a multiaddr. */
  scheduler: string
  seed: boolean
  location: string
  idc: string
  uploadConcurrency: number
  /** Bytes/s across all uploads; 0 for no limit. */
  uploadRateLimit: number
  /** Upload-port connections one address may hold. */
  uploadConnectionsPerAddress?: number
  /** The HTTP upload port (the piece data plane); absent to send pieces over libp2p streams. */
  upload?: { host: string, port: number } | undefined
  clusterSecret?: string | undefined
  /** Test-only fault switches (see PieceServerInit.corruptPieces). */
  faults?: { corruptPieces?: boolean } | undefined
}

/** What the swarm needs from the rest of the peer once those exist. */
export interface SwarmServices {
  blobs: BlobService
  origin: OriginClient
  upstreams: UpstreamSelector
}

export interface Swarm extends RemotePieceSource {
  readonly peerId: string
  addrs: () => string[]
  readonly publicFacts: PublicFacts
  /** The last digest the swarm saw a tag point at (for when the origin is down). */
  lookupTag: (origin: string, repo: string, tag: string, options?: AbortOptions) => Promise<TagRecord | undefined>
  /** Tell the swarm a tag was resolved (a fact about content, shared with every peer). */
  announceTag: (origin: string, repo: string, tag: string, record: TagRecord) => void
  start: (services: SwarmServices) => Promise<void>
  stop: () => Promise<void>
}

/**
 * A peer's membership in the swarm: its libp2p node, its session with the
 * scheduler, the piece fetcher (what the blob service asks before the origin)
 * and the piece server (what other peers ask of this one).
 */
export async function createSwarm (components: SwarmComponents, init: SwarmInit): Promise<Swarm> {
  const { store, tags, publicContent } = components
  const logger = components.logger.child({ component: 'peer:swarm' })
  const node: P2PNode = await createP2PNode({ logger }, {
    dataDir: init.dataDir,
    keyName: 'peer.key',
    listen: init.listen,
    announce: init.announce,
    clusterSecret: init.clusterSecret
  })
  // lru-cache allocates its arrays for `max` up front: a node's cache holds thousands of blobs, not 100,000.
  const origins = new LRUCache<string, OriginRef>({ max: 16_384 })
  let server: PieceServer | undefined
  let control: ControlHandler | undefined
  let loadTimer: NodeJS.Timeout | undefined
  let lastLoad = ''

  const client: SchedulerClient = createSchedulerClient({
    logger,
    node,
    store,
    hostInfo: () => ({
      peerId: node.peerId,
      addrs: node.addrs(),
      hostname: hostname(),
      seed: init.seed,
      location: init.location,
      idc: init.idc,
      uploadCapacity: init.uploadConcurrency,
      version: VERSION,
      ...(server === undefined || server.uploadUrls.length === 0 ? {} : { upload: server.uploadUrls })
    }),
    facts: () => [
      ...tags.entries().map(({ origin, repo, tag, record }): Fact => ({ kind: 'tag', registry: origin, repo, tag, digest: record.digest, size: record.size, seenAt: record.seenAt, ...(record.mediaType === undefined ? {} : { mediaType: record.mediaType }) })),
      ...publicContent.entries().map(({ origin, repo, digest, record }): Fact => ({ kind: 'public', registry: origin, repo, digest, size: record.size, ...(record.mediaType === undefined ? {} : { mediaType: record.mediaType }) }))
    ],
    originOf: (digest) => origins.get(digest)
  }, { address: init.scheduler })

  // Children fetch over HTTP from parents that offer an upload port, unless this peer keeps pieces on libp2p.
  const http = init.upload === undefined ? undefined : createPieceHttpClient({ self: node.peerId, secret: init.clusterSecret === undefined || init.clusterSecret === '' ? undefined : Buffer.from(init.clusterSecret, 'utf8') })
  const fetcher: PieceFetcher = createPieceFetcher({ logger, node, client, store, metrics: components.metrics, http })

  // Every piece that lands (or leaves) is news for the scheduler; pieces from
  // the origin confirm the table's entries, and a verified blob all of them.
  store.on('piece', (digest, index, sha256, source) => {
    const info = store.info(digest)
    if (info === undefined) return
    const origin = origins.get(digest)
    client.queue({ digest, size: info.size, ...(info.mediaType === undefined ? {} : { mediaType: info.mediaType }), ...(origin === undefined ? {} : { origin }), add: [[index, sha256]], ...(source === 'origin' ? { fromOrigin: [index] } : {}) })
  })
  store.on('verified', (digest) => {
    const info = store.info(digest)
    if (info !== undefined) client.queue({ digest, size: info.size, verified: true })
  })
  store.on('removed', (digest, _reason, index) => {
    const info = store.info(digest)
    client.queue({ digest, size: info?.size ?? 0, remove: index === undefined ? true : [index] })
    if (index === undefined) fetcher.forget(digest)
  })
  // Pieces that each matched the table made a blob that does not match its digest: the table is wrong.
  store.on('mismatch', (digest, table) => { client.report({ kind: 'blob-mismatch', digest, table }) })

  const noteTask = (task: BlobTask): void => {
    origins.set(task.digest, { registry: task.upstream.origin, repo: task.repo, kind: task.kind })
  }

  return {
    get peerId () { return node.peerId },
    addrs: () => node.addrs(),
    publicFacts: {
      async lookup (origin, repo, digest) {
        const local = publicContent.get(origin, repo, digest)
        if (local !== undefined) return local
        // The swarm answers only what more than one member has seen: one member's word opens nothing.
        const fact = (await client.request({ type: 'lookup-public', registry: origin, repo, digest }, LookupTagResponse).catch(() => undefined))?.fact
        return fact?.kind === 'public' ? { size: fact.size, mediaType: fact.mediaType } : undefined
      },
      record (origin, repo, digest, size, mediaType) {
        if (publicContent.get(origin, repo, digest) !== undefined) return
        publicContent.set(origin, repo, digest, { size, mediaType })
        client.queueFact({ kind: 'public', registry: origin, repo, digest, size, ...(mediaType === undefined ? {} : { mediaType }) })
      }
    },
    async lookupTag (origin, repo, tag, options = {}) {
      const res = await client.request({ type: 'lookup-tag', registry: origin, repo, tag }, LookupTagResponse, options).catch(() => undefined)
      const fact = res?.fact
      if (fact?.kind !== 'tag') return undefined
      return { digest: fact.digest, mediaType: fact.mediaType, size: fact.size, seenAt: fact.seenAt }
    },
    announceTag (origin, repo, tag, record) {
      client.queueFact({ kind: 'tag', registry: origin, repo, tag, digest: record.digest, size: record.size, seenAt: record.seenAt, ...(record.mediaType === undefined ? {} : { mediaType: record.mediaType }) })
    },
    async fetch (ctx: PieceSourceContext, index: number, options: AbortOptions): Promise<RemotePiece | OriginDirective> {
      noteTask(ctx.task)
      return fetcher.fetch(ctx, index, options)
    },
    originFailed (task, error) {
      fetcher.originFailed?.(task, error)
    },
    mismatch (task, evidence) {
      fetcher.mismatch?.(task, evidence)
    },
    async start (services) {
      server = createPieceServer({
        logger,
        node,
        blobs: services.blobs,
        metrics: components.metrics,
        firstFetcherOf: (digest, index) => fetcher.isFirstFetcher(digest, index) || (control?.isSeedTask(digest) ?? false)
      }, { concurrency: init.uploadConcurrency, rateLimit: init.uploadRateLimit, ...(init.uploadConnectionsPerAddress === undefined ? {} : { connectionsPerAddress: init.uploadConnectionsPerAddress }), corruptPieces: init.faults?.corruptPieces === true, http: init.upload, clusterSecret: init.clusterSecret })
      await server.start()
      control = createControlHandler({
        logger,
        node,
        blobs: services.blobs,
        store,
        origin: services.origin,
        upstreams: services.upstreams,
        schedulerPeer: () => client.peerId,
        reportFailure: (digest) => { client.report({ kind: 'origin-failed', digest, code: 'seed' }) },
        reannounce: (digest) => { client.reannounce(digest) }
      }, { seed: init.seed })
      await control.start()
      client.start()
      // Serve only once we know whether the swarm is there: a peer that starts
      // pulling before its session would send everything to the origin.
      await Promise.race([client.settled(), new Promise(resolve => setTimeout(resolve, 5_000).unref())])
      // Upload load, measured parent speeds and byte counts go to the scheduler every 2 s when they change.
      loadTimer = setInterval(() => {
        const load: Load = {
          activeUploads: server?.activeUploads ?? 0,
          parents: fetcher.parentRates().map(([p, r]): [string, number] => [p, Math.round(r)]),
          bytes: { ...services.blobs.byteCounts(), uploaded: server?.uploadedBytes ?? 0 }
        }
        const key = JSON.stringify(load)
        if (key !== lastLoad) {
          lastLoad = key
          client.setLoad(load)
        }
      }, 2_000)
      loadTimer.unref()
      logger.info({ peerId: node.peerId, addrs: node.addrs(), scheduler: init.scheduler, seed: init.seed }, 'swarm started')
    },
    async stop () {
      if (loadTimer !== undefined) clearInterval(loadTimer)
      control?.stop()
      server?.stop()
      await client.stop()
      await http?.close()
      await node.stop()
    }
  }
}
