import { InvalidRangeError, RangeNotSatisfiableError } from '../errors.ts'

/** An inclusive byte range, as HTTP writes it: `bytes=start-end`. */
export interface ByteRange {
  readonly start: number
  readonly end: number
}

/** Longest Range header we look at; a real single range is well under this. */
const MAX_RANGE_HEADER = 200

/**
 * Parses a single-range `Range` header against a blob of `size` bytes
 * (RFC 9110 §14.1.2). Returns `undefined` when there is no header.
 *
 * - `bytes=S-E` → [S, min(E, size-1)]; `bytes=S-` → [S, size-1];
 *   `bytes=-N` → the last N bytes (all of them if N ≥ size).
 * - Malformed syntax → `InvalidRangeError` (400).
 * - Syntactically fine but unsatisfiable (S ≥ size, a zero suffix, an empty
 *   blob), or several ranges → `RangeNotSatisfiableError` (416). Serving a
 *   whole blob instead of a multi-range answer could be gigabytes nobody asked for.
 */
export function parseRange (header: string | undefined, size: number): ByteRange | undefined {
  const spec = parseRangeSpec(header)
  if (spec === undefined) return undefined
  return resolveRange(spec, size, header as string)
}

/** A parsed but unresolved range: needs the blob size to become a ByteRange. */
export type RangeSpec =
  | { readonly kind: 'bounded', readonly start: number, readonly end: number }
  | { readonly kind: 'open', readonly start: number }
  | { readonly kind: 'suffix', readonly length: number }
  | { readonly kind: 'multiple' }

/** Syntax only; use when the blob size is not known yet (it is fetched lazily). */
export function parseRangeSpec (header: string | undefined): RangeSpec | undefined {
  if (header === undefined) return undefined
  if (header.length > MAX_RANGE_HEADER) throw new InvalidRangeError(header, 'too long')
  const m = /^\s*bytes\s*=\s*(.*)$/i.exec(header)
  if (m === null) throw new InvalidRangeError(header, 'only the bytes unit is supported')
  const set = (m[1] as string).split(',').map(s => s.trim())
  if (set.some(s => s === '')) throw new InvalidRangeError(header, 'empty range in the set')
  for (const s of set) {
    if (!/^(\d+-\d*|-\d+)$/.test(s)) throw new InvalidRangeError(header, `malformed range ${JSON.stringify(s)}`)
  }
  if (set.length > 1) return { kind: 'multiple' }
  const only = set[0] as string
  const dash = only.indexOf('-')
  const first = only.slice(0, dash)
  const last = only.slice(dash + 1)
  if (first === '') return { kind: 'suffix', length: toSafeInt(last, header) }
  const start = toSafeInt(first, header)
  if (last === '') return { kind: 'open', start }
  const end = toSafeInt(last, header)
  if (end < start) throw new InvalidRangeError(header, 'last byte before first byte')
  return { kind: 'bounded', start, end }
}

export function resolveRange (spec: RangeSpec, size: number, header: string): ByteRange {
  switch (spec.kind) {
    case 'multiple':
      throw new RangeNotSatisfiableError(header, size, 'multiple ranges are not supported')
    case 'suffix':
      if (spec.length === 0 || size === 0) throw new RangeNotSatisfiableError(header, size, 'empty suffix')
      return { start: Math.max(0, size - spec.length), end: size - 1 }
    case 'open':
      if (spec.start >= size) throw new RangeNotSatisfiableError(header, size)
      return { start: spec.start, end: size - 1 }
    case 'bounded':
      if (spec.start >= size) throw new RangeNotSatisfiableError(header, size)
      return { start: spec.start, end: Math.min(spec.end, size - 1) }
  }
}

export function formatContentRange (range: ByteRange, size: number): string {
  return `bytes ${range.start}-${range.end}/${size}`
}

function toSafeInt (digits: string, header: string): number {
  const n = Number(digits)
  if (!Number.isSafeInteger(n)) throw new InvalidRangeError(header, 'offset too large')
  return n
}
