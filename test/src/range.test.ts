import assert from 'node:assert/strict'
import { test } from 'node:test'
import { InvalidRangeError, RangeNotSatisfiableError } from '../../src/errors.ts'
import { formatContentRange, parseRange, parseRangeSpec } from '../../src/oci/range.ts'

test('no Range header means the whole blob', () => {
  assert.equal(parseRange(undefined, 100), undefined)
})

test('bounded, open and suffix ranges resolve against the size', () => {
  assert.deepEqual(parseRange('bytes=0-0', 100), { start: 0, end: 0 })
  assert.deepEqual(parseRange('bytes=10-19', 100), { start: 10, end: 19 })
  // An end past the last byte is clamped (RFC 9110 §14.1.2).
  assert.deepEqual(parseRange('bytes=90-1000', 100), { start: 90, end: 99 })
  assert.deepEqual(parseRange('bytes=42-', 100), { start: 42, end: 99 })
  assert.deepEqual(parseRange('bytes=-10', 100), { start: 90, end: 99 })
  // A suffix longer than the blob is the whole blob.
  assert.deepEqual(parseRange('bytes=-1000', 100), { start: 0, end: 99 })
  assert.deepEqual(parseRange(' Bytes = 5-6 ', 100), { start: 5, end: 6 })
})

test('ranges starting past the end are 416 with the size attached', () => {
  for (const header of ['bytes=100-', 'bytes=100-200', 'bytes=-0', 'bytes=5000-5001']) {
    assert.throws(() => parseRange(header, 100), (err: unknown) => err instanceof RangeNotSatisfiableError && err.size === 100, header)
  }
  assert.throws(() => parseRange('bytes=0-0', 0), RangeNotSatisfiableError)
  assert.throws(() => parseRange('bytes=-5', 0), RangeNotSatisfiableError)
})

test('several ranges are refused rather than answered with the whole blob', () => {
  assert.deepEqual(parseRangeSpec('bytes=0-1,5-6'), { kind: 'multiple' })
  assert.throws(() => parseRange('bytes=0-1,5-6', 100), RangeNotSatisfiableError)
})

test('malformed headers are 400s', () => {
  const bad = ['items=0-1', 'bytes=', 'bytes=a-b', 'bytes=5-1', 'bytes=--1', 'bytes=1', 'bytes=0-1,', 'bytes=-', 'bytes=0x10-20',
    `bytes=${'9'.repeat(30)}-`, `bytes=0-${'1'.repeat(300)}`, 'bytes=1.5-2']
  for (const header of bad) assert.throws(() => parseRange(header, 100), InvalidRangeError, header)
})

test('Content-Range is written as HTTP wants it', () => {
  assert.equal(formatContentRange({ start: 0, end: 9 }, 100), 'bytes 0-9/100')
})
