import assert from 'node:assert/strict'
import { test } from 'node:test'
import { MAX_PIECE_SIZE, MIB, MIN_PIECE_SIZE, PieceSet, TARGET_MAX_PIECES, choosePieceSize, pieceBounds, pieceCount, piecesCovering } from '../../src/pieces.ts'

test('piece size is 1 MiB until a blob would need more than the target piece count', () => {
  assert.equal(choosePieceSize(0), MIN_PIECE_SIZE)
  assert.equal(choosePieceSize(1), MIN_PIECE_SIZE)
  assert.equal(choosePieceSize(TARGET_MAX_PIECES * MIB), MIN_PIECE_SIZE)
  assert.equal(choosePieceSize(TARGET_MAX_PIECES * MIB + 1), 2 * MIB)
  // 10 GiB needs 2.5 MiB pieces to stay under the target count; sizes are powers of two.
  assert.equal(choosePieceSize(10 * 1024 * MIB), 4 * MIB)
  // Never above the cap, however large the blob.
  assert.equal(choosePieceSize(Number.MAX_SAFE_INTEGER), MAX_PIECE_SIZE)
})

test('pieces tile the blob exactly; the last one is short', () => {
  const size = 5 * MIB + 123
  const ps = choosePieceSize(size)
  const n = pieceCount(size, ps)
  assert.equal(n, 6)
  let covered = 0
  for (let i = 0; i < n; i++) {
    const { offset, length } = pieceBounds(i, size, ps)
    assert.equal(offset, covered)
    covered += length
  }
  assert.equal(covered, size)
  assert.deepEqual(pieceBounds(5, size, ps), { offset: 5 * MIB, length: 123 })
  assert.equal(pieceCount(0, ps), 0)
})

test('a range maps to the pieces that cover it, including unaligned ends', () => {
  assert.deepEqual(piecesCovering(0, 0, MIB), { first: 0, last: 0 })
  assert.deepEqual(piecesCovering(MIB - 1, MIB, MIB), { first: 0, last: 1 })
  assert.deepEqual(piecesCovering(MIB + 7, 2 * MIB + 8, MIB), { first: 1, last: 2 })
  assert.deepEqual(piecesCovering(3 * MIB, 4 * MIB - 1, MIB), { first: 3, last: 3 })
})

test('PieceSet counts, serialises and ignores out-of-range indices', () => {
  const set = new PieceSet(11)
  assert.equal(set.add(0), true)
  assert.equal(set.add(0), false)
  assert.equal(set.add(10), true)
  assert.equal(set.add(11), false)
  assert.equal(set.add(-1), false)
  assert.equal(set.size, 2)
  assert.deepEqual([...set], [0, 10])
  const copy = PieceSet.fromBase64(11, set.toBase64())
  assert.deepEqual([...copy], [0, 10])
  assert.equal(copy.delete(10), true)
  assert.equal(copy.size, 1)
  // Stray bits past the count (a foreign encoder) are dropped.
  const noisy = new PieceSet(3, Uint8Array.of(0xff))
  assert.equal(noisy.size, 3)
  assert.equal(noisy.complete, true)
  assert.equal(new PieceSet(0).complete, true)
})
