import assert from 'node:assert/strict'
import { test } from 'node:test'
import { UploadPace } from '../../peer/upload/pace.ts'

const MIB = 1024 * 1024
const CHUNK = 256 * 1024

/** `uploads` sends at once, together at `rate` bytes/s, for `ms` from `start`, in 256 KiB chunks; returns when they ended. */
function send (pace: UploadPace, rate: number, start: number, ms: number, uploads = 1): number {
  for (let k = 0; k < uploads; k++) pace.begin(start)
  const chunks = Math.floor(rate * ms / 1000 / CHUNK)
  for (let c = 1; c <= chunks; c++) pace.sent(CHUNK, start + c * CHUNK * 1000 / rate)
  const end = start + ms
  for (let k = 0; k < uploads; k++) pace.end()
  return end
}

test('before its uplink has shown a rate, a node sends two pieces at once, never more than its most', () => {
  assert.equal(new UploadPace({ max: 8 }).limit(MIB, 0), 2)
  assert.equal(new UploadPace({ max: 1 }).limit(MIB, 0), 1)
  assert.equal(new UploadPace({ max: 8, min: 4 }).limit(MIB, 0), 4)
  assert.equal(new UploadPace({ max: 8 }).rate(0), undefined)
})

test('behind a slow uplink pieces go out one or two at a time; at fleet speed every slot is used', () => {
  const slow = new UploadPace({ max: 8, min: 1 })
  send(slow, 2 * MIB, 0, 2_000, 2)
  const rate = slow.rate(2_000) as number
  assert.ok(rate > 1.8 * MIB && rate < 2.2 * MIB, `measured ${rate / MIB} MiB/s`)
  assert.equal(slow.limit(MIB, 2_000), 1, 'a second 1 MiB piece would delay the first past a quarter second')
  assert.equal(slow.limit(256 * 1024, 2_000), 2, 'smaller pieces fit more')

  const fast = new UploadPace({ max: 8 })
  send(fast, 100 * MIB, 0, 100, 2)
  assert.equal(fast.limit(MIB, 100), 8)
  const mid = new UploadPace({ max: 8 })
  send(mid, 16 * MIB, 0, 1_000, 3)
  assert.equal(mid.limit(MIB, 1_000), 4, '16 MiB/s sends four 1 MiB pieces in a quarter second')
})

test('at fleet speed a rate is known within tens of milliseconds of sending, not a whole sample time', () => {
  const pace = new UploadPace({ max: 8 })
  pace.begin(0)
  pace.sent(2 * MIB, 20)
  assert.equal(pace.limit(MIB, 20), 8)
  pace.end()
  // Sooner than a 25th of the sample time, even many bytes are no sample: they are the socket's buffer filling.
  const early = new UploadPace({ max: 8 })
  early.begin(0)
  early.sent(4 * MIB, 5)
  assert.equal(early.rate(5), undefined)
})

test('slow children lower no rate already seen; the rate seen is forgotten after the window', () => {
  const pace = new UploadPace({ max: 8, min: 1, windowMs: 30_000 })
  let at = send(pace, 64 * MIB, 0, 500, 4)
  at = send(pace, 0.5 * MIB, at + 1_000, 5_000, 1)
  assert.equal(pace.limit(MIB, at), 8, 'the uplink showed 64 MiB/s: one child reading slowly does not narrow it')
  at = send(pace, 0.5 * MIB, at + 30_000, 5_000, 1)
  assert.equal(pace.limit(MIB, at), 1, '30 s on, only the slow rate is left')
})

test('idle time between sends is not counted against the rate', () => {
  const pace = new UploadPace({ max: 8, min: 1 })
  pace.begin(0)
  pace.sent(CHUNK, 10)
  pace.end()
  // A minute idle, then 4 MiB/s for a second: the sample starts at the new send, not the old.
  send(pace, 4 * MIB, 60_000, 1_000, 1)
  const rate = pace.rate(61_000) as number
  assert.ok(rate > 3.5 * MIB, `measured ${rate / MIB} MiB/s`)
})

test('a configured upload limit is the rate, without measuring', () => {
  const pace = new UploadPace({ max: 8, min: 1, rate: 2 * MIB })
  assert.equal(pace.rate(0), 2 * MIB)
  assert.equal(pace.limit(MIB, 0), 1)
  send(pace, 400 * MIB, 0, 1_000, 8)
  assert.equal(pace.limit(MIB, 1_000), 1, 'a burst into socket buffers does not widen a configured limit')
  assert.equal(new UploadPace({ max: 8, rate: 0 }).rate(0), undefined, 'a limit of 0 is none')
  assert.throws(() => new UploadPace({ max: 0 }), /max must be at least 1/)
})
