import { createHash } from 'node:crypto'
import { BlobDigestMismatchError } from '../../src/errors.ts'
import type { Digest } from '../../src/oci/digest.ts'

/**
 * Passes a whole blob's bytes through while hashing them, and holds the last
 * chunk back until every byte has been hashed. A stream that ends normally
 * has delivered exactly `size` bytes that hash to `digest`; any other end
 * throws before the final chunk leaves, so the response carrying it is cut
 * and the client sees a short body, never a complete 200 of wrong bytes.
 * At most one chunk is held. `onMatch` runs once the digest matched, before
 * the last chunk leaves.
 */
export async function * verifyWhole (source: AsyncIterable<Buffer>, digest: Digest, size: number, onMatch?: () => Promise<void>): AsyncGenerator<Buffer> {
  const hash = createHash(digest.algorithm)
  let held: Buffer | undefined
  let total = 0
  for await (const chunk of source) {
    if (chunk.length === 0) continue
    total += chunk.length
    if (total > size) throw new BlobDigestMismatchError(digest.value, `more than ${size} bytes`)
    hash.update(chunk)
    if (held !== undefined) yield held
    held = chunk
  }
  if (total !== size) throw new BlobDigestMismatchError(digest.value, `${total} of ${size} bytes`)
  const actual = `${digest.algorithm}:${hash.digest('hex')}`
  if (actual !== digest.value) throw new BlobDigestMismatchError(digest.value, actual)
  await onMatch?.()
  if (held !== undefined) yield held
}
