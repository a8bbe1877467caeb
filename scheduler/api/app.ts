import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import type { Logger } from '../../src/logger.ts'
import type { Registry } from '../../src/metrics.ts'
import type { PreheatJob, PreheatJobs } from '../preheat/index.ts'
import type { SwarmState } from '../state/index.ts'
import { swarmPage } from './swarm-page.ts'
import { registerApiGuard } from './guard.ts'
import { PREHEAT_ROUTES, registerHarborApi } from './harbor.ts'

export interface SchedulerApiComponents {
  logger: Logger
  state: SwarmState
  jobs: PreheatJobs
  metrics: Registry
  ready: () => boolean
  /** Which replica answers, and whether the store the replicas share takes changes now. */
  replica?: () => { id: string, state: 'memory' | 'redis', healthy: boolean }
  /** `api.token`: required on preheat endpoints when set (see harbor.ts). */
  apiToken?: string
}

/** Image references as `damselfly preheat` and people write them: `[scheme://]host[:port]/repo(:tag|@digest)`. */
export function parseImageRef (ref: string): { registry: string, repo: string, reference: string } | undefined {
  const m = /^(?:(https?):\/\/)?([^/\s]+)\/([a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)(?::([\w][\w.-]{0,127})|@(sha256:[0-9a-f]{64}))?$/.exec(ref.trim())
  if (m === null) return undefined
  const registry = m[1] === undefined ? m[2] as string : `${m[1]}://${m[2] as string}`
  return { registry, repo: m[3] as string, reference: m[5] ?? m[4] ?? 'latest' }
}

/**
 * The scheduler's HTTP API: status of hosts and tasks, preheat jobs, metrics.
 * Response schemas keep fields (and credentials) from leaking by accident.
 */
export function buildSchedulerApi (components: SchedulerApiComponents): FastifyInstance {
  const { state, jobs } = components
  const app = Fastify({
    loggerInstance: components.logger.child({ component: 'scheduler:api' }) as FastifyBaseLogger,
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: 64 * 1024
  })

  const guard = registerApiGuard(app, { token: components.apiToken ?? '', guarded: PREHEAT_ROUTES })
  registerHarborApi(app, { jobs, state })

  app.get('/healthy', async (_req, reply) => {
    if (!components.ready()) return reply.code(503).send({ status: 'starting' })
    // Still ready with Redis away: the replica then sends peers to the origin, which beats no answer.
    const replica = components.replica?.()
    return replica === undefined ? { status: 'ok' } : { status: 'ok', replica: replica.id, state: replica.state, stateHealthy: replica.healthy }
  })
  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', components.metrics.contentType)
    return components.metrics.metrics()
  })

  app.register(swarmPage, { state })

  app.get('/api/v1/hosts', async () => {
    return [...state.hosts()].map(h => ({
      peerId: h.info.peerId,
      hostname: h.info.hostname,
      seed: h.info.seed,
      addrs: h.info.addrs,
      location: h.info.location,
      idc: h.info.idc,
      uploadCapacity: h.info.uploadCapacity,
      activeUploads: h.activeUploads,
      throughput: Math.round(h.throughput),
      barred: h.barredUntil > Date.now(),
      tasks: h.tasks.size,
      connectedAt: new Date(h.connectedAt).toISOString(),
      bytes: h.bytes,
      replica: h.via
    }))
  })

  // Repository names can name private repositories: only holders of the API token see them.
  app.get('/api/v1/tasks', async (request) => {
    const showOrigin = guard.holdsToken(request)
    return [...state.tasks()].map(t => ({
      digest: t.digest,
      size: t.size,
      pieceSize: t.pieceSize,
      pieceCount: t.pieceCount,
      knownPieces: t.known.size,
      completeHolders: [...t.complete].map(s => state.hostBySlot(s)?.info.peerId).filter(Boolean),
      partialHolders: [...t.partial.entries()].map(([s, p]) => ({ peerId: state.hostBySlot(s)?.info.peerId, pieces: p.size })),
      ...(showOrigin ? { origin: t.origin } : {})
    }))
  })

  app.post('/api/v1/preheat', {
    schema: {
      body: {
        type: 'object',
        additionalProperties: false,
        required: ['image'],
        properties: {
          image: { type: 'string', minLength: 3, maxLength: 512 },
          platform: { type: 'string', pattern: '^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$' },
          username: { type: 'string', maxLength: 512 },
          password: { type: 'string', maxLength: 4096 }
        }
      }
    }
  }, async (request, reply) => {
    const body = request.body as { image: string, platform?: string, username?: string, password?: string }
    const ref = parseImageRef(body.image)
    if (ref === undefined) return reply.code(400).send({ error: 'image must look like [scheme://]host[:port]/repository[:tag|@digest]' })
    const job = await jobs.create({
      ...ref,
      platform: body.platform,
      credentials: body.username === undefined ? undefined : { username: body.username, password: body.password ?? '' }
    })
    return reply.code(202).send(jobView(job))
  })

  app.get('/api/v1/preheat/:id', async (request, reply) => {
    const job = jobs.get((request.params as { id: string }).id)
    if (job === undefined) return reply.code(404).send({ error: 'no such job' })
    return jobView(job)
  })

  return app
}

export function jobView (job: PreheatJob): Record<string, unknown> {
  return {
    id: job.id,
    status: job.status,
    image: `${job.request.registry}/${job.request.repo}${job.request.reference.startsWith('sha256:') ? '@' : ':'}${job.request.reference}`,
    platform: job.request.platform,
    seed: job.seed,
    createdAt: new Date(job.createdAt).toISOString(),
    finishedAt: job.finishedAt === undefined ? undefined : new Date(job.finishedAt).toISOString(),
    error: job.error,
    results: job.results
  }
}
