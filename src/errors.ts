/**
 * Every error damselfly raises on purpose is a `DamselflyError` with a stable
 * `code`. Match on `code` (or `name`), never on `message`. Domain code never
 * chooses an HTTP status: the mirror maps codes to OCI error JSON in one place
 * (`peer/mirror/errors.ts`). The table of codes is in `docs/errors.md`, and a
 * test keeps the two in step.
 */
export class DamselflyError extends Error {
  readonly code: string
  /** Extra fields for logs and the OCI `detail` member. Never holds credentials. */
  readonly detail: Record<string, unknown> | undefined

  constructor (code: string, message: string, options: { cause?: unknown, detail?: Record<string, unknown> } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.name = new.target.name
    this.code = code
    this.detail = options.detail
  }
}

/* Bad input from a caller */

export class InvalidNameError extends DamselflyError {
  constructor (name: string) {
    super('DF_ERR_NAME_INVALID', `invalid repository name ${JSON.stringify(truncate(name))}`)
  }
}

export class InvalidDigestError extends DamselflyError {
  constructor (digest: string, why = 'not of the form <algorithm>:<hex>') {
    super('DF_ERR_DIGEST_INVALID', `invalid digest ${JSON.stringify(truncate(digest))}: ${why}`)
  }
}

/** A query parameter the registry API defines, with a value outside its form. */
export class InvalidQueryError extends DamselflyError {
  constructor (key: string, value: string, accepted: string) {
    super('DF_ERR_QUERY_INVALID', `query parameter ${key}=${JSON.stringify(truncate(value))}: expected ${accepted}`)
  }
}

export class InvalidReferenceError extends DamselflyError {
  constructor (reference: string) {
    super('DF_ERR_REFERENCE_INVALID', `invalid tag or digest ${JSON.stringify(truncate(reference))}`)
  }
}

export class InvalidRangeError extends DamselflyError {
  constructor (header: string, why: string) {
    super('DF_ERR_RANGE_INVALID', `invalid Range header ${JSON.stringify(truncate(header))}: ${why}`)
  }
}

export class RangeNotSatisfiableError extends DamselflyError {
  readonly size: number
  constructor (header: string, size: number, why = 'starts past the end of the blob') {
    super('DF_ERR_RANGE_NOT_SATISFIABLE', `range ${JSON.stringify(truncate(header))} not satisfiable for ${size} bytes: ${why}`)
    this.size = size
  }
}

export class InvalidRegistryError extends DamselflyError {
  constructor (registry: string, why: string) {
    super('DF_ERR_REGISTRY_INVALID', `invalid upstream registry ${JSON.stringify(truncate(registry))}: ${why}`)
  }
}

/**
 * A request named a registry the operator did not configure. Only configured
 * registries are trusted (their bytes feed the cache and the swarm, their yes
 * lets a caller read them); `allowUnlistedRegistries` opts into pass-through
 * service of the others.
 */
export class RegistryNotAllowedError extends DamselflyError {
  constructor (registry: string, configured: readonly string[] = []) {
    const list = configured.length === 0 ? '' : ` (configured: ${configured.slice(0, 8).join(', ')}${configured.length > 8 ? ', …' : ''})`
    super('DF_ERR_REGISTRY_NOT_ALLOWED', `upstream registry ${JSON.stringify(truncate(registry))} is not one this peer is configured for${list}; add it with --registries, or set allowUnlistedRegistries to pass it through uncached`)
  }
}

export class UnsupportedOperationError extends DamselflyError {
  constructor (what: string) {
    super('DF_ERR_UNSUPPORTED', `${what} is not supported: this mirror is read-only`)
  }
}

export class NotFoundError extends DamselflyError {
  constructor (what: string) {
    super('DF_ERR_NOT_FOUND', `${what} not found`)
  }
}

/* Answers from the origin registry */

