import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { Agent, request } from 'undici'
import { buildImage, pushImage, readBlob, type BuiltImage } from '../helpers/image.ts'
import { freePorts } from '../helpers/ports.ts'
import { run } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'
import { CLI, ROOT, launch, nonLoopbackIPv4, probeConnect, type Launched } from '../helpers/trust.ts'

/*
 * Attack 2 (notes/trust-contract.md, "Secure defaults for the p2p and upload
 * ports"): an attacker on the node's network reaches the upload port and p2p
 * port of a peer run without a cluster secret and takes pieces (private ones
 * included) or joins the swarm; and calls the scheduler's preheat API from
 * another machine. Every node here runs with no cluster secret; the attacker
 * is a socket bound to the machine's non-loopback address.
 */

const MIB = 1024 * 1024
const EXT = nonLoopbackIPv4()
const SKIP = EXT === undefined ? 'this machine has no non-loopback IPv4 address (os.networkInterfaces()), so nothing can be reached from off loopback' : false

/** GET a piece from an upload port; the answer, or the connection error's code. */
async function askPiece (url: string, localAddress: string | undefined): Promise<{ status: number | string, bytes: number, body: Buffer }> {
  const agent = new Agent(localAddress === undefined ? {} : { localAddress })
  try {
    const res = await request(url, { dispatcher: agent, signal: AbortSignal.timeout(10_000) })
    const body = Buffer.from(await res.body.arrayBuffer())
    return { status: res.statusCode, bytes: body.length, body }
  } catch (err) {
    const e = err as { code?: string, cause?: { code?: string }, message: string }
    return { status: e.cause?.code ?? e.code ?? e.message, bytes: 0, body: Buffer.alloc(0) }
  } finally {
    await agent.close()
  }
}

function exitFigure (l: Launched): string {
  return l.outcome === 'healthy' ? 'started and answered /healthy' : `${l.outcome} with code ${String(l.code)}; stderr: ${l.stderr().trim().slice(-400)}`
}

