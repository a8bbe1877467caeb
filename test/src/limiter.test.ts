import assert from 'node:assert/strict'
import { test } from 'node:test'
import { QueueFullError } from '../../src/errors.ts'
import { Limiter } from '../../src/limiter.ts'

test('limits concurrency and serves higher priority first', async () => {
  const limiter = new Limiter('test', 1, 10)
  const release = await limiter.acquire()
  const order: string[] = []
  const low = limiter.acquire({ priority: 3 }).then(r => { order.push('low'); r() })
  const high = limiter.acquire({ priority: 6 }).then(r => { order.push('high'); r() })
  const low2 = limiter.acquire({ priority: 3 }).then(r => { order.push('low2'); r() })
  assert.equal(limiter.queued, 3)
  release()
  await Promise.all([low, high, low2])
  assert.deepEqual(order, ['high', 'low', 'low2'])
  assert.equal(limiter.active, 0)
})

test('a full queue refuses at once instead of growing', async () => {
  const limiter = new Limiter('tiny', 1, 1)
  const release = await limiter.acquire()
  const waiting = limiter.acquire()
  await assert.rejects(limiter.acquire(), QueueFullError)
  release()
  ;(await waiting)()
})

test('an aborted waiter leaves the queue', async () => {
  const limiter = new Limiter('abort', 1, 5)
  const release = await limiter.acquire()
  const controller = new AbortController()
  const waiting = limiter.acquire({ signal: controller.signal })
  controller.abort(new Error('gone'))
  await assert.rejects(waiting, /gone/)
  assert.equal(limiter.queued, 0)
  release()
  assert.equal(limiter.active, 0)
})

test('a limit given as a function is asked again at each acquire and release: a queue waits for the limit as it is then', async () => {
  let max = 2
  const limiter = new Limiter('paced', () => max, 1)
  const first = await limiter.acquire()
  const second = await limiter.acquire()
  max = 1
  let third = false
  const waiting = limiter.acquire().then(r => { third = true; return r })
  await assert.rejects(limiter.acquire(), QueueFullError)
  first()
  await new Promise(resolve => setImmediate(resolve))
  assert.equal(third, false, 'one still running is the limit now')
  second()
  ;(await waiting)()
  assert.equal(third, true)
  assert.equal(limiter.max, 1)
  assert.equal(limiter.active, 0)
})
