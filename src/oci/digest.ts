import { createHash } from 'node:crypto'
import { InvalidDigestError } from '../errors.ts'

/** Digest algorithms we can verify a whole blob against, with their hex length. */
const ALGORITHMS = { sha256: 64, sha512: 128 } as const
export type DigestAlgorithm = keyof typeof ALGORITHMS

export interface Digest {
  /** `sha256:<hex>` exactly as the OCI spec writes it. */
  readonly value: string
  readonly algorithm: DigestAlgorithm
  readonly hex: string
}

/**
 * Parses and validates an OCI digest. Only lowercase hex of the right length
 * is accepted: the hex becomes a path under the data dir, so anything looser
 * would be a traversal waiting to happen.
 */
export function parseDigest (value: string): Digest {
  const colon = value.indexOf(':')
  if (colon <= 0) throw new InvalidDigestError(value)
  const algorithm = value.slice(0, colon)
  const hex = value.slice(colon + 1)
  if (!Object.hasOwn(ALGORITHMS, algorithm)) throw new InvalidDigestError(value, `unsupported algorithm ${JSON.stringify(algorithm.slice(0, 32))}`)
  const length = ALGORITHMS[algorithm as DigestAlgorithm]
  if (hex.length !== length || !/^[0-9a-f]+$/.test(hex)) throw new InvalidDigestError(value, `expected ${length} lowercase hex characters`)
  return { value, algorithm: algorithm as DigestAlgorithm, hex }
}

export function isDigest (value: string): boolean {
  try {
    parseDigest(value)
    return true
  } catch {
    return false
  }
}

/** Piece digests are always SHA-256 (OpenSSL, hardware accelerated), whatever the blob's algorithm. */
export function sha256Hex (data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex')
}