describe('secure defaults for the p2p and upload ports (attack 2)', { skip: SKIP }, () => {
  const ext = EXT as string
  let registry: TestRegistry
  let work: TmpDir
  let image: BuiltImage
  let peer: Launched | undefined
  let peerPorts: { port: number, p2pPort: number, uploadPort: number }
  const extra: Launched[] = []

  before(async () => {
    work = await tmpDir('df-trust-ports-')
    registry = await startRegistry()
    image = await buildImage(path.join(work.path, 'image'), { layers: [2 * MIB + 77], seed: 'trust-ports', tag: 'v1' })
    await pushImage(image, `${registry.host}/trust/ports:v1`)
    const [port, p2pPort, uploadPort] = await freePorts(3) as [number, number, number]
    peerPorts = { port, p2pPort, uploadPort }
    // No --p2p-host, no cluster secret, the embedded scheduler: what an operator gets by default.
    peer = await launch([
      'peer', '--data-dir', path.join(work.path, 'peer'), '--host', '127.0.0.1', '--port', String(port),
      '--p2p-port', String(p2pPort), '--upload-port', String(uploadPort), '--registry', registry.url, '--log-level', 'debug'
    ], `http://127.0.0.1:${port}`)
    assert.equal(peer.outcome, 'healthy', `the default peer did not start: ${peer.output().slice(-3000)}`)
    // The peer holds the layer, so there is a piece to steal.
    const res = await request(`http://127.0.0.1:${port}/v2/trust/ports/blobs/${image.layers[0]?.digest as string}?ns=${encodeURIComponent(registry.host)}`)
    const body = Buffer.from(await res.body.arrayBuffer())
    assert.equal(res.statusCode, 200)
    assert.ok(body.equals(readBlob(image, image.layers[0]?.digest as string)))
  })

  after(async () => {
    await Promise.allSettled(extra.map(async (l) => { await l.stop() }))
    await peer?.stop()
    await registry?.close()
    await work?.cleanup()
  })

  test('without a cluster secret, the p2p and upload ports answer on loopback only', async () => {
    const seen = {
      p2pLoopback: await probeConnect('127.0.0.1', peerPorts.p2pPort),
      uploadLoopback: await probeConnect('127.0.0.1', peerPorts.uploadPort),
      p2pExternal: await probeConnect(ext, peerPorts.p2pPort),
      uploadExternal: await probeConnect(ext, peerPorts.uploadPort)
    }
    assert.equal(seen.p2pLoopback, 'open', 'the p2p port answers on 127.0.0.1')
    assert.equal(seen.uploadLoopback, 'open', 'the upload port answers on 127.0.0.1')
    assert.deepEqual({ p2pExternal: seen.p2pExternal, uploadExternal: seen.uploadExternal }, { p2pExternal: 'ECONNREFUSED', uploadExternal: 'ECONNREFUSED' },
      `on ${ext} (non-loopback) the p2p port was ${seen.p2pExternal} and the upload port ${seen.uploadExternal}`)
  })

  test('a piece request from a non-loopback source address gets no piece', async () => {
    const layer = image.layers[0]?.digest as string
    const piecePath = `/damselfly/v1/pieces/${layer}/0?wait=0`
    // Sanity: the piece is there to be had from loopback, so a refusal below is the guard working.
    const local = await askPiece(`http://127.0.0.1:${peerPorts.uploadPort}${piecePath}`, undefined)
    assert.equal(local.status, 200, 'loopback gets the piece')
    assert.ok(local.body.equals(readBlob(image, layer).subarray(0, MIB)), 'loopback gets the right piece')
    const viaExternal = await askPiece(`http://${ext}:${peerPorts.uploadPort}${piecePath}`, ext)
    const fromExternal = await askPiece(`http://127.0.0.1:${peerPorts.uploadPort}${piecePath}`, ext)
    const figures = `to ${ext}: ${viaExternal.status} (${viaExternal.bytes} bytes); to 127.0.0.1 from ${ext}: ${fromExternal.status} (${fromExternal.bytes} bytes)`
    for (const got of [viaExternal, fromExternal]) {
      assert.ok(got.status === 'ECONNREFUSED' || got.status === 403, `a non-loopback caller got a piece or no refusal: ${figures}`)
      assert.equal(got.bytes === MIB, false, `a non-loopback caller took a whole piece: ${figures}`)
    }
  })

  test('--p2p-host 0.0.0.0 (or the machine\'s address) without a cluster secret: the peer refuses to start, exit 2', async () => {
    const seen: Array<{ host: string, l: Launched }> = []
    for (const host of ['0.0.0.0', ext]) {
      const [port, p2pPort, uploadPort] = await freePorts(3) as [number, number, number]
      const l = await launch([
        'peer', '--data-dir', path.join(work.path, `open-peer-${host}`), '--host', '127.0.0.1', '--port', String(port),
        '--p2p-host', host, '--p2p-port', String(p2pPort), '--upload-port', String(uploadPort), '--registry', registry.url
      ], `http://127.0.0.1:${port}`, { timeoutMs: 20_000 })
      extra.push(l)
      await l.stop()
      seen.push({ host, l })
    }
    const figures = seen.map(({ host, l }) => `--p2p-host ${host}: ${exitFigure(l)}`).join('; ')
    for (const { l } of seen) {
      assert.equal(l.outcome, 'exited', figures)
      assert.equal(l.code, 2, figures)
      assert.match(l.stderr(), /swarm\.clusterSecret/, `stderr names swarm.clusterSecret: ${figures}`)
      assert.match(l.stderr(), /p2pHost/, `stderr names p2pHost: ${figures}`)
    }
  })

  test('the scheduler with --host 0.0.0.0 and no cluster secret refuses to start, exit 2', async () => {
    const [port, httpPort] = await freePorts(2) as [number, number]
    const l = await launch([
      'scheduler', '--data-dir', path.join(work.path, 'open-scheduler'), '--host', '0.0.0.0', '--port', String(port),
      '--http-host', '127.0.0.1', '--http-port', String(httpPort)
    ], `http://127.0.0.1:${httpPort}`, { timeoutMs: 20_000 })
    extra.push(l)
    await l.stop()
    assert.equal(l.outcome, 'exited', `scheduler --host 0.0.0.0 without a secret: ${exitFigure(l)}`)
    assert.equal(l.code, 2, `scheduler --host 0.0.0.0 without a secret: ${exitFigure(l)}`)
    assert.match(l.stderr(), /swarm\.clusterSecret/, 'stderr names swarm.clusterSecret')
    assert.match(l.stderr(), /\bhost\b/, 'stderr names host')
  })

  describe('a scheduler with its HTTP API on 0.0.0.0 and no API token', () => {
    let scheduler: Launched | undefined
    let ports: { port: number, httpPort: number }

    before(async () => {
      const [port, httpPort] = await freePorts(2) as [number, number]
      ports = { port, httpPort }
      // No --host: its p2p port takes the default, which without a secret is loopback.
      scheduler = await launch([
        'scheduler', '--data-dir', path.join(work.path, 'scheduler'), '--port', String(port),
        '--http-host', '0.0.0.0', '--http-port', String(httpPort), '--log-level', 'debug'
      ], `http://127.0.0.1:${httpPort}`)
      assert.equal(scheduler.outcome, 'healthy', `the scheduler did not start: ${scheduler.output().slice(-3000)}`)
    })

    after(async () => { await scheduler?.stop() })

    test('its p2p port answers on loopback only', async () => {
      assert.equal(await probeConnect('127.0.0.1', ports.port), 'open')
      const seen = await probeConnect(ext, ports.port)
      assert.equal(seen, 'ECONNREFUSED', `the scheduler's p2p port on ${ext}: ${seen}`)
    })

    test('POST /api/v1/preheat from a non-loopback address is refused with 403; from loopback it is accepted', async () => {
      const body = JSON.stringify({ image: `${registry.url}/trust/ports:v1` })
      const headers = { 'content-type': 'application/json' }
      const remote = new Agent({ localAddress: ext })
      try {
        const res = await request(`http://${ext}:${ports.httpPort}/api/v1/preheat`, { method: 'POST', headers, body, dispatcher: remote })
        const text = await res.body.text()
        assert.equal(res.statusCode, 403, `a caller on ${ext} got ${res.statusCode}: ${text.slice(0, 300)}`)
      } finally {
        await remote.close()
      }
      const res = await request(`http://127.0.0.1:${ports.httpPort}/api/v1/preheat`, { method: 'POST', headers, body })
      const text = await res.body.text()
      assert.equal(res.statusCode, 202, `loopback: ${text.slice(0, 300)}`)
    })
  })

  test('npm start\'s command line listens on loopback only, on every port', async () => {
    const start = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { scripts: { start: string } }).scripts.start
    const words = start.split(/\s+/)
    // `exec`: npm's shell hands the process over to node, so npm's SIGTERM reaches the peer (test/integration/npm-start.test.ts).
    if (words[0] === 'exec') words.shift()
    assert.equal(words[0], 'node', `npm start runs ${start}`)
    assert.equal(words[1], 'bin/damselfly.js', `npm start runs ${start}`)
    // The script's own ports (4000-4002) may be taken by another test run on this machine: the same
    // command with free ports appended (the last --port wins); which hosts it binds is what is tested.
    const [port, p2pPort, uploadPort] = await freePorts(3) as [number, number, number]
    const cwd = path.join(work.path, 'npm-start')
    await run('mkdir', ['-p', cwd])
    // The data dir defaults through the shell (DAMSELFLY_DATA_DIR, else .damselfly): here, .damselfly in cwd.
    const args = words.slice(2).map(w => w.startsWith('"${DAMSELFLY_DATA_DIR') ? '.damselfly' : w)
    const l = await launch([...args, '--port', String(port), '--p2p-port', String(p2pPort), '--upload-port', String(uploadPort)],
      `http://127.0.0.1:${port}`, { cwd, cli: CLI })
    extra.push(l)
    try {
      assert.equal(l.outcome, 'healthy', `npm start did not start: ${l.output().slice(-3000)}`)
      const pid = l.proc.child.pid as number
      const { stdout } = await run('ss', ['-ltnpH'])
      const listeners = stdout.split('\n').filter((line) => line.includes(`pid=${pid},`)).map((line) => line.trim().split(/\s+/)[3] as string)
      assert.ok(listeners.length >= 3, `npm start's process listens on ${listeners.join(' ')}`)
      const open = listeners.filter((a) => !/^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$/.test(a))
      const reachable: string[] = []
      for (const a of listeners) {
        const p = Number(a.slice(a.lastIndexOf(':') + 1))
        if (await probeConnect(ext, p) === 'open') reachable.push(`${ext}:${p}`)
      }
      assert.deepEqual({ open, reachable }, { open: [], reachable: [] },
        `npm start listens on ${listeners.join(' ')}; not loopback: ${open.join(' ')}; reachable from ${ext}: ${reachable.join(' ')} (mirror ${port}, p2p ${p2pPort}, upload ${uploadPort})`)
    } finally {
      await l.stop()
    }
  })
})
