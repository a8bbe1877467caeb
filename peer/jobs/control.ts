import { DamselflyError, NotAuthorizedPeerError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { messages, type P2PNode } from '../../src/p2p/index.ts'
import { CONTROL_PROTOCOL, ControlCommand, type ControlResponse } from '../../src/protocol/messages.ts'
import type { BlobService } from '../blobs/index.ts'
import type { OriginClient } from '../origin/index.ts'
import type { SchedulerClient } from '../swarm/scheduler-client.ts'
import type { TaskRegistry } from '../upload/tasks.ts'
import type { UpstreamSelector } from '../upstream/index.ts'
import { fetchImage } from './preheat.ts'

export interface ControlComponents {
  logger: Logger
  node: P2PNode
  blobs: BlobService
  origin: OriginClient
  upstreams: UpstreamSelector
  /** The session with the scheduler: who may send commands, and where failures go. */
  session: SchedulerClient
  /** Blobs this seed claims for other peers while it fetches them. */
  tasks: TaskRegistry
}

export interface ControlInit {
  seed: boolean
}

export interface ControlHandler {
  start: () => Promise<void>
  stop: () => void
}

/** Commands from the scheduler: fetch a task (seeds), run a preheat (seeds), drop a blob whose table was reset. */
export function createControlHandler (components: ControlComponents, init: ControlInit): ControlHandler {
  const { blobs, origin, upstreams, session, tasks } = components
  const logger = components.logger.child({ component: 'peer:control' })
  const shutdown = new AbortController()

  async function run (command: ControlCommand): Promise<ControlResponse> {
    switch (command.type) {
      case 'fetch': {
        if (!init.seed) throw new DamselflyError('DF_ERR_NOT_SEED', 'only seed peers take whole tasks')
        // The scheduler relays what some peer asked for: only a registry configured here is fetched from.
        const upstream = upstreams.requireTrusted(command.origin.registry)
        // Children may ask for pieces as soon as the scheduler names us: claim the task first.
        const release = tasks.claim(command.digest)
        let credentials
        try {
          credentials = await origin.authorize(upstream, command.origin.repo, undefined, { signal: shutdown.signal })
        } catch (err) {
          release()
          throw err
        }
        const task = { upstream, repo: command.origin.repo, digest: command.digest, kind: command.origin.kind, size: command.size, mediaType: command.mediaType, credentials }
        tasks.adopt(task)
        logger.info({ digest: task.digest, size: task.size, repo: task.repo }, 'fetching a task into the swarm as its seed')
        void blobs.complete(task, { signal: shutdown.signal }).catch((err: unknown) => {
          if (shutdown.signal.aborted) return
          logger.warn({ digest: task.digest, err: (err as Error).message }, 'seed fetch failed')
          session.report({ kind: 'origin-failed', digest: task.digest, code: 'seed' })
        }).finally(release)
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
        session.reannounce(command.digest)
        return { ok: true }
      }
    }
  }

  return {
    async start () {
      await components.node.handle(CONTROL_PROTOCOL, async (stream, remotePeer) => {
        if (remotePeer !== session.peerId) throw new NotAuthorizedPeerError('control commands come from the scheduler only')
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
        await stream.close({ signal: AbortSignal.timeout(10_000) }).catch(() => {})
      }, { maxInboundStreams: 64 })
    },
    stop () {
      shutdown.abort()
    }
  }
}
