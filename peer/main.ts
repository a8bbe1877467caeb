import { mkdir, readFile } from 'node:fs/promises'
import { resolve } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { Agent } from 'undici'
import { BufferPool, registerPoolMetrics } from '../src/buffer-pool.ts'
import { isLoopbackHost, type ResolvedPeerConfig } from '../src/config/index.ts'
import type { Logger } from '../src/logger.ts'
import { createMetricsRegistry } from '../src/metrics.ts'
import { MIN_PIECE_SIZE } from '../src/pieces.ts'
import { createRateLimits } from '../src/rate.ts'
import { createAccessChecker } from './auth/index.ts'
import { createBlobService } from './blobs/index.ts'
import { createPassthrough } from './blobs/passthrough.ts'
import { buildMirrorApp } from './mirror/app.ts'
import { createOriginClient } from './origin/index.ts'
import { createPieceStore } from './piece-store/index.ts'
import { createForwardProxy, type ForwardProxy } from './proxy/index.ts'
import { createPublicContent } from './facts/public.ts'
import { createTagCache } from './facts/tags.ts'
import { createControlHandler } from './jobs/control.ts'
import { startLoadReport } from './jobs/load-report.ts'
import { createManifestService } from './manifests/index.ts'
import { createSwarm } from './swarm/index.ts'
import { createUploadServer } from './upload/index.ts'
import { TaskRegistry } from './upload/tasks.ts'
import { createUpstreamSelector } from './upstream/index.ts'
import { ConfigError } from '../src/errors.ts'

/** Free piece buffers kept for reuse: a reader has 8 pieces under way; past what is kept, buffers are allocated and left to the collector. */
const PIECE_BUFFERS = 16

export interface PeerDeps {
  logger: Logger
  /** Scheduler to join when the configuration names none (the CLI's embedded one). */
  scheduler?: string | undefined
  /** Test-only fault switches, set by the test suite through the CLI's environment. */
  faults?: { corruptPieces?: boolean } | undefined
}

export interface Peer {
  start: () => Promise<void>
  stop: () => Promise<void>
  /** Where each mirror listener ended up (useful with port 0). */
  readonly addresses: { mirror: string, health: string | undefined, extra: string[], p2p: string[] }
  readonly peerId: string
}

/**
 * The peer's composition root: the only place that picks concrete classes.
 * Built in dependency order — piece store and facts, origin client, swarm
 * (session and piece fetcher), access rule, blob service and manifests, then
 * what sits on the data path: the upload server, the scheduler's commands,
 * the mirror — and stopped in reverse. Nothing lower calls anything higher.
 */
