import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { copyFile, readFile } from 'node:fs/promises'
import path from 'node:path'
import { after, before, describe, test } from 'node:test'
import { chromium, type Browser, type Page } from 'playwright-core'
import { request } from 'undici'
import { buildImage, pushImage, type BuiltImage } from '../helpers/image.ts'
import { startPeer, startScheduler, type TestPeer, type TestScheduler } from '../helpers/peer.ts'
import { waitFor } from '../helpers/process.ts'
import { startRegistry, type TestRegistry } from '../helpers/registry.ts'
import { tmpDir, type TmpDir } from '../helpers/tmp.ts'

const MIB = 1024 * 1024
/** Debian's chromium; playwright-core drives it and never downloads a browser of its own. */
const CHROMIUM = '/usr/bin/chromium'
const VIEWPORT = { width: 1200, height: 800 }

interface ApiBytes { served: { local: number, peer: number, origin: number }, fetched: { peer: number, origin: number }, uploaded: number }
interface ApiHost { peerId: string, hostname: string, seed: boolean, addrs: string[], bytes?: ApiBytes }
interface ApiTask { digest: string, pieceCount: number, completeHolders: string[], partialHolders: Array<{ peerId?: string, pieces: number }> }
interface ApiSwarm { hosts: number, reporting: number, bytes: ApiBytes }

/** What the page shows, read from its DOM. */
interface PageView {
  hosts: Array<{ peerId: string, hostname: string, address: string, role: string, bytes: Record<string, number> }>
  tasks: Array<{ digest: string, shares: Array<{ peerId: string, fraction: number, pct: string, drawn: number }> }>
  totals: Record<string, number>
}

const READ_PAGE = `(() => ({
  hosts: [...document.querySelectorAll('#hosts tbody tr[data-peer-id]')].map(tr => ({
    peerId: tr.dataset.peerId,
    hostname: tr.querySelector('[data-hostname]').textContent,
    address: tr.querySelector('[data-address]').textContent,
    role: tr.cells[2].textContent,
    bytes: Object.fromEntries([...tr.querySelectorAll('td[data-bytes]')].map(td => [td.dataset.source, Number(td.dataset.bytes)]))
  })),
  tasks: [...document.querySelectorAll('#tasks article[data-digest]')].map(a => ({
    digest: a.dataset.digest,
    shares: [...a.querySelectorAll('li[data-peer-id]')].map(li => ({
      peerId: li.dataset.peerId,
      fraction: Number(li.dataset.fraction),
      pct: li.querySelector('.pct').textContent,
      drawn: li.querySelector('.fill').getBoundingClientRect().width / li.querySelector('.bar').getBoundingClientRect().width
    }))
  })),
  totals: Object.fromEntries([...document.querySelectorAll('[data-total]')].map(c => [c.dataset.total, Number(c.dataset.bytes)]))
}))()`

async function api<T> (scheduler: TestScheduler, route: string): Promise<T> {
  const res = await request(`${scheduler.httpUrl}${route}`, { signal: AbortSignal.timeout(5_000) })
  assert.equal(res.statusCode, 200, route)
  return await res.body.json() as T
}