export class BlobUnknownError extends DamselflyError {
  constructor (digest: string, detail?: Record<string, unknown>) {
    super('DF_ERR_BLOB_UNKNOWN', `blob ${digest} is unknown to the origin`, detail === undefined ? {} : { detail })
  }
}

export class ManifestUnknownError extends DamselflyError {
  constructor (reference: string) {
    super('DF_ERR_MANIFEST_UNKNOWN', `manifest ${reference} is unknown to the origin`)
  }
}

/**
 * The origin refused the caller. `challenge` is the origin's `WWW-Authenticate`
 * header, handed back to the client so it can fetch its own token.
 */
export class UnauthorizedError extends DamselflyError {
  readonly challenge: string | undefined
  constructor (message: string, challenge: string | undefined) {
    super('DF_ERR_UNAUTHORIZED', message)
    this.challenge = challenge
  }
}

export class DeniedError extends DamselflyError {
  constructor (message: string) {
    super('DF_ERR_DENIED', message)
  }
}

export class TooManyRequestsError extends DamselflyError {
  readonly retryAfter: string | undefined
  constructor (message: string, retryAfter?: string) {
    super('DF_ERR_TOO_MANY_REQUESTS', message)
    this.retryAfter = retryAfter
  }
}

/** Any other 4xx from the origin: passed through with its status and (bounded) body. */
export class OriginStatusError extends DamselflyError {
  readonly status: number
  readonly body: string | undefined
  constructor (status: number, url: string, body?: string) {
    super('DF_ERR_ORIGIN_STATUS', `origin answered ${status} for ${redactUrl(url)}`)
    this.status = status
    this.body = body
  }
}

/** The origin could not be reached, or kept failing (5xx) after retries. */
export class OriginUnavailableError extends DamselflyError {
  constructor (message: string, options: { cause?: unknown } = {}) {
    super('DF_ERR_ORIGIN_UNAVAILABLE', message, options)
  }
}

/** The origin sent something that contradicts what it said before (size, digest). */
export class OriginProtocolError extends DamselflyError {
  constructor (message: string) {
    super('DF_ERR_ORIGIN_PROTOCOL', message)
  }
}

/* Integrity */

export class PieceDigestMismatchError extends DamselflyError {
  constructor (digest: string, piece: number, source: string) {
    super('DF_ERR_PIECE_DIGEST_MISMATCH', `piece ${piece} of ${digest} from ${source} failed verification`, { detail: { digest, piece, source } })
  }
}

export class BlobDigestMismatchError extends DamselflyError {
  constructor (digest: string, actual: string) {
    super('DF_ERR_BLOB_DIGEST_MISMATCH', `blob ${digest} hashed to ${actual}`, { detail: { digest, actual } })
  }
}

/* Local resources */

export class StorageError extends DamselflyError {
  constructor (message: string, options: { cause?: unknown } = {}) {
    super('DF_ERR_STORAGE', message, options)
  }
}

export class QueueFullError extends DamselflyError {
  constructor (what: string) {
    super('DF_ERR_QUEUE_FULL', `${what} queue is full`)
  }
}

export class TimeoutError extends DamselflyError {
  constructor (what: string) {
    super('DF_ERR_TIMEOUT', `${what} timed out`)
  }
}

export class AbortError extends DamselflyError {
  constructor (what = 'operation') {
    super('DF_ERR_ABORTED', `${what} was aborted`)
  }
}

/**
 * Work for a blob was cut short because the swarm dropped its piece table (it
 * was reported wrong): an abort, but one that another attempt, under the new
 * table, will get past.
 */
export class TableDroppedError extends AbortError {
  constructor (digest: string) {
    super(`fetching ${digest} under a piece table the swarm dropped`)
  }
}

export class ClosedError extends DamselflyError {
  constructor (what: string) {
    super('DF_ERR_CLOSED', `${what} is closed`)
  }
}

/* Swarm */

export class SchedulerUnavailableError extends DamselflyError {
  constructor (message: string, options: { cause?: unknown } = {}) {
    super('DF_ERR_SCHEDULER_UNAVAILABLE', message, options)
  }
}

