import assert from 'node:assert/strict'
import { test } from 'node:test'
import { Network } from '../../bench/sim/network.ts'

/**
 * One sender (10 bytes/ms up) to a slow receiver (2 down) and a fast one (10
 * down). Even shares give each transfer half the uplink, capped by its
 * receiver: 2 and 5, and 3 of the uplink idle. Max-min fairness gives the
 * fast receiver what the slow one cannot take: 8.
 */
function twoTransfers (maxMin: boolean): { network: Network, done: Array<[number, number]> } {
  const up = Float64Array.from([10, 0, 0])
  const down = Float64Array.from([0, 2, 10])
  const network = new Network(3, up, down, maxMin)
  const done: Array<[number, number]> = []
  network.start(0, 1, 100, () => { done.push([1, network.now]) })
  network.start(0, 2, 80, () => { done.push([2, network.now]) })
  return { network, done }
}

function runAll (network: Network): void {
  for (let t = network.nextAt(); t !== Infinity; t = network.nextAt()) {
    network.now = t
    network.finishNext()
  }
}

test('even shares leave what a slow receiver cannot take unused; max-min fairness hands it to the others', () => {
  const even = twoTransfers(false)
  runAll(even.network)
  // 80 bytes at 5/ms; then the slow one alone: 100 − 16·2 = 68 bytes at 2/ms.
  assert.deepEqual(even.done, [[2, 16], [1, 50]])

  const fair = twoTransfers(true)
  runAll(fair.network)
  // 80 bytes at 8/ms; the slow one is at 2/ms throughout: 50 ms.
  assert.deepEqual(fair.done, [[2, 10], [1, 50]])
  assert.equal(fair.network.sent[0], 180)
})

test('max-min rates follow transfers starting and being cut', () => {
  const up = Float64Array.from([10, 10, 0])
  const down = Float64Array.from([0, 0, 10])
  const network = new Network(3, up, down, true)
  const a = network.start(0, 2, 100, () => {})
  network.nextAt()
  assert.equal(network.rateOf(a), 10)
  network.now = 5
  const b = network.start(1, 2, 100, () => {})
  network.nextAt()
  assert.equal(network.rateOf(a), 5)
  assert.equal(network.rateOf(b), 5)
  network.now = 7
  assert.equal(network.cancel(b), 10)
  network.nextAt()
  assert.equal(network.rateOf(a), 10)
  // 50 bytes by 5 ms, 10 more by 7, the remaining 40 at 10/ms.
  assert.equal(network.nextAt(), 11)
})