/** What containerd does through a mirror: the manifest, then every blob by digest, with ?ns=. */
async function pull (peer: TestPeer, registry: TestRegistry, repo: string, image: BuiltImage): Promise<void> {
  const ns = `ns=${encodeURIComponent(registry.host)}`
  const res = await request(`${peer.url}/v2/${repo}/manifests/${image.tag}?${ns}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })
  await res.body.dump()
  assert.equal(res.statusCode, 200, `manifest from ${peer.name}`)
  await Promise.all([image.config, ...image.layers].map(async b => {
    const r = await request(`${peer.url}/v2/${repo}/blobs/${b.digest}?${ns}`)
    const hash = createHash('sha256')
    for await (const chunk of r.body) hash.update(chunk as Buffer)
    assert.equal(r.statusCode, 200, `${b.digest} from ${peer.name}`)
    assert.equal(`sha256:${hash.digest('hex')}`, b.digest, `${b.digest} intact from ${peer.name}`)
  }))
}

/** The fraction of a blob's pieces each holder has, as the API tells it. */
function sharesOf (task: ApiTask): Map<string, number> {
  const shares = new Map<string, number>()
  for (const id of task.completeHolders) shares.set(id, 1)
  for (const p of task.partialHolders) if (p.peerId !== undefined) shares.set(p.peerId, p.pieces / task.pieceCount)
  return shares
}

/**
 * Waits until the page shows what the API says (the page polls, so it may be
 * a second behind), then returns both. On a timeout the last difference fails the test.
 */
async function pageMatchesApi (page: Page, scheduler: TestScheduler): Promise<{ view: PageView, hosts: ApiHost[], tasks: ApiTask[], swarm: ApiSwarm }> {
  let last: { view: PageView, hosts: ApiHost[], tasks: ApiTask[], swarm: ApiSwarm } | undefined
  const compare = (s: NonNullable<typeof last>): void => {
    const { view, hosts, tasks, swarm } = s
    assert.deepEqual(view.hosts.map(h => h.peerId).sort(), hosts.map(h => h.peerId).sort(), 'a row per peer')
    for (const h of hosts) {
      const row = view.hosts.find(r => r.peerId === h.peerId)
      assert.equal(row?.hostname, h.hostname)
      assert.ok(row !== undefined && row.address !== '' && h.addrs.some(a => a.includes(`/tcp/${row.address.split(':').pop() ?? ''}`)), `${h.peerId} is shown at one of its addresses (${row?.address ?? ''})`)
      assert.equal(row?.role, h.seed ? 'seed' : 'peer')
      const b = h.bytes
      assert.deepEqual(row?.bytes, b === undefined ? {} : { local: b.served.local, peer: b.served.peer, origin: b.served.origin, uploaded: b.uploaded }, `bytes of ${h.peerId}`)
    }
    assert.deepEqual(view.tasks.map(t => t.digest).sort(), tasks.map(t => t.digest).sort(), 'a block per blob')
    for (const t of tasks) {
      const shown = view.tasks.find(v => v.digest === t.digest)?.shares ?? []
      assert.deepEqual(new Map(shown.map(s => [s.peerId, s.fraction])), sharesOf(t), `shares of ${t.digest}`)
      for (const s of shown) {
        assert.ok(Math.abs(s.drawn - s.fraction) < 0.02, `${t.digest}: ${s.peerId}'s bar is drawn at ${s.drawn}, its share is ${s.fraction}`)
        if (s.fraction === 1) assert.equal(s.pct, '100%')
      }
    }
    const { served, fetched, uploaded } = swarm.bytes
    assert.deepEqual(view.totals, { registry: fetched.origin, peers: fetched.peer, served: served.local + served.peer + served.origin, uploaded }, 'totals')
  }
  try {
    await waitFor(async () => {
      const [hosts, tasks, swarm] = await Promise.all([api<ApiHost[]>(scheduler, '/api/v1/hosts'), api<ApiTask[]>(scheduler, '/api/v1/tasks'), api<ApiSwarm>(scheduler, '/api/v1/swarm')])
      last = { view: await page.evaluate<PageView>(READ_PAGE), hosts, tasks, swarm }
      compare(last)
      return true
    }, { timeoutMs: 15_000, intervalMs: 300, what: 'the page to show what the API says' })
  } catch (err) {
    if (last !== undefined) compare(last)
    throw err
  }
  return last as NonNullable<typeof last>
}

/** Distinct colours in a PNG, sampled after the browser decodes it (about:blank has no policy to forbid a data: image). */
async function colours (browser: Browser, png: Buffer): Promise<number> {
  const page = await browser.newPage()
  try {
    return await page.evaluate<number>(`(async () => {
      const img = new Image()
      img.src = 'data:image/png;base64,${png.toString('base64')}'
      await img.decode()
      const canvas = document.createElement('canvas')
      canvas.width = img.width
      canvas.height = img.height
      const ctx = canvas.getContext('2d')
      ctx.drawImage(img, 0, 0)
      const data = ctx.getImageData(0, 0, img.width, img.height).data
      const seen = new Set()
      for (let i = 0; i < data.length; i += 4 * 7) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2])
      return seen.size
    })()`)
  } finally {
    await page.close()
  }
}

function pngSize (png: Buffer): { width: number, height: number } {
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], 'PNG signature')
  assert.equal(png.toString('latin1', 12, 16), 'IHDR')
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) }
}

