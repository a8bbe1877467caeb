import { mkdir } from 'node:fs/promises'
import { resolve } from 'node:path'
import type { FastifyInstance } from 'fastify'
import type { ResolvedSchedulerConfig } from '../src/config/index.ts'
import type { Logger } from '../src/logger.ts'
import { createMetricsRegistry } from '../src/metrics.ts'
import { createP2PNode, type P2PNode } from '../src/p2p/index.ts'
import { buildSchedulerApi } from './api/app.ts'
import { createPreheatJobs, type PreheatJob } from './preheat/index.ts'
import { createSchedulerService } from './rpc/index.ts'
import { createSwarm } from './swarm/index.ts'

export interface SchedulerDeps {
  logger: Logger
}

export interface Scheduler {
  start: () => Promise<void>
  stop: () => Promise<void>
  /** Multiaddrs peers dial (with /p2p/), and the HTTP API URL when it listens. */
  readonly addresses: { p2p: string[], http: string | undefined }
}

type StateKeys = 'state' | 'statePasswordFile' | 'stateCaFile' | 'statePassword' | 'stateCa'
/** Without the `state` keys: one scheduler, in memory (the peer's embedded scheduler). */
export type SchedulerConfig = Omit<ResolvedSchedulerConfig, 'httpPort' | 'api' | 'apiToken' | StateKeys> & Partial<Pick<ResolvedSchedulerConfig, StateKeys>> & { httpPort: number | undefined, apiToken?: string | undefined }

/**
 * The scheduler's composition root. `httpPort` undefined runs without the HTTP
 * API (the embedded scheduler), which then needs no API token either.
 */

export async function createScheduler (config: SchedulerConfig, deps: SchedulerDeps): Promise<Scheduler> {
  const logger = deps.logger
  const dataDir = resolve(config.dataDir)
  await mkdir(dataDir, { recursive: true })
  const metrics = createMetricsRegistry({}, { processMetrics: true })
  const stateUrl = config.state ?? 'memory'
  const { state, trust, scheduling, machine, log } = createSwarm({ logger, metrics }, { state: stateUrl, redis: { password: config.statePassword, ca: config.stateCa } })
  let node: P2PNode | undefined
  let service: ReturnType<typeof createSchedulerService> | undefined
  let api: FastifyInstance | undefined
  let ready = false
  const addresses: { p2p: string[], http: string | undefined } = { p2p: [], http: undefined }
  const host = config.host.includes(':') ? `/ip6/${config.host}` : `/ip4/${config.host}`

  return {
    addresses,
    async start () {
      node = await createP2PNode({ logger }, {
        dataDir,
        keyName: 'scheduler.key',
        listen: [`${host}/tcp/${config.port}`],
        announce: config.announce,
        clusterSecret: config.clusterSecret,
        maxConnections: 20_000,
        inboundConnectionThreshold: 1_000,
        maxIncomingPendingConnections: 1_024,
        // Noise only: its sessions carry small messages, where TLS (a certificate made and parsed per
        // connection, a TLS socket over a JS stream) cost 256 MiB per 1,000 idle sessions against
        // Noise's 158, and 21 ms of CPU per session connected against 13. Peers propose TLS first
        // (for pieces) and take Noise when the scheduler declines.
        encrypters: ['noise']
      })
      await log.start()
      service = createSchedulerService({ logger, node, state, machine, log, scheduling, trust, metrics })
      await service.start()
      const record = async (job: PreheatJob): Promise<PreheatJob> => {
        const { job: kept } = await log.append({ type: 'job', job })
        return kept ?? job
      }
      const jobs = createPreheatJobs({ logger, state, record, replica: log.replica, control: async (peerId, command) => (service as NonNullable<typeof service>).control(peerId, command) })
      addresses.p2p = node.addrs()
      if (config.httpPort !== undefined) {
        api = buildSchedulerApi({ logger, state, jobs, metrics, ready: () => ready, replica: () => ({ id: log.replica, state: stateUrl === 'memory' ? 'memory' : 'redis', healthy: log.healthy }), apiToken: config.apiToken ?? '' })
        addresses.http = await api.listen({ host: config.httpHost, port: config.httpPort })
      }
      ready = true
      logger.info({ p2p: addresses.p2p, http: addresses.http, peerId: node.peerId }, 'scheduler ready')
    },
    async stop () {
      ready = false
      await api?.close()
      await service?.stop()
      await node?.stop()
      await log.stop()
    }
  }
}
