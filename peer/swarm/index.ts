import { hostname } from 'node:os'
import { LRUCache } from 'lru-cache'
import type { AbortOptions } from '../../src/abort.ts'
import type { BufferPool } from '../../src/buffer-pool.ts'
import type { Logger } from '../../src/logger.ts'
import type { Registry } from '../../src/metrics.ts'
import { createP2PNode, type P2PNode } from '../../src/p2p/index.ts'
import { LookupTagResponse, type Fact, type OriginRef } from '../../src/protocol/messages.ts'
import { VERSION } from '../../src/version.ts'
import type { PublicContent, PublicFacts } from '../facts/public.ts'
import type { TagCache, TagRecord } from '../facts/tags.ts'
import type { PieceInventory } from '../piece-store/index.ts'
import { createPieceFetcher, type PieceFetcher } from './fetcher.ts'
import { createPieceHttpClient, pieceKey } from './piece-http.ts'
import { createSchedulerClient, type SchedulerClient } from './scheduler-client.ts'

export interface SwarmComponents {
  logger: Logger
  /** What this peer holds, announced to the scheduler as it changes. */
  store: PieceInventory
  tags: TagCache
  /** What this peer saw registries serve anonymously; shared with the swarm. */
  publicContent: PublicContent
  metrics?: Registry | undefined
  /** Where pieces from peers are received into (shared with origin runs); fresh buffers when absent. */
  buffers?: BufferPool | undefined
}

export interface SwarmInit {
  dataDir: string
  /** Multiaddrs the libp2p node listens on. */
  listen: string[]
  announce?: string[] | undefined
  /** Scheduler addresses (`host:port` or a multiaddr each); the session moves between them. */
  scheduler: string[]
  seed: boolean
  location: string
  idc: string
  /** Pieces this peer uploads at once (told to the scheduler). */
  uploadCapacity: number
  /** Fetch pieces over other peers' HTTP upload ports (true) or libp2p streams only. */
  httpPieces: boolean
  clusterSecret?: string | undefined
}

/** What the scheduler hears about this peer at registration besides its identity. */
export interface SessionExtras {
  /** Base URLs of this peer's upload port, best first. */
  upload: string[]
}

export interface Swarm {
  readonly peerId: string
  addrs: () => string[]
  /** The libp2p node, for the protocols this peer serves (pieces, commands). */
  readonly node: P2PNode
  /** The session with the scheduler. */
  readonly session: SchedulerClient
  /** Pieces from other peers: what the blob service asks before the origin. */
  readonly fetcher: PieceFetcher
  readonly publicFacts: PublicFacts
  /** The last digest the swarm saw a tag point at (for when the origin is down). */
  lookupTag: (origin: string, repo: string, tag: string, options?: AbortOptions) => Promise<TagRecord | undefined>
  /** Tell the swarm a tag was resolved (a fact about content, shared with every peer). */
  announceTag: (origin: string, repo: string, tag: string, record: TagRecord) => void
  /**
   * Opens the session with the scheduler (registration, the whole inventory)
   * and resolves once the first attempt succeeded or failed, or after 5 s: a
   * peer that serves before its session would send everything to the origin.
   */
  start: (extras: SessionExtras) => Promise<void>
  stop: () => Promise<void>
}

/**
 * A peer's membership in the swarm: its libp2p node, its session with the
 * scheduler (which announces everything the piece store gains or loses) and
 * the piece fetcher. It sits below the blob service and knows nothing of it;
 * what other peers ask of this one is served from above (peer/upload).
 */