describe('the scheduler swarm page, in headless Chromium', () => {
  let work: TmpDir
  let registry: TestRegistry
  let scheduler: TestScheduler
  let browser: Browser
  let page: Page
  let img: BuiltImage
  const peers: TestPeer[] = []
  const repo = 'page/app'

  before(async () => {
    work = await tmpDir('df-page-it-')
    registry = await startRegistry()
    img = await buildImage(path.join(work.path, 'app'), { layers: [6 * MIB + 1234, 3 * MIB, 400 * 1024], seed: 'swarm-page', tag: 'v1' })
    await pushImage(img, `${registry.host}/${repo}:v1`)
    scheduler = await startScheduler()
    peers.push(...await Promise.all([
      startPeer({ registry: registry.url, scheduler: scheduler.address, seed: true, name: 'seed-0' }),
      startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'peer-1' })
    ]))
    // One pull fills the seed from the origin, the next comes from it.
    await pull(peers[0] as TestPeer, registry, repo, img)
    await pull(peers[1] as TestPeer, registry, repo, img)
    // Load reports go out every 2 s: wait for both peers' counts to cover their pulls.
    await waitFor(async () => {
      const hosts = await api<ApiHost[]>(scheduler, '/api/v1/hosts')
      return hosts.length === 2 && hosts.every(h => h.bytes !== undefined && h.bytes.served.peer + h.bytes.served.origin + h.bytes.served.local >= img.totalBytes - img.manifest.size)
    }, { timeoutMs: 20_000, intervalMs: 250, what: 'both peers to report their bytes' })
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync']
    })
    page = await browser.newPage({ viewport: VIEWPORT })
  })

  after(async () => {
    await browser?.close()
    await Promise.allSettled(peers.map(async p => { await p.close() }))
    await scheduler?.close()
    await registry?.close()
    await work?.cleanup()
  })

  test('is served with a content security policy and shows every peer, blob and share the API knows', async () => {
    const res = await page.goto(`${scheduler.httpUrl}/`)
    assert.equal(res?.status(), 200)
    const csp = res?.headers()['content-security-policy'] ?? ''
    assert.match(csp, /default-src 'none'/)
    assert.match(csp, /script-src 'self'/)
    assert.equal(res?.headers()['x-content-type-options'], 'nosniff')

    const { view, hosts } = await pageMatchesApi(page, scheduler)
    assert.equal(view.hosts.length, 2)
    const seedId = hosts.find(h => h.seed)?.peerId
    const peerId = hosts.find(h => !h.seed)?.peerId
    assert.ok(seedId !== undefined && peerId !== undefined)
    for (const blob of [img.config, ...img.layers]) {
      const shares = view.tasks.find(t => t.digest === blob.digest)?.shares
      assert.ok(shares !== undefined, `${blob.digest} has a block`)
      // Both pulled every blob whole.
      assert.deepEqual(shares.filter(s => s.fraction === 1).map(s => s.peerId).sort(), [seedId, peerId].sort(), `both hold all of ${blob.digest}`)
    }
  })

  test('bytes by source: the first pull came from the origin, the second from a peer; totals add up', async () => {
    const { view, hosts, swarm } = await pageMatchesApi(page, scheduler)
    const blobBytes = img.totalBytes - img.manifest.size
    const seed = hosts.find(h => h.seed)?.bytes
    const other = hosts.find(h => !h.seed)?.bytes
    assert.ok(seed !== undefined && other !== undefined)
    assert.ok(seed.served.origin >= blobBytes, `the seed served ${seed.served.origin} bytes from the origin`)
    assert.ok(other.served.peer >= img.layers.reduce((n, l) => n + l.size, 0), `the other peer served ${other.served.peer} bytes from peers`)
    assert.ok(seed.uploaded >= other.fetched.peer, `the seed uploaded ${seed.uploaded}, the other took ${other.fetched.peer} from peers`)
    for (const key of ['local', 'peer', 'origin'] as const) assert.equal(swarm.bytes.served[key], hosts.reduce((n, h) => n + (h.bytes?.served[key] ?? 0), 0))
    assert.equal(swarm.reporting, 2)
    // The headline says what the registry sent, not what was served from registry pieces.
    assert.equal(view.totals.registry, swarm.bytes.fetched.origin)
    assert.ok((view.totals.registry ?? 0) >= blobBytes, `the registry card shows ${view.totals.registry ?? 0}`)
    assert.ok((view.totals.peers ?? 0) > 0)
    // On one machine every host has the same name; the address tells them apart.
    assert.equal(new Set(view.hosts.map(h => h.address)).size, view.hosts.length, `addresses: ${view.hosts.map(h => h.address).join(' ')}`)
  })

  test('a peer that joins and pulls shows up without a reload, holding part of a blob', async () => {
    await page.evaluate('window.__sameDocument = true')
    const before = new Set((await api<ApiHost[]>(scheduler, '/api/v1/hosts')).map(h => h.peerId))
    const late = await startPeer({ registry: registry.url, scheduler: scheduler.address, name: 'peer-late' })
    peers.push(late)
    let lateId = ''
    await waitFor(async () => {
      lateId = (await api<ApiHost[]>(scheduler, '/api/v1/hosts')).find(h => !before.has(h.peerId))?.peerId ?? ''
      return lateId !== ''
    }, { timeoutMs: 10_000, what: 'the late peer to register' })
    await page.waitForSelector(`#hosts tr[data-peer-id="${lateId}"]`, { timeout: 10_000 })

    // The first piece of the largest layer only: a partial holder.
    const layer = img.layers[0] as BuiltImage['layers'][number]
    const r = await request(`${late.url}/v2/${repo}/blobs/${layer.digest}?ns=${encodeURIComponent(registry.host)}`, { headers: { range: 'bytes=0-1023' } })
    await r.body.dump()
    assert.equal(r.statusCode, 206)
    await page.waitForSelector(`#tasks article[data-digest="${layer.digest}"] li[data-peer-id="${lateId}"]`, { timeout: 15_000 })
    await waitFor(async () => ((await api<ApiHost[]>(scheduler, '/api/v1/hosts')).find(h => h.peerId === lateId)?.bytes?.served.peer ?? 0) > 0, { timeoutMs: 15_000, what: 'the late peer to report its bytes' })

    const { view } = await pageMatchesApi(page, scheduler)
    const share = view.tasks.find(t => t.digest === layer.digest)?.shares.find(s => s.peerId === lateId)
    assert.ok(share !== undefined && share.fraction > 0 && share.fraction < 1, `the late peer holds part of the layer: ${share?.fraction}`)
    assert.ok((view.hosts.find(h => h.peerId === lateId)?.bytes.peer ?? 0) >= 1024)
    assert.equal(await page.evaluate('window.__sameDocument'), true, 'the page was not reloaded')
  })

  test('peer-provided strings are text, never markup', async () => {
    const hostile = '<img src=x onerror="document.body.dataset.owned=1"><b>bold</b>'
    const other = await browser.newPage({ viewport: VIEWPORT })
    try {
      await other.route('**/api/v1/hosts', async route => {
        await route.fulfill({ json: [{ peerId: hostile, hostname: hostile, seed: false, addrs: [], location: '', idc: '', uploadCapacity: 4, activeUploads: 0, throughput: 0, barred: false, tasks: 0, connectedAt: new Date().toISOString() }] })
      })
      await other.goto(`${scheduler.httpUrl}/`)
      await other.waitForSelector('#hosts tbody tr[data-peer-id]')
      assert.equal(await other.locator('#hosts tbody tr[data-peer-id] [data-hostname]').textContent(), hostile)
      assert.equal(await other.locator('#hosts img, #hosts b').count(), 0)
      assert.equal(await other.evaluate('document.body.dataset.owned ?? null'), null)
    } finally {
      await other.close()
    }
  })

  test('a screenshot of it is a 1200×800 PNG with something on it', async () => {
    await pageMatchesApi(page, scheduler)
    const file = path.join(work.path, 'swarm-page.png')
    await page.screenshot({ path: file })
    const png = await readFile(file)
    assert.deepEqual(pngSize(png), VIEWPORT)
    // The same check on an empty page finds one colour: it can fail.
    const blank = await browser.newPage({ viewport: VIEWPORT })
    const empty = await blank.screenshot()
    await blank.close()
    assert.ok(await colours(browser, empty) <= 2, 'a blank page has no colours to speak of')
    const seen = await colours(browser, png)
    assert.ok(seen >= 20, `the page's screenshot has ${seen} colours`)
    // DAMSELFLY_SCREENSHOT=docs/swarm-page.png refreshes the README's picture.
    if (process.env.DAMSELFLY_SCREENSHOT !== undefined) await copyFile(file, process.env.DAMSELFLY_SCREENSHOT)
  })
})
