import { BlobUnknownError, DeniedError, ManifestUnknownError, TooManyRequestsError, UnauthorizedError, type DamselflyError } from '../errors.ts'
import { header, type ResponseHeaders } from './response.ts'

/** What a refusal names, and the words for who refused. */
export interface Refusal {
  /** The blob asked for: a 404 is `BlobUnknownError`. */
  digest?: string | undefined
  /** What a 404 of any other request names (`ManifestUnknownError`). Default 'manifest'. */
  manifest?: string | undefined
  unauthorized: string
  denied: string
  /** Without it a 429 is left to the caller, like any status this does not know. */
  rateLimited?: string | undefined
}

/**
 * The error a registry's refusal means: 401 `UnauthorizedError` carrying the
 * challenge (so the caller can answer it), 403 `DeniedError`, 404
 * `BlobUnknownError` or `ManifestUnknownError`, 429 `TooManyRequestsError`
 * carrying Retry-After. Undefined for any other status, whose meaning
 * depends on who answered (an origin's 5xx is retried, a peer's is reported).
 */
export function refusalError (status: number, response: { headers: ResponseHeaders }, refusal: Refusal): DamselflyError | undefined {
  switch (status) {
    case 401: return new UnauthorizedError(refusal.unauthorized, header(response, 'www-authenticate'))
    case 403: return new DeniedError(refusal.denied)
    case 404: return refusal.digest !== undefined ? new BlobUnknownError(refusal.digest) : new ManifestUnknownError(refusal.manifest ?? 'manifest')
    case 429: return refusal.rateLimited === undefined ? undefined : new TooManyRequestsError(refusal.rateLimited, header(response, 'retry-after'))
  }
  return undefined
}

/** The first message of an OCI error body (`{"errors":[{"message":…}]}`), else the body's text, short. */
export function ociErrorMessage (body: Buffer): string | undefined {
  try {
    const parsed = JSON.parse(body.toString('utf8')) as { errors?: Array<{ message?: unknown }> }
    const message = parsed.errors?.[0]?.message
    return typeof message === 'string' ? message : undefined
  } catch {
    const text = body.toString('utf8').trim()
    return text === '' ? undefined : text.slice(0, 200)
  }
}