/** The store scheduler replicas share cannot be reached (or lost its data): the swarm's state cannot change. */
export class StateUnavailableError extends DamselflyError {
  constructor (message: string, options: { cause?: unknown } = {}) {
    super('DF_ERR_STATE_UNAVAILABLE', message, options)
  }
}

export class PeerUnavailableError extends DamselflyError {
  constructor (message: string, options: { cause?: unknown } = {}) {
    super('DF_ERR_PEER_UNAVAILABLE', message, options)
  }
}

/** A parent has no copy of a piece to give (yet): one it was fetching has not landed, or it no longer holds one. */
export class PieceNotHeldError extends PeerUnavailableError {}

/** A parent's upload slots, or its room for waiting requests, are all taken: ask another, or again shortly. */
export class PeerBusyError extends DamselflyError {
  /** Peers the busy parent recently sent the piece to (see `PieceHint`). */
  readonly hints: ReadonlyArray<{ peerId: string, upload: string[] }>
  constructor (message: string, hints: ReadonlyArray<{ peerId: string, upload: string[] }> = []) {
    super('DF_ERR_PEER_BUSY', message)
    this.hints = hints
  }
}

export class ProtocolError extends DamselflyError {
  constructor (message: string) {
    super('DF_ERR_PROTOCOL', message)
  }
}

export class NotAuthorizedPeerError extends DamselflyError {
  constructor (message: string) {
    super('DF_ERR_PEER_NOT_AUTHORIZED', message)
  }
}

/* Clients of the peer */

/** The peer answered `damselfly get` with a status it has no use for (a 5xx, an unexpected 4xx). */
export class MirrorStatusError extends DamselflyError {
  readonly status: number
  constructor (status: number, url: string, why: string | undefined) {
    super('DF_ERR_MIRROR_STATUS', `the peer answered ${status} for ${redactUrl(url)}${why === undefined || why === '' ? '' : `: ${truncate(why, 300)}`}`)
    this.status = status
  }
}

/* The scheduler's HTTP API */

/** A preheat endpoint was called without the API token (`api.token`), or with another one. */
export class ApiUnauthorizedError extends DamselflyError {
  constructor (message: string) {
    super('DF_ERR_API_UNAUTHORIZED', message)
  }
}

/** The scheduler's API refused a caller it cannot tell from a stranger (no API token configured, caller off loopback). */
export class ApiForbiddenError extends DamselflyError {
  constructor (message: string) {
    super('DF_ERR_API_FORBIDDEN', message)
  }
}

/** A preheat request the scheduler cannot turn into a job (a Harbor or Dragonfly body with no usable image URL). */
export class InvalidPreheatRequestError extends DamselflyError {
  constructor (message: string) {
    super('DF_ERR_PREHEAT_INVALID', message)
  }
}

/* Configuration */

export class ConfigError extends DamselflyError {
  readonly key: string
  constructor (key: string, message: string) {
    super('DF_ERR_CONFIG', `${key}: ${message}`)
    this.key = key
  }
}

export function isDamselflyError (err: unknown): err is DamselflyError {
  return err instanceof DamselflyError
}

/** True when `err` is (or wraps) an abort: ours, the DOM one, or undici's. */
export function isAbort (err: unknown): boolean {
  if (err == null || typeof err !== 'object') return false
  const e = err as { name?: unknown, code?: unknown }
  return e.name === 'AbortError' || e.code === 'DF_ERR_ABORTED' || e.code === 'ABORT_ERR' || e.code === 'UND_ERR_ABORTED'
}

function truncate (s: string, max = 128): string {
  return s.length > max ? `${s.slice(0, max)}…` : s
}

/** Drops query strings (pre-signed storage URLs carry credentials in them). */
export function redactUrl (url: string): string {
  const q = url.indexOf('?')
  return q === -1 ? url : `${url.slice(0, q)}?…`
}
