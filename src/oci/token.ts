import { OriginProtocolError } from '../errors.ts'
import type { Challenge } from './challenge.ts'

/**
 * The registry token flow, as Docker Hub, Harbor and the distribution
 * registry speak it: a 401 carries `Bearer realm="…",service="…"`; the client
 * asks the realm for a pull token of one repository (with Basic credentials,
 * or none for public images) and sends it back as `Bearer <token>`. The
 * requests themselves belong to each client: the peer's origin client retries
 * and follows redirects, `damselfly get` asks once.
 */

/** Token answers above this are refused. */
export const MAX_TOKEN_BYTES = 256 * 1024

export interface PullToken {
  /** `Bearer <token>`. */
  authorization: string
  /** Seconds the token lives, when the service said. */
  expiresIn: number | undefined
}

export function basicAuthorization (username: string, password: string): string {
  return `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}`
}

/**
 * Where to ask for a pull token of `repository`: the challenge's realm with
 * its `service` and `scope=repository:<repository>:pull`. Undefined when the
 * challenge is not Bearer with a realm; a Basic realm takes credentials as
 * they are.
 */
export function pullTokenUrl (challenge: Challenge | undefined, repository: string): URL | undefined {
  if (challenge?.scheme !== 'bearer' || challenge.params.realm === undefined) return undefined
  let realm: URL
  try {
    realm = new URL(challenge.params.realm)
  } catch {
    throw new OriginProtocolError('the registry\'s token realm is not a URL')
  }
  if (realm.protocol !== 'https:' && realm.protocol !== 'http:') throw new OriginProtocolError('the registry\'s token realm is not an http(s) URL')
  if (challenge.params.service !== undefined) realm.searchParams.set('service', challenge.params.service)
  realm.searchParams.set('scope', `repository:${repository}:pull`)
  return realm
}

/** The token service's JSON: `token`, or OAuth's `access_token`, and `expires_in`. */
export function parsePullToken (body: Buffer): PullToken {
  let parsed: unknown
  try {
    parsed = JSON.parse(body.toString('utf8'))
  } catch {
    throw new OriginProtocolError('the registry\'s token service answered something other than JSON')
  }
  const { token, access_token: accessToken, expires_in: expiresIn } = (typeof parsed === 'object' && parsed !== null ? parsed : {}) as { token?: unknown, access_token?: unknown, expires_in?: unknown }
  const value = typeof token === 'string' && token !== '' ? token : accessToken
  if (typeof value !== 'string' || value === '') throw new OriginProtocolError('the registry\'s token service returned no token')
  return { authorization: `Bearer ${value}`, expiresIn: typeof expiresIn === 'number' ? expiresIn : undefined }
}
