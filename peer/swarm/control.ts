import { DamselflyError, NotAuthorizedPeerError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { messages, type P2PNode } from '../../src/p2p/index.ts'
import { CONTROL_PROTOCOL, ControlCommand, type ControlResponse } from '../../src/protocol/messages.ts'
import type { BlobService } from '../blobs/index.ts'
import type { OriginClient } from '../origin/index.ts'
import type { PieceStore } from '../piece-store/index.ts'
import { fetchImage } from '../preheat/index.ts'
import type { UpstreamSelector } from '../upstream/index.ts'

export interface ControlComponents {
  logger: Logger
  node: P2PNode
  blobs: BlobService
  store: PieceStore
  origin: OriginClient
  upstreams: UpstreamSelector
  /** The scheduler's peer id while connected; commands from anyone else are refused. */
  schedulerPeer: () => string | undefined
  /** The origin failed a whole-task fetch. */
  reportFailure: (digest: string, error: unknown) => void
  /** Tells the scheduler again what this node holds of a blob. */
  reannounce: (digest: string) => void
}

export interface ControlInit {
  seed: boolean
}

export interface ControlHandler {
  start: () => Promise<void>
  stop: () => void
  /** Tasks the scheduler made this seed fetch whole; every piece of them is this node's to fetch. */
  isSeedTask: (digest: string) => boolean
}

/** Commands from the scheduler: fetch a task (seeds), run a preheat (seeds), evict a bad blob. */
export function createControlHandler (components: ControlComponents, init: ControlInit): ControlHandler {
  const { blobs, origin, upstreams } = components
  const logger = components.logger.child({ component: 'peer:control' })
  const shutdown = new AbortController()
  const seedTasks = new Map<string, number>()

  async function run (command: ControlCommand): Promise<ControlResponse> {
    switch (command.type) {
      case 'fetch': {
        if (!init.seed) throw new DamselflyError('DF_ERR_NOT_SEED', 'only seed peers take whole tasks')
        // The scheduler relays what some peer asked for: only a registry configured here is fetched from.
        const upstream = upstreams.requireTrusted(command.origin.registry)
        // Children may ask for pieces as soon as the scheduler names us: claim the task first.
        seedTasks.set(command.digest, Date.now())
        components.store.track(command.digest, command.size, { mediaType: command.mediaType })
        const credentials = await origin.authorize(upstream, command.origin.repo, undefined, { signal: shutdown.signal }).catch((err: unknown) => {
          seedTasks.delete(command.digest)
          throw err
        })
        const task = { upstream, repo: command.origin.repo, digest: command.digest, kind: command.origin.kind, size: command.size, mediaType: command.mediaType, credentials }
        blobs.adopt(task)
        logger.info({ digest: task.digest, size: task.size, repo: task.repo }, 'fetching a task into the swarm as its seed')
        void blobs.complete(task, { signal: shutdown.signal }).catch((err: unknown) => {
          if (shutdown.signal.aborted) return
          logger.warn({ digest: task.digest, err: (err as Error).message }, 'seed fetch failed')
          components.reportFailure(task.digest, err)
        }).finally(() => { seedTasks.delete(task.digest) })
        return { ok: true }
      }
      case 'preheat': {
        if (!init.seed) throw new DamselflyError('DF_ERR_NOT_SEED', 'only seed peers run preheat jobs')
        const upstream = /^https?:\/\//.test(command.registry) ? upstreams.requireTrusted(command.registry) : (upstreams.known(command.registry) ?? upstreams.requireTrusted(`https://${command.registry}`))
        // Job credentials live only in this call's scope: used for the origin, then dropped.
        // A header value from the job (Harbor's pull token) goes to the origin exactly as given.
        const credentials = command.authorization !== undefined
          ? { authorization: command.authorization }
          : await origin.authorize(upstream, command.repo, command.credentials, { signal: shutdown.signal })
        logger.info({ job: command.jobId, origin: upstream.origin, repo: command.repo, reference: command.reference }, 'preheat started')
        try {
          const results = await fetchImage({ logger, origin, blobs }, { upstream, repo: command.repo, reference: command.reference, platform: command.platform }, credentials, { signal: shutdown.signal })
          return { ok: true, results }
        } finally {
          blobs.forget(credentials)
        }
      }
      case 'evict': {
        // The table was reset swarm-wide: what is known genuine here stays, and is offered again.
        await blobs.abandon(command.digest)
        components.reannounce(command.digest)
        return { ok: true }
      }
    }
  }

  return {
    isSeedTask: (digest) => seedTasks.has(digest),
    async start () {
      await components.node.handle(CONTROL_PROTOCOL, async (stream, remotePeer) => {
        if (remotePeer !== components.schedulerPeer()) throw new NotAuthorizedPeerError('control commands come from the scheduler only')
        const io = messages(stream)
        const command = await io.read(ControlCommand, 'control command', { signal: AbortSignal.timeout(10_000) })
        let response: ControlResponse
        try {
          response = await run(command)
        } catch (err) {
          const e = err as DamselflyError
          response = { ok: false, code: typeof e.code === 'string' ? e.code : 'DF_ERR_INTERNAL', message: String(e.message).slice(0, 1000) }
        }
        await io.write(response, { signal: AbortSignal.timeout(10_000) })
        await stream.close().catch(() => {})
      }, { maxInboundStreams: 64 })
    },
    stop () {
      shutdown.abort()
    }
  }
}
