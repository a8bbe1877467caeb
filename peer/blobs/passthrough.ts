import { createHash } from 'node:crypto'
import { Readable } from 'node:stream'
import type { AbortOptions } from '../../src/abort.ts'
import { BlobDigestMismatchError, OriginProtocolError } from '../../src/errors.ts'
import { parseDigest } from '../../src/oci/digest.ts'
import { DEFAULT_MANIFEST_ACCEPT } from '../../src/oci/media-types.ts'
import type { OriginClient } from '../origin/index.ts'
import type { OpenBlob, OpenBlobRequest } from './index.ts'
import { verifyWhole } from './verify.ts'

export interface PassthroughComponents {
  origin: OriginClient
}

export interface Passthrough {
  /**
   * Content of a registry nobody configured (`allowUnlistedRegistries`), read
   * from that registry alone with the caller's credentials: never from the
   * cache or the swarm, and never into them. A whole-blob read is verified
   * against its digest before its last bytes leave.
   */
  open: (request: OpenBlobRequest, options?: AbortOptions) => Promise<OpenBlob>
}

export function createPassthrough (components: PassthroughComponents): Passthrough {
  const { origin } = components
  return {
    async open (request, options = {}) {
      const { upstream, repo, digest, kind, credentials } = request
      const parsed = parseDigest(digest)
      if (kind === 'manifest') {
        const res = await origin.getManifest(upstream, repo, digest, DEFAULT_MANIFEST_ACCEPT, credentials, { signal: options.signal })
        const actual = `${parsed.algorithm}:${createHash(parsed.algorithm).update(res.body).digest('hex')}`
        if (actual !== digest) throw new BlobDigestMismatchError(digest, actual)
        const task = { upstream, repo, digest, kind, size: res.body.length, mediaType: res.mediaType, credentials }
        return { task, stale: false, read: async () => Readable.from([res.body]) }
      }
      const head = await origin.headBlob(upstream, repo, digest, credentials, { signal: options.signal })
      const task = { upstream, repo, digest, kind, size: head.size, mediaType: undefined, credentials }
      return {
        task,
        stale: false,
        async read (range, readOptions = {}) {
          const whole = range === undefined || (range.start === 0 && range.end === head.size - 1)
          const res = await origin.getBlob(upstream, repo, digest, whole ? undefined : range, credentials, { signal: readOptions.signal })
          if (whole && res.length !== head.size) {
            res.body.destroy()
            throw new OriginProtocolError(`origin sent ${res.length} bytes for ${digest}, having declared ${head.size}`)
          }
          if (!whole) return res.body
          const out = Readable.from(verifyWhole(res.body as AsyncIterable<Buffer>, parsed, head.size), { objectMode: false })
          out.once('close', () => { res.body.destroy() })
          return out
        }
      }
    }
  }
}
