import { once } from 'node:events'
import { createServer, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http'
import type { AddressInfo } from 'node:net'

/**
 * A registry in one node:http server, for unit tests of the registry clients:
 * every path but `/token` wants `Authorization: Bearer <a token it issued>`
 * (or, with `challenge: 'basic'`, alice's Basic credentials) and otherwise
 * answers 401 with a challenge; `/token` is the realm, issuing tokens to
 * anyone (anonymous) or to alice with her password, and 401 to a wrong one.
 * What an authorized request gets is up to `routes`; unknown paths are 404.
 */
export interface TokenOriginOptions {
  challenge?: 'bearer' | 'basic'
  /** Status the token service answers instead of a token. */
  tokenStatus?: number
  /** `expires_in` of issued tokens, seconds. */
  expiresIn?: number
}

export interface Answer {
  status: number
  headers?: OutgoingHttpHeaders
  body?: Buffer | string
}

export interface TokenOrigin {
  url: string
  realm: string
  /** Every token request: its query and Authorization. */
  readonly tokenRequests: Array<{ service: string | null, scope: string | null, authorization: string | undefined }>
  /** Every other request: method, path, query and headers. */
  readonly requests: Array<{ method: string, path: string, search: string, headers: IncomingHttpHeaders }>
  routes: Map<string, Answer>
  close: () => Promise<void>
}

export const ALICE = { username: 'alice', password: 'alice-password' }
const ALICE_BASIC = `Basic ${Buffer.from(`${ALICE.username}:${ALICE.password}`).toString('base64')}`

export async function startTokenOrigin (options: TokenOriginOptions = {}): Promise<TokenOrigin> {
  const issued = new Set<string>()
  const tokenRequests: TokenOrigin['tokenRequests'] = []
  const requests: TokenOrigin['requests'] = []
  const routes = new Map<string, Answer>()
  let realm = ''
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://origin.test')
    if (url.pathname === '/token') {
      tokenRequests.push({ service: url.searchParams.get('service'), scope: url.searchParams.get('scope'), authorization: req.headers.authorization })
      const status = options.tokenStatus ?? (req.headers.authorization === undefined || req.headers.authorization === ALICE_BASIC ? 200 : 401)
      if (status !== 200) {
        res.writeHead(status, { 'content-type': 'application/json' }).end('{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}')
        return
      }
      const token = `tok-${issued.size + 1}`
      issued.add(token)
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token, ...(options.expiresIn === undefined ? {} : { expires_in: options.expiresIn }) }))
      return
    }
    requests.push({ method: req.method ?? 'GET', path: url.pathname, search: url.search, headers: req.headers })
    const authorization = req.headers.authorization ?? ''
    const authorized = options.challenge === 'basic' ? authorization === ALICE_BASIC : issued.has(authorization.replace(/^Bearer /, ''))
    if (!authorized) {
      const challenge = options.challenge === 'basic'
        ? 'Basic realm="registry"'
        // An escaped quote and an unquoted parameter: the parser must take both.
        : `Bearer realm="${realm}",service="token \\"origin\\"",error=insufficient_scope`
      res.writeHead(401, { 'www-authenticate': challenge, 'content-type': 'application/json' }).end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}')
      return
    }
    const answer = routes.get(url.pathname) ?? { status: 404, body: '{"errors":[{"code":"NOT_FOUND","message":"unknown"}]}' }
    res.writeHead(answer.status, answer.headers ?? {}).end(req.method === 'HEAD' ? undefined : answer.body)
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  realm = `${url}/token`
  return {
    url,
    realm,
    tokenRequests,
    requests,
    routes,
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}
