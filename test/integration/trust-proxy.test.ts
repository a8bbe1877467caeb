// Attack: the peer's forward proxy (CONNECT, absolute-form requests) and its
// registry header used as an SSRF relay into the node's network, when the
// mirror listens off loopback. Contract: /work/notes/trust-contract.md,
// "Forward proxy / SSRF".
import assert from 'node:assert/strict'
import http from 'node:http'
import type { Socket } from 'node:net'
import { after, before, describe, test } from 'node:test'
import { connectThrough, errorCode, send, type Seen } from '../helpers/attacker.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { freePort } from '../helpers/ports.ts'
import { startThrottleProxy, type ThrottleProxy } from '../helpers/throttle.ts'

const DIGEST = `sha256:${'5'.repeat(64)}`

/** A service on the node's own network that only the node should reach. */
interface Internal {
  name: string
  port: number
  authority: string
  connections: () => number
  requests: () => number
  close: () => Promise<void>
}

async function startInternal (name: string): Promise<Internal> {
  let connections = 0
  let requests = 0
  const sockets = new Set<Socket>()
  const body = `internal service ${name}: not for outsiders\n`
  // Answers anything with 200 and a body, HEAD included, like an admin endpoint would.
  const server = http.createServer((req, res) => {
    requests++
    req.resume()
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) })
    res.end(req.method === 'HEAD' ? undefined : body)
  })
  server.on('connection', (socket: Socket) => {
    connections++
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
  server.on('clientError', (_err, socket) => { socket.destroy() })
  await new Promise<void>((resolve) => server.listen({ host: '127.0.0.1', port: 0 }, resolve))
  const address = server.address()
  if (address === null || typeof address !== 'object') throw new Error('no address')
  return {
    name,
    port: address.port,
    authority: `127.0.0.1:${address.port}`,
    connections: () => connections,
    requests: () => requests,
    async close () {
      for (const s of sockets) s.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

function show (seen: Seen): string {
  return `status ${seen.status}${errorCode(seen.body) === undefined ? '' : ` ${errorCode(seen.body) as string}`}, ${seen.body.length} bytes${seen.body.includes('internal service') ? ' (the internal service\'s answer)' : ''}`
}

describe('forward proxy and registry header as an SSRF relay', () => {
  let a: Internal
  let b: Internal
  let closed: number
  let scheduler: TestScheduler
  /** In front of the scheduler's HTTP API, counting connections to it. */
  let schedulerApi: ThrottleProxy
  let open: TestPeer
  let listA: TestPeer
  let bare: TestPeer
  let loopback: TestPeer
  const peers: TestPeer[] = []

  before(async () => {
    a = await startInternal('A')
    b = await startInternal('B')
    closed = await freePort()
    scheduler = await startScheduler()
    schedulerApi = await startThrottleProxy({ targetPort: Number(new URL(scheduler.httpUrl).port) })
    // No registry is needed: nothing here may reach one.
    const registry = `http://127.0.0.1:${closed}`
    const offLoopback = ['--host', '0.0.0.0']
    const started = await Promise.allSettled([
      startPeer({ registry, scheduler: scheduler.address, name: 'open', args: offLoopback }),
      startPeer({ registry, scheduler: scheduler.address, name: 'allow-A', args: [...offLoopback, '--proxy-allowed-hosts', a.authority] }),
      startPeer({ registry, scheduler: scheduler.address, name: 'allow-bare-host', args: [...offLoopback, '--proxy-allowed-hosts', '127.0.0.1'] }),
      startPeer({ registry, scheduler: scheduler.address, name: 'loopback' })
    ])
    for (const s of started) if (s.status === 'fulfilled') peers.push(s.value)
    const failed = started.find(s => s.status === 'rejected')
    if (failed !== undefined) throw failed.reason
    ;[open, listA, bare, loopback] = peers as [TestPeer, TestPeer, TestPeer, TestPeer]
  })

  after(async () => {
    await Promise.allSettled(peers.map(async p => { await p.close() }))
    await schedulerApi?.close()
    await scheduler?.close()
    await b?.close()
    await a?.close()
  })

  const probe = 'GET /probe HTTP/1.1\r\nHost: internal\r\nConnection: close\r\n\r\n'

  test('mirror off loopback, no allow-list: CONNECT and forwarded requests are 403 and reach nothing', async (t) => {
    const before = { a: a.connections(), aRequests: a.requests(), api: schedulerApi.connections() }
    const toOpen = await connectThrough(open, a.authority, probe)
    const toClosed = await connectThrough(open, `127.0.0.1:${closed}`)
    const get = await send({ port: open.port, path: `http://${a.authority}/admin`, headers: { host: a.authority } })
    const preheat = await send({
      port: open.port,
      method: 'POST',
      path: `http://${schedulerApi.host}/api/v1/preheat`,
      headers: { host: schedulerApi.host, 'content-type': 'application/json' },
      body: JSON.stringify({ image: `127.0.0.1:${closed}/team/app:v1` })
    })
    const reached = { a: a.connections() - before.a, api: schedulerApi.connections() - before.api }
    t.diagnostic(`CONNECT open port: status ${toOpen.status}${toOpen.tunnelled?.includes('internal service') === true ? ' (tunnel carried the internal answer)' : ''}; CONNECT closed port: status ${toClosed.status}`)
    t.diagnostic(`absolute-form GET of the internal service: ${show(get)}`)
    t.diagnostic(`absolute-form POST /api/v1/preheat to the scheduler: ${show(preheat)} ${preheat.body.subarray(0, 120).toString()}`)
    t.diagnostic(`internal service: ${reached.a} connections, ${a.requests() - before.aRequests} requests; scheduler API connections: ${reached.api}`)
    assert.equal(reached.a, 0, `the internal service was reached (${reached.a} connections)`)
    assert.equal(reached.api, 0, `the scheduler's API was reached through the proxy (${reached.api} connections, preheat ${show(preheat)})`)
    assert.equal(toOpen.status, toClosed.status, `open and closed ports answer alike (port scan): ${toOpen.status} vs ${toClosed.status}`)
    assert.equal(toOpen.status, 403, 'CONNECT to an open port')
    assert.equal(toClosed.status, 403, 'CONNECT to a closed port')
    assert.equal(get.status, 403, `absolute-form GET: ${show(get)}`)
    assert.equal(preheat.status, 403, `absolute-form POST: ${show(preheat)}`)
  })

  test('X-Dragonfly-Registry, ns= or an absolute-form blob read naming an internal service: 403 DENIED, the service sees nothing', async (t) => {
    const start = { connections: a.connections(), requests: a.requests() }
    const results: Array<[string, Seen]> = []
    for (const [label, path, headers] of [
      ['X-Dragonfly-Registry', `/v2/x/blobs/${DIGEST}`, { 'x-dragonfly-registry': `http://${a.authority}` }],
      ['X-Dragonfly-Registry, range', `/v2/x/blobs/${DIGEST}`, { 'x-dragonfly-registry': `http://${a.authority}`, range: 'bytes=0-99' }],
      ['ns=', `/v2/x/blobs/${DIGEST}?ns=${a.authority}`, {}],
      ['X-Dragonfly-Registry, manifest', '/v2/x/manifests/latest', { 'x-dragonfly-registry': `http://${a.authority}` }],
      // The forward proxy's blob path, which would go through the mirror with the host as its registry.
      ['absolute-form blob read', `http://${a.authority}/v2/x/blobs/${DIGEST}`, { host: a.authority }]
    ] as const) {
      const before = { connections: a.connections(), requests: a.requests() }
      const seen = await send({ port: open.port, path, headers: { ...headers } })
      results.push([label, seen])
      t.diagnostic(`${label}: ${show(seen)}; internal service saw ${a.connections() - before.connections} new connections, ${a.requests() - before.requests} requests`)
    }
    const reached = { connections: a.connections() - start.connections, requests: a.requests() - start.requests }
    assert.equal(reached.connections, 0, `the internal service was reached: ${reached.connections} connections, ${reached.requests} requests`)
    for (const [label, seen] of results) {
      assert.equal(seen.status, 403, `${label}: ${show(seen)}`)
      assert.equal(errorCode(seen.body), 'DENIED', label)
    }
  })

  test('--proxy-allowed-hosts 127.0.0.1:A admits A only, host and port', async (t) => {
    const before = { a: a.connections(), b: b.connections() }
    const connectA = await connectThrough(listA, a.authority, probe)
    const getA = await send({ port: listA.port, path: `http://${a.authority}/ok`, headers: { host: a.authority } })
    const connectB = await connectThrough(listA, b.authority, probe)
    const getB = await send({ port: listA.port, path: `http://${b.authority}/admin`, headers: { host: b.authority } })
    t.diagnostic(`A: CONNECT ${connectA.status}, GET ${show(getA)}; B: CONNECT ${connectB.status}${connectB.tunnelled?.includes('internal service') === true ? ' (tunnel carried B\'s answer)' : ''}, GET ${show(getB)}; connections A ${a.connections() - before.a}, B ${b.connections() - before.b}`)
    assert.equal(b.connections() - before.b, 0, 'B, not listed, was reached')
    assert.equal(connectB.status, 403, 'CONNECT to B')
    assert.equal(getB.status, 403, `GET of B: ${show(getB)}`)
    assert.equal(connectA.status, 200, 'CONNECT to the listed A')
    assert.match(connectA.tunnelled ?? '', /internal service A/, 'the tunnel to A works')
    assert.equal(getA.status, 200, `GET of the listed A: ${show(getA)}`)
    assert.match(getA.body.toString(), /internal service A/)
  })

  test('--proxy-allowed-hosts 127.0.0.1 (no port) means 127.0.0.1:443: admits neither A nor B', async (t) => {
    const before = { a: a.connections(), b: b.connections() }
    const seen: Array<[string, number, string]> = []
    for (const target of [a, b]) {
      const c = await connectThrough(bare, target.authority, probe)
      const g = await send({ port: bare.port, path: `http://${target.authority}/admin`, headers: { host: target.authority } })
      seen.push([`CONNECT ${target.name}`, c.status, c.tunnelled?.includes('internal service') === true ? 'tunnel carried the answer' : ''])
      seen.push([`GET ${target.name}`, g.status, show(g)])
    }
    const reached = { a: a.connections() - before.a, b: b.connections() - before.b }
    t.diagnostic(`${seen.map(([l, s, d]) => `${l}: ${s} ${d}`).join('; ')}; connections A ${reached.a}, B ${reached.b}`)
    assert.deepEqual(reached, { a: 0, b: 0 }, 'a bare host entry admitted other ports')
    for (const [label, status] of seen) assert.equal(status, 403, label)
  })

  test('mirror on loopback (the default): forwarding and tunnels work as before', async () => {
    const connectA = await connectThrough(loopback, a.authority, probe)
    assert.equal(connectA.status, 200)
    assert.match(connectA.tunnelled ?? '', /internal service A/)
    const getA = await send({ port: loopback.port, path: `http://${a.authority}/ok`, headers: { host: a.authority } })
    assert.equal(getA.status, 200, show(getA))
    assert.match(getA.body.toString(), /internal service A/)
  })
})