export async function createPeer (config: ResolvedPeerConfig, deps: PeerDeps): Promise<Peer> {
  const logger = deps.logger
  const dataDir = resolve(config.dataDir)
  await mkdir(dataDir, { recursive: true })

  const metrics = createMetricsRegistry({}, { processMetrics: true })
  const store = createPieceStore({ logger, metrics }, {
    dataDir,
    quotaBytes: config.cacheSize,
    memoryCacheBytes: config.memoryCacheSize,
    diskHighWatermark: config.diskHighWatermark / 100,
    diskLowWatermark: config.diskLowWatermark / 100,
    ttlMs: config.cacheTtl
  })
  const tags = createTagCache({ logger }, { dataDir })
  const publicContent = createPublicContent({ logger }, { dataDir })

  const ca = config.originCa === '' ? undefined : await readConfigFile(config.originCa, 'originCa')
  // One dispatcher for every origin: undici keeps a keep-alive pool per origin inside it.
  const dispatcher = new Agent({
    connections: 64,
    keepAliveTimeout: 30_000,
    connect: { timeout: 10_000, ...(ca === undefined ? {} : { ca }) }
  })
  const origin = createOriginClient({ logger, dispatcher, metrics })
  // Trusted registries: exactly the ones this configuration names.
  const upstreams = createUpstreamSelector({
    defaultRegistry: config.registry,
    registries: [...config.registries, ...config.mirrors.map(m => m.registry), ...config.proxy.intercept.map(h => `https://${h.replace(/:443$/, '')}`)],
    allowUnlisted: config.allowUnlistedRegistries
  })
  const scheduler = config.schedulers.length > 0 ? config.schedulers : deps.scheduler === undefined ? [] : [deps.scheduler]
  if (scheduler.length === 0) throw new ConfigError('scheduler', 'no scheduler address and no embedded scheduler')
  // The swarm: membership, the session with the scheduler, the piece fetcher. Below the data path.
  // Pieces from peers and from the origin land in reused buffers, given back by whoever held them last
  // (the disk write, readers, the client's socket): fresh ones kept the collector busy at line rate.
  const buffers = new BufferPool(MIN_PIECE_SIZE, PIECE_BUFFERS)
  registerPoolMetrics(metrics, 'damselfly_piece_buffers', 'Buffers pieces were received into, from peers or the origin: reused (given back by every holder and taken again), allocated, free now', buffers)
  const swarm = await createSwarm({ logger, store, tags, publicContent, metrics, buffers }, {
    dataDir,
    listen: [`${config.p2pHost.includes(':') ? '/ip6' : '/ip4'}/${config.p2pHost}/tcp/${config.p2pPort}`],
    announce: config.announce,
    scheduler,
    seed: config.seed,
    location: config.labels.location,
    idc: config.labels.idc,
    uploadCapacity: config.uploadConcurrency,
    httpPieces: config.pieceTransport === 'http',
    clusterSecret: config.clusterSecret
  })
  const access = createAccessChecker({ logger, origin, metrics, publicFacts: swarm.publicFacts }, {
    enabled: config.authCheck,
    ttlMs: config.authCacheTtl,
    staleIfErrorMs: config.authStaleIfError
  })
  // The data path: cache, swarm, origin.
  const rates = createRateLimits({ upload: config.uploadRateLimit, origin: config.originRateLimit, download: config.downloadRateLimit, prefetch: config.prefetchRateLimit }, metrics)
  const blobs = createBlobService({ logger, store, origin, access, metrics, source: swarm.fetcher, rates, buffers })
  const manifests = createManifestService({ logger, origin, blobs, access, tags, swarm })
  const passthrough = createPassthrough({ origin })

  // Above it: what other peers ask of this one, and what the scheduler tells it to do.
  const tasks = new TaskRegistry()
  const uploads = createUploadServer({
    logger,
    node: swarm.node,
    supply: blobs,
    tasks,
    metrics,
    sentFor: (digest, index) => swarm.fetcher.isFirstFetcher(digest, index),
    rate: rates.upload
  }, {
    concurrency: config.uploadConcurrency,
    connectionsPerAddress: config.uploadConnectionsPerAddress,
    corruptPieces: deps.faults?.corruptPieces === true,
    http: config.pieceTransport === 'http' ? { host: config.p2pHost, port: config.uploadPort } : undefined,
    clusterSecret: config.clusterSecret,
    // A seed sends each piece to one child at a time, so children have pieces to give each other.
    onePerPiece: config.seed
  })
  const control = createControlHandler({ logger, node: swarm.node, blobs, origin, upstreams, session: swarm.session, tasks }, { seed: config.seed })
  let loadReport: { stop: () => void } | undefined

  let proxy: ForwardProxy | undefined
  if (config.proxy.enabled) {
    // The X.509 code loads only when interception is configured.
    const ca = config.proxy.caCert === ''
      ? undefined
      : await (await import('./proxy/certs.ts')).createCertificateAuthority({ certPem: await readConfigFile(config.proxy.caCert, 'proxy.caCert'), keyPem: await readConfigFile(config.proxy.caKey, 'proxy.caKey') })
    proxy = createForwardProxy({ logger, upstreams, dispatcher, metrics }, { ca, intercept: config.proxy.intercept, allowedHosts: config.proxy.allowedHosts, openToLoopbackOnly: isLoopbackHost(config.host) })
  }

  let ready = false
  const mirrorComponents = { logger, blobs, manifests, passthrough, origin, upstreams, metrics, ready: () => ready }
  const mirror = buildMirrorApp(mirrorComponents, { serverFactory: proxy?.serverFactory })
  const extraMirrors = config.mirrors.map(m => ({ port: m.port, app: buildMirrorApp(mirrorComponents, { upstream: upstreams.requireTrusted(m.registry) }) }))
  const health = config.healthPort === 0 ? undefined : buildMirrorApp(mirrorComponents)
  const addresses: Peer['addresses'] = { mirror: '', health: undefined, extra: [], p2p: [] }
  const listening: FastifyInstance[] = []

  return {
    addresses,
    peerId: swarm.peerId,
    async start () {
      await store.start()
      await tags.start()
      await publicContent.start()
      // The upload port and the command handler are up before the scheduler hears of this peer.
      await uploads.start()
      await control.start()
      await swarm.start({ upload: uploads.uploadUrls })
      loadReport = startLoadReport({
        session: swarm.session,
        uploads: () => ({ active: uploads.activeUploads, bytes: uploads.uploadedBytes }),
        parentRates: () => swarm.fetcher.parentRates(),
        byteCounts: () => blobs.byteCounts()
      })
      addresses.p2p = swarm.addrs()
      addresses.mirror = await listen(mirror, config.host, config.port)
      for (const m of extraMirrors) addresses.extra.push(await listen(m.app, config.host, m.port))
      if (health !== undefined) addresses.health = await listen(health, config.host, config.healthPort)
      ready = true
      logger.info({ mirror: addresses.mirror, extra: addresses.extra, health: addresses.health, p2p: addresses.p2p, registry: upstreams.default.origin, seed: config.seed }, 'peer ready')
    },
    async stop () {
      ready = false
      // Stop taking requests first; in-flight responses finish or are cut.
      proxy?.close()
      await Promise.allSettled(listening.map(async app => { await app.close() }))
      loadReport?.stop()
      control.stop()
      uploads.stop()
      await swarm.stop()
      await blobs.stop()
      await publicContent.stop()
      await tags.stop()
      await store.stop()
      await dispatcher.close().catch(() => {})
    }
  }

  async function readConfigFile (file: string, key: string): Promise<string> {
    try {
      return await readFile(file, 'utf8')
    } catch (err) {
      throw new ConfigError(key, `cannot read ${file}: ${(err as Error).message}`)
    }
  }

  async function listen (app: FastifyInstance, host: string, port: number): Promise<string> {
    const address = await app.listen({ host, port })
    listening.push(app)
    return address
  }
}