export async function createSwarm (components: SwarmComponents, init: SwarmInit): Promise<Swarm> {
  const { store, tags, publicContent } = components
  const logger = components.logger.child({ component: 'peer:swarm' })
  const node: P2PNode = await createP2PNode({ logger }, {
    dataDir: init.dataDir,
    keyName: 'peer.key',
    listen: init.listen,
    announce: init.announce,
    clusterSecret: init.clusterSecret,
    // With pieces on the upload port, libp2p carries the scheduler session (the scheduler takes Noise only), control
    // messages and pieces from parents that have no upload port: Noise suffices, and TLS is not even loaded (5-12 MiB).
    encrypters: init.httpPieces ? ['noise'] : ['tls', 'noise']
  })
  // lru-cache allocates its arrays for `max` up front: a node's cache holds thousands of blobs, not 100,000.
  const origins = new LRUCache<string, OriginRef>({ max: 16_384 })
  let extras: SessionExtras = { upload: [] }
  /** This node's upload port, once started: children tell parents, so that busy parents can point others here. */
  let uploadPort: number | undefined

  const session: SchedulerClient = createSchedulerClient({
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
      uploadCapacity: init.uploadCapacity,
      version: VERSION,
      ...(extras.upload.length === 0 ? {} : { upload: extras.upload })
    }),
    facts: () => [
      ...tags.entries().map(({ origin, repo, tag, record }): Fact => ({ kind: 'tag', registry: origin, repo, tag, digest: record.digest, size: record.size, seenAt: record.seenAt, ...(record.mediaType === undefined ? {} : { mediaType: record.mediaType }) })),
      ...publicContent.entries().map(({ origin, repo, digest, record }): Fact => ({ kind: 'public', registry: origin, repo, digest, size: record.size, ...(record.mediaType === undefined ? {} : { mediaType: record.mediaType }) }))
    ],
    originOf: (digest) => origins.get(digest)
  }, { addresses: init.scheduler })

  // Children fetch over HTTP from parents that offer an upload port, unless this peer keeps pieces on libp2p.
  const http = init.httpPieces
    ? createPieceHttpClient({
      self: node.peerId,
      key: pieceKey(init.clusterSecret),
      pool: { buffers: components.buffers },
      uploadPort: () => uploadPort
    })
    : undefined
  const inner = createPieceFetcher({ logger, node, client: session, metrics: components.metrics, http })
  // Where each blob comes from, as its readers said: announcements carry it.
  const fetcher: PieceFetcher = {
    ...inner,
    async fetch (ctx, index, options) {
      origins.set(ctx.task.digest, ctx.task.origin)
      return inner.fetch(ctx, index, options)
    }
  }

  // Every piece that lands (or leaves) is news for the scheduler; pieces from
  // the origin confirm the table's entries, and a verified blob all of them.
  store.on('piece', (digest, index, sha256, source) => {
    const info = store.info(digest)
    if (info === undefined) return
    const origin = origins.get(digest)
    session.queue({ digest, size: info.size, ...(info.mediaType === undefined ? {} : { mediaType: info.mediaType }), ...(origin === undefined ? {} : { origin }), add: [[index, sha256]], ...(source === 'origin' ? { fromOrigin: [index] } : {}) })
  })
  // With every piece: announcements of pieces fetched while the scheduler was away (or that were not
  // this peer's to write) were dropped, and a verified blob vouches for all of them.
  store.on('verified', (digest) => { session.reannounce(digest) })
  store.on('removed', (digest, _reason, index) => {
    const info = store.info(digest)
    session.queue({ digest, size: info?.size ?? 0, remove: index === undefined ? true : [index] })
    if (index === undefined) fetcher.forget(digest)
  })
  // Pieces that each matched the table made a blob that does not match its digest: the table is wrong.
  store.on('mismatch', (digest, table) => { session.report({ kind: 'blob-mismatch', digest, table }) })

  return {
    get peerId () { return node.peerId },
    addrs: () => node.addrs(),
    node,
    session,
    fetcher,
    publicFacts: {
      async lookup (origin, repo, digest) {
        const local = publicContent.get(origin, repo, digest)
        if (local !== undefined) return local
        // The swarm answers only what more than one member has seen: one member's word opens nothing.
        const fact = (await session.request({ type: 'lookup-public', registry: origin, repo, digest }, LookupTagResponse).catch(() => undefined))?.fact
        return fact?.kind === 'public' ? { size: fact.size, mediaType: fact.mediaType } : undefined
      },
      record (origin, repo, digest, size, mediaType) {
        if (publicContent.get(origin, repo, digest) !== undefined) return
        publicContent.set(origin, repo, digest, { size, mediaType })
        session.queueFact({ kind: 'public', registry: origin, repo, digest, size, ...(mediaType === undefined ? {} : { mediaType }) })
      }
    },
    async lookupTag (origin, repo, tag, options = {}) {
      const res = await session.request({ type: 'lookup-tag', registry: origin, repo, tag }, LookupTagResponse, options).catch(() => undefined)
      const fact = res?.fact
      if (fact?.kind !== 'tag') return undefined
      return { digest: fact.digest, mediaType: fact.mediaType, size: fact.size, seenAt: fact.seenAt }
    },
    announceTag (origin, repo, tag, record) {
      session.queueFact({ kind: 'tag', registry: origin, repo, tag, digest: record.digest, size: record.size, seenAt: record.seenAt, ...(record.mediaType === undefined ? {} : { mediaType: record.mediaType }) })
    },
    async start (given) {
      extras = given
      uploadPort = portOf(given.upload[0])
      session.start()
      await Promise.race([session.settled(), new Promise(resolve => setTimeout(resolve, 5_000).unref())])
      logger.info({ peerId: node.peerId, addrs: node.addrs(), scheduler: init.scheduler, seed: init.seed }, 'swarm started')
    },
    async stop () {
      await session.stop()
      await http?.close()
      await node.stop()
    }
  }
}

function portOf (url: string | undefined): number | undefined {
  if (url === undefined) return undefined
  const port = Number(new URL(url).port)
  return Number.isInteger(port) && port > 0 ? port : undefined
}
