import type { FastifyReply } from 'fastify'
import { DamselflyError, OriginStatusError, RangeNotSatisfiableError, TooManyRequestsError, UnauthorizedError } from '../../src/errors.ts'

/** The one table from error codes to HTTP status and OCI error code. */
export const STATUS: Readonly<Record<string, readonly [number, string]>> = {
  DF_ERR_NAME_INVALID: [400, 'NAME_INVALID'],
  DF_ERR_DIGEST_INVALID: [400, 'DIGEST_INVALID'],
  // A manifest that cannot exist: the distribution spec and its conformance suite want 404 here, as registries answer.
  DF_ERR_REFERENCE_INVALID: [404, 'MANIFEST_UNKNOWN'],
  DF_ERR_RANGE_INVALID: [400, 'RANGE_INVALID'],
  DF_ERR_QUERY_INVALID: [400, 'UNSUPPORTED'],
  DF_ERR_RANGE_NOT_SATISFIABLE: [416, 'RANGE_INVALID'],
  DF_ERR_REGISTRY_INVALID: [400, 'UNSUPPORTED'],
  DF_ERR_REGISTRY_NOT_ALLOWED: [403, 'DENIED'],
  DF_ERR_UNSUPPORTED: [405, 'UNSUPPORTED'],
  DF_ERR_NOT_FOUND: [404, 'NAME_UNKNOWN'],
  DF_ERR_BLOB_UNKNOWN: [404, 'BLOB_UNKNOWN'],
  DF_ERR_MANIFEST_UNKNOWN: [404, 'MANIFEST_UNKNOWN'],
  DF_ERR_UNAUTHORIZED: [401, 'UNAUTHORIZED'],
  DF_ERR_DENIED: [403, 'DENIED'],
  DF_ERR_TOO_MANY_REQUESTS: [429, 'TOOMANYREQUESTS'],
  DF_ERR_QUEUE_FULL: [429, 'TOOMANYREQUESTS'],
  // 5xx on purpose: nydusd and containerd fall back to the origin on them.
  DF_ERR_ORIGIN_UNAVAILABLE: [502, 'UNAVAILABLE'],
  DF_ERR_ORIGIN_PROTOCOL: [502, 'UNAVAILABLE'],
  DF_ERR_PIECE_DIGEST_MISMATCH: [502, 'DIGEST_INVALID'],
  DF_ERR_BLOB_DIGEST_MISMATCH: [502, 'DIGEST_INVALID'],
  DF_ERR_TIMEOUT: [504, 'UNAVAILABLE'],
  DF_ERR_SCHEDULER_UNAVAILABLE: [503, 'UNAVAILABLE'],
  DF_ERR_STATE_UNAVAILABLE: [503, 'UNAVAILABLE'],
  DF_ERR_PEER_UNAVAILABLE: [503, 'UNAVAILABLE'],
  DF_ERR_PEER_BUSY: [503, 'UNAVAILABLE'],
  DF_ERR_STORAGE: [500, 'UNKNOWN'],
  DF_ERR_CLOSED: [503, 'UNAVAILABLE'],
  DF_ERR_ABORTED: [503, 'UNAVAILABLE']
}

/** Codes for answers that came from (or could not come from) the origin: Dragonfly's `backend` error type. */
const BACKEND = new Set(['DF_ERR_UNAUTHORIZED', 'DF_ERR_DENIED', 'DF_ERR_BLOB_UNKNOWN', 'DF_ERR_MANIFEST_UNKNOWN', 'DF_ERR_TOO_MANY_REQUESTS', 'DF_ERR_ORIGIN_STATUS', 'DF_ERR_ORIGIN_UNAVAILABLE', 'DF_ERR_ORIGIN_PROTOCOL'])

/**
 * `X-Dragonfly-Error-Type` as Dragonfly's proxy sets it: `backend` when the
 * origin said no (or could not be reached), `proxy` when this peer refused the
 * request, `dfdaemon` when this peer failed.
 */
export function errorTypeOf (err: unknown, status: number): 'backend' | 'proxy' | 'dfdaemon' {
  if (err instanceof DamselflyError && BACKEND.has(err.code)) return 'backend'
  return status < 500 ? 'proxy' : 'dfdaemon'
}

export interface OciErrorBody {
  errors: Array<{ code: string, message: string, detail?: unknown }>
}

export function ociError (code: string, message: string, detail?: unknown): OciErrorBody {
  return { errors: [{ code, message, ...(detail === undefined ? {} : { detail }) }] }
}

/**
 * Answers `err` as OCI error JSON, with the headers the status needs
 * (`WWW-Authenticate` on 401, `Content-Range` on 416, `Retry-After` on 429).
 * Returns the status sent, for the caller's log.
 */
export function sendError (reply: FastifyReply, err: unknown, isHead: boolean): number {
  let status = 500
  let body: OciErrorBody | string = ociError('UNKNOWN', 'internal error')
  if (err instanceof OriginStatusError) {
    status = err.status
    body = isOciErrorJson(err.body) ? (err.body as string) : ociError('UNKNOWN', err.message)
  } else if (err instanceof DamselflyError) {
    const mapped = STATUS[err.code]
    if (mapped !== undefined) {
      status = mapped[0]
      body = ociError(mapped[1], err.message, err.detail)
    }
    if (err instanceof UnauthorizedError && err.challenge !== undefined) reply.header('www-authenticate', err.challenge)
    if (err instanceof RangeNotSatisfiableError) reply.header('content-range', `bytes */${err.size}`)
    if (err instanceof TooManyRequestsError && err.retryAfter !== undefined) reply.header('retry-after', err.retryAfter)
    if (err.code === 'DF_ERR_QUEUE_FULL') reply.header('retry-after', '1')
  } else if (isHttpClientError(err)) {
    status = err.statusCode
    body = ociError(status === 404 ? 'NAME_UNKNOWN' : 'UNSUPPORTED', err.message)
  }
  reply.code(status).header('content-type', 'application/json; charset=utf-8')
  reply.header('x-dragonfly-error-type', errorTypeOf(err, status))
  if (isHead) {
    reply.header('content-length', Buffer.byteLength(typeof body === 'string' ? body : JSON.stringify(body)))
    void reply.send()
  } else {
    void reply.send(typeof body === 'string' ? body : JSON.stringify(body))
  }
  return status
}

function isOciErrorJson (body: string | undefined): boolean {
  if (body === undefined) return false
  try {
    const parsed = JSON.parse(body) as { errors?: unknown }
    return Array.isArray(parsed.errors)
  } catch {
    return false
  }
}

function isHttpClientError (err: unknown): err is { statusCode: number, message: string } {
  const e = err as { statusCode?: unknown } | null
  return typeof e?.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500
}

/** Every DF_ERR code the mirror knows how to answer; a test checks it against docs/errors.md. */
export const MAPPED_CODES = Object.keys(STATUS)
