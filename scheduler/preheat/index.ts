import { randomUUID } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import { DamselflyError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import type { ControlCommand, ControlResponse, PreheatBlobResult } from '../../src/protocol/messages.ts'
import type { HostRecord, SwarmState } from '../state/index.ts'

export type JobStatus = 'PENDING' | 'RUNNING' | 'SUCCESS' | 'FAILURE'

export interface PreheatRequest {
  /** Registry as a URL (`https://harbor.local`) or a host the seed maps to a scheme. */
  registry: string
  repo: string
  /** Tag or digest. */
  reference: string
  /** `os/arch[/variant]`; all platforms of an index when absent. */
  platform?: string | undefined
  /** Registry credentials for the seed; kept in memory until the job ends, never stored or returned. */
  credentials?: { username: string, password: string } | undefined
  /**
   * The origin's `Authorization` header value, sent by the seed exactly as
   * given (Harbor passes a pull token it minted). Wins over `credentials`;
   * kept like them: in memory until the job ends.
   */
  authorization?: string | undefined
}

export interface PreheatJob {
  readonly id: string
  readonly request: Omit<PreheatRequest, 'credentials' | 'authorization'>
  status: JobStatus
  /** The seed peer that ran it. */
  seed: string | undefined
  createdAt: number
  finishedAt: number | undefined
  error: string | undefined
  results: PreheatBlobResult[]
}

export interface PreheatJobsComponents {
  logger: Logger
  state: SwarmState
  control: (peerId: string, command: ControlCommand) => Promise<ControlResponse>
}

export interface PreheatJobs {
  create: (request: PreheatRequest) => PreheatJob
  get: (id: string) => PreheatJob | undefined
  list: () => PreheatJob[]
}

/**
 * Preheat jobs: a seed peer resolves the image (index → platform manifests →
 * config and layers) and fetches every blob into the swarm before anyone asks.
 * The least busy connected seed takes each job.
 */
export function createPreheatJobs (components: PreheatJobsComponents, init: { maxJobs?: number } = {}): PreheatJobs {
  const logger = components.logger.child({ component: 'scheduler:preheat' })
  const jobs = new LRUCache<string, PreheatJob>({ max: init.maxJobs ?? 1000 })
  const running = new Map<string, number>()

  function pickSeed (): HostRecord | undefined {
    let best: HostRecord | undefined
    for (const host of components.state.hosts()) {
      if (!host.info.seed || host.barredUntil > Date.now()) continue
      if (best === undefined || (running.get(host.info.peerId) ?? 0) < (running.get(best.info.peerId) ?? 0)) best = host
    }
    return best
  }

  async function run (job: PreheatJob, request: PreheatRequest): Promise<void> {
    const seed = pickSeed()
    if (seed === undefined) {
      finish(job, 'FAILURE', 'no seed peer is connected to the scheduler')
      return
    }
    const peerId = seed.info.peerId
    job.seed = peerId
    job.status = 'RUNNING'
    running.set(peerId, (running.get(peerId) ?? 0) + 1)
    try {
      const res = await components.control(peerId, {
        type: 'preheat',
        jobId: job.id,
        registry: request.registry,
        repo: request.repo,
        reference: request.reference,
        ...(request.platform === undefined ? {} : { platform: request.platform }),
        ...(request.credentials === undefined ? {} : { credentials: request.credentials }),
        ...(request.authorization === undefined ? {} : { authorization: request.authorization })
      })
      if (!res.ok) throw new DamselflyError(res.code, res.message)
      job.results = res.results ?? []
      const failed = job.results.filter(r => r.status === 'FAILURE')
      finish(job, failed.length === 0 ? 'SUCCESS' : 'FAILURE', failed.length === 0 ? undefined : `${failed.length} of ${job.results.length} blobs failed`)
    } catch (err) {
      finish(job, 'FAILURE', (err as Error).message)
    } finally {
      running.set(peerId, (running.get(peerId) ?? 1) - 1)
    }
  }

  function finish (job: PreheatJob, status: JobStatus, error: string | undefined): void {
    job.status = status
    job.error = error
    job.finishedAt = Date.now()
    logger.info({ job: job.id, status, error, blobs: job.results.length }, 'preheat finished')
  }

  return {
    create (request) {
      const { credentials: _kept, authorization: _alsoKept, ...shown } = request
      const job: PreheatJob = { id: randomUUID(), request: shown, status: 'PENDING', seed: undefined, createdAt: Date.now(), finishedAt: undefined, error: undefined, results: [] }
      jobs.set(job.id, job)
      logger.info({ job: job.id, registry: request.registry, repo: request.repo, reference: request.reference }, 'preheat requested')
      void run(job, request)
      return job
    },
    get: (id) => jobs.get(id),
    list: () => [...jobs.values()]
  }
}
