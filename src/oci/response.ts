import type { Readable } from 'node:stream'
import { OriginProtocolError } from '../errors.ts'

/** Manifests above this are refused (the distribution registry's own limit is 4 MiB). */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024
/** Error bodies are read this far, for the message, and no further. */
export const MAX_ERROR_BODY_BYTES = 64 * 1024

export type ResponseHeaders = Record<string, string | string[] | undefined>

/** The first value of a response header (names lowercase). */
export function header (response: { headers: ResponseHeaders }, name: string): string | undefined {
  const value = response.headers[name]
  return Array.isArray(value) ? value[0] : value
}

/**
 * A registry answer read whole into memory, never past `max` bytes: a longer
 * body is destroyed and refused, or with `truncate` (an error body read for
 * its message) cut short.
 */
export async function readBounded (body: Readable, max: number, options: { truncate?: boolean } = {}): Promise<Buffer> {
  const chunks: Buffer[] = []
  let total = 0
  for await (const chunk of body) {
    const b = chunk as Buffer
    total += b.length
    if (total > max) {
      body.destroy()
      if (options.truncate !== true) throw new OriginProtocolError(`response larger than ${max} bytes`)
      break
    }
    chunks.push(b)
  }
  return Buffer.concat(chunks)
}
