import { randomUUID } from 'node:crypto'
import { DamselflyError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import type { ControlCommand, ControlResponse, PreheatBlobResult } from '../../src/protocol/messages.ts'
import type { HostRecord, JobRecord, JobStatus, SwarmState } from '../state/index.ts'

export type { JobStatus }

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

/** A job as every scheduler replica sees it. */
export type PreheatJob = JobRecord

export interface PreheatJobsComponents {
  logger: Logger
  state: SwarmState
  /** Records a job or a change to it where every replica sees it; resolves with the job as kept. */
  record: (job: PreheatJob) => Promise<PreheatJob>
  /** This replica's id: a job dies with the replica that runs it. */
  replica: string
  control: (peerId: string, command: ControlCommand) => Promise<ControlResponse>
}

export interface PreheatJobs {
  /** Throws StateUnavailableError when the job cannot be recorded (the replicas' store is away). */
  create: (request: PreheatRequest) => Promise<PreheatJob>
  get: (id: string) => PreheatJob | undefined
  /** By the small number clients that read ids as integers use. */
  byNumber: (number: number) => PreheatJob | undefined
  list: () => PreheatJob[]
}

/**
 * Preheat jobs: a seed peer resolves the image (index → platform manifests →
 * config and layers) and fetches every blob into the swarm before anyone asks.
 * The least busy connected seed takes each job.
 */
export function createPreheatJobs (components: PreheatJobsComponents): PreheatJobs {
  const logger = components.logger.child({ component: 'scheduler:preheat' })
  const { state } = components
  /** Jobs this replica runs, per seed, to spread them. */
  const running = new Map<string, number>()

  /** A change to a job, recorded; a store that is away loses the change, not the job's run. */
  const update = async (job: PreheatJob, change: Partial<PreheatJob>): Promise<PreheatJob> => {
    const next = { ...job, ...change }
    return components.record(next).catch((err: unknown) => {
      logger.warn({ job: job.id, err: (err as Error).message }, 'a preheat job\'s progress could not be recorded')
      return next
    })
  }

  function pickSeed (): HostRecord | undefined {
    let best: HostRecord | undefined
    for (const host of components.state.hosts()) {
      if (!host.info.seed || host.barredUntil > Date.now()) continue
      if (best === undefined || (running.get(host.info.peerId) ?? 0) < (running.get(best.info.peerId) ?? 0)) best = host
    }
    return best
  }

  async function run (created: PreheatJob, request: PreheatRequest): Promise<void> {
    const seed = pickSeed()
    if (seed === undefined) {
      await finish(created, 'FAILURE', 'no seed peer is connected to the scheduler', [])
      return
    }
    const peerId = seed.info.peerId
    const job = await update(created, { seed: peerId, status: 'RUNNING' })
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
      const results = res.results ?? []
      const failed = results.filter(r => r.status === 'FAILURE')
      await finish(job, failed.length === 0 ? 'SUCCESS' : 'FAILURE', failed.length === 0 ? undefined : `${failed.length} of ${results.length} blobs failed`, results)
    } catch (err) {
      await finish(job, 'FAILURE', (err as Error).message, [])
    } finally {
      running.set(peerId, (running.get(peerId) ?? 1) - 1)
    }
  }

  async function finish (job: PreheatJob, status: JobStatus, error: string | undefined, results: PreheatBlobResult[]): Promise<void> {
    await update(job, { status, error, results, finishedAt: Date.now() })
    logger.info({ job: job.id, status, error, blobs: results.length }, 'preheat finished')
  }

  return {
    async create (request) {
      const { credentials: _kept, authorization: _alsoKept, ...shown } = request
      const job = await components.record({ id: randomUUID(), number: 0, request: shown, status: 'PENDING', seed: undefined, replica: components.replica, createdAt: Date.now(), finishedAt: undefined, error: undefined, results: [] })
      logger.info({ job: job.id, registry: request.registry, repo: request.repo, reference: request.reference }, 'preheat requested')
      void run(job, request)
      return job
    },
    get: (id) => state.job(id),
    byNumber: (number) => state.jobByNumber(number),
    list: () => state.jobs()
  }
}
