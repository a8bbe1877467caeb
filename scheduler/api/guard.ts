import { createHash, timingSafeEqual } from 'node:crypto'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { ApiForbiddenError, ApiUnauthorizedError } from '../../src/errors.ts'

export interface ApiGuard {
  /** The request carries the API token (never true when none is configured). */
  holdsToken: (request: FastifyRequest) => boolean
}

/**
 * Who may do what on the scheduler's HTTP API. Reads are open, except that
 * registry and repository names (which can name private repositories) are
 * shown only to holders of the API token. Routes in `guarded` start work
 * (preheats pull from registries with the job's credentials): with a token
 * configured they need it; without one they answer this machine only, so an
 * API reachable from the network never runs jobs for strangers.
 */
export function registerApiGuard (app: FastifyInstance, options: { token: string, guarded: ReadonlySet<string> }): ApiGuard {
  const expected = options.token === '' ? undefined : createHash('sha256').update(options.token).digest()

  const bearer = (request: FastifyRequest): string | undefined => /^Bearer\s+(\S+)\s*$/i.exec(request.headers.authorization ?? '')?.[1]
  const holdsToken = (request: FastifyRequest): boolean => {
    const given = bearer(request)
    if (expected === undefined || given === undefined) return false
    return timingSafeEqual(createHash('sha256').update(given).digest(), expected)
  }

  // A root hook, so every plugin's routes are guarded; matched on route patterns, not raw URLs.
  app.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    if (!options.guarded.has(request.routeOptions.url ?? '')) return
    if (expected !== undefined) {
      if (holdsToken(request)) return
      const err = new ApiUnauthorizedError(bearer(request) === undefined ? 'this endpoint needs Authorization: Bearer <api token>' : 'the API token is not the one this scheduler was given')
      return reply.code(401).header('www-authenticate', 'Bearer realm="damselfly"').send({ code: err.code, message: err.message })
    }
    if (isLoopback(request.socket.remoteAddress)) return
    const err = new ApiForbiddenError('this scheduler has no api.token, so it starts jobs only for callers on its own machine; set api.token (or api.tokenFile) to use this endpoint over the network')
    return reply.code(403).send({ code: err.code, message: err.message })
  })
  return { holdsToken }
}

function isLoopback (address: string | undefined): boolean {
  return address === '::1' || /^(::ffff:)?127\./.test(address ?? '')
}
