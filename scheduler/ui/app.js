// The swarm page: polls the scheduler's JSON API and redraws what changed.
// Every string a peer sent (ids, hostnames, repositories) reaches the page as
// a text node or a fixed attribute's value; nothing here writes markup.

const POLL_MS = 1_000
const HIDDEN_POLL_MS = 5_000
const REQUEST_TIMEOUT_MS = 5_000
/** Blobs drawn at most; a large swarm's page stays light. */
const MAX_TASKS = 200

const view = {
  status: document.getElementById('status'),
  totals: document.getElementById('totals'),
  totalsBar: document.getElementById('totals-bar'),
  totalsNote: document.getElementById('totals-note'),
  hostCount: document.getElementById('host-count'),
  hosts: document.querySelector('#hosts tbody'),
  taskCount: document.getElementById('task-count'),
  tasks: document.getElementById('tasks')
}

let lastHosts = ''
let lastTasks = ''
let lastSwarm = ''
let lastOk = 0
let polls = 0

/** An element with fixed attributes; children are nodes or text (never parsed as HTML). */
function el (tag, attrs, ...children) {
  const node = document.createElement(tag)
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value))
  }
  for (const child of children) {
    if (child !== undefined && child !== null) node.append(typeof child === 'object' ? child : String(child))
  }
  return node
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB']

function formatBytes (n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '—'
  let value = n
  let unit = 0
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024
    unit++
  }
  return `${unit === 0 ? value : value.toFixed(value >= 100 ? 0 : 1)} ${UNITS[unit]}`
}

function formatRate (n) {
  return n > 0 ? `${formatBytes(n)}/s` : '—'
}

function formatPercent (fraction) {
  if (fraction >= 1) return '100%'
  const pct = fraction * 100
  return `${pct > 0 && pct < 1 ? '<1' : Math.floor(pct)}%`
}

function formatTime (iso) {
  const at = new Date(iso)
  if (Number.isNaN(at.getTime())) return '—'
  const sameDay = at.toDateString() === new Date().toDateString()
  return sameDay ? at.toLocaleTimeString() : at.toLocaleString()
}

/** libp2p ids share their first characters; the tail tells them apart. */
function shortPeer (id) {
  return typeof id === 'string' && id.length > 10 ? `…${id.slice(-8)}` : String(id)
}

function shortDigest (digest) {
  const [algorithm, hex] = String(digest).split(':')
  return hex === undefined ? String(digest) : `${algorithm}:${hex.slice(0, 12)}`
}

function bytesCell (source, n) {
  return typeof n === 'number'
    ? el('td', { class: 'num', 'data-source': source, 'data-bytes': n, title: `${n.toLocaleString()} bytes` }, formatBytes(n))
    : el('td', { class: 'num muted', 'data-source': source, title: 'this peer reports no byte counts' }, '—')
}

const SOURCES = [
  { key: 'local', label: 'cache' },
  { key: 'peer', label: 'peers' },
  { key: 'origin', label: 'the registry' }
]

/** The headline: what the registry sent, what peers sent each other, what clients got. */
function renderTotals (swarm) {
  const { served, fetched, uploaded } = swarm.bytes
  const sum = served.local + served.peer + served.origin
  const card = (key, cls, label, n, title) => el('div', { class: `card ${cls}`, 'data-total': key, 'data-bytes': n, title: `${n.toLocaleString()} bytes ${title}` },
    el('span', { class: 'label' }, label),
    el('span', { class: 'value' }, formatBytes(n))
  )
  view.totals.replaceChildren(
    card('registry', 'src-origin', 'From the registry', fetched.origin, 'the peers fetched from the origin registry'),
    card('peers', 'src-peer', 'Between peers', fetched.peer, 'the peers fetched from one another'),
    card('served', 'src-local', 'Served to clients', sum, 'the peers sent to their clients (containerd, nydusd, skopeo)'),
    card('uploaded', 'src-upload', 'Uploaded to peers', uploaded, 'piece bytes sent to other peers')
  )

  view.totalsBar.replaceChildren(...SOURCES.filter(s => served[s.key] > 0).map(s => {
    const part = el('span', { class: `src-${s.key}`, title: `${formatBytes(served[s.key])} served from ${s.label}` }, formatPercent(served[s.key] / sum))
    part.style.flexGrow = String(served[s.key])
    return part
  }))
  view.totalsBar.hidden = sum === 0

  const missing = swarm.hosts - swarm.reporting
  const parts = SOURCES.map(s => `${formatBytes(served[s.key])} from ${s.label}`).join(', ')
  view.totalsNote.textContent = `What clients received, by where each piece came from: ${parts}.` +
    (missing > 0 ? ` ${missing} of ${swarm.hosts} hosts report no counts.` : '')
}

/** ip:port of a peer's first TCP address: on a one-machine swarm every host has the same name. */
function addressOf (addrs) {
  for (const a of Array.isArray(addrs) ? addrs : []) {
    const m = /^\/(ip4|ip6|dns4|dns6|dns)\/([^/]+)\/tcp\/(\d+)/.exec(String(a))
    if (m !== null) return m[1] === 'ip6' ? `[${m[2]}]:${m[3]}` : `${m[2]}:${m[3]}`
  }
  return ''
}

function renderHosts (hosts) {
  const sorted = [...hosts].sort((a, b) => Number(b.seed) - Number(a.seed) || String(a.connectedAt).localeCompare(String(b.connectedAt)) || String(a.peerId).localeCompare(String(b.peerId)))
  view.hostCount.textContent = String(hosts.length)
  view.hosts.replaceChildren(...sorted.map(h => el('tr', { 'data-peer-id': h.peerId, class: h.barred ? 'barred' : undefined },
    el('td', { class: 'mono', title: h.peerId }, shortPeer(h.peerId)),
    el('td', { title: `${h.hostname} ${addressOf(h.addrs)}` }, el('span', { 'data-hostname': '' }, h.hostname), ' ', el('span', { class: 'muted mono', 'data-address': '' }, addressOf(h.addrs))),
    el('td', null, el('span', { class: h.seed ? 'tag seed' : 'tag' }, h.seed ? 'seed' : 'peer')),
    el('td', { title: h.connectedAt }, formatTime(h.connectedAt)),
    el('td', { class: 'num', title: `${h.activeUploads} of ${h.uploadCapacity} upload slots in use` }, `${h.activeUploads} / ${h.uploadCapacity}`),
    el('td', { class: 'num', title: 'measured by the peers that fetched from it' }, formatRate(h.throughput)),
    bytesCell('local', h.bytes?.served.local),
    bytesCell('peer', h.bytes?.served.peer),
    bytesCell('origin', h.bytes?.served.origin),
    bytesCell('uploaded', h.bytes?.uploaded),
    el('td', null, h.barred ? el('span', { class: 'tag barred' }, 'barred') : el('span', { class: 'tag ok' }, 'ok'))
  )))
  if (hosts.length === 0) view.hosts.replaceChildren(el('tr', null, el('td', { colspan: 11, class: 'empty' }, 'No peers connected.')))
}

function renderTasks (tasks, hosts) {
  const hostnames = new Map(hosts.map(h => [h.peerId, h.hostname]))
  const sorted = [...tasks].sort((a, b) => b.size - a.size || String(a.digest).localeCompare(String(b.digest)))
  const shown = sorted.slice(0, MAX_TASKS)
  view.taskCount.textContent = tasks.length > shown.length ? `${shown.length} of ${tasks.length}` : String(tasks.length)
  view.tasks.replaceChildren(...shown.map(t => {
    const holders = [
      ...t.completeHolders.map(peerId => ({ peerId, pieces: t.pieceCount, complete: true })),
      ...t.partialHolders.filter(p => p.peerId !== undefined).map(p => ({ peerId: p.peerId, pieces: p.pieces, complete: false }))
    ].sort((a, b) => b.pieces - a.pieces || String(a.peerId).localeCompare(String(b.peerId)))
    const where = t.origin === undefined ? undefined : `${t.origin.registry}/${t.origin.repo}`
    return el('article', { class: 'task', 'data-digest': t.digest },
      el('header', null,
        el('code', { title: t.digest }, shortDigest(t.digest)),
        where === undefined ? undefined : el('span', { class: 'origin', title: where }, t.origin.repo),
        el('span', { class: 'facts' }, `${formatBytes(t.size)} · ${t.pieceCount} ${t.pieceCount === 1 ? 'piece' : 'pieces'} · ${holders.length} ${holders.length === 1 ? 'holder' : 'holders'}`)
      ),
      holders.length === 0
        ? el('p', { class: 'empty' }, 'No holders.')
        : el('ul', { class: 'shares' }, ...holders.map(hd => shareRow(hd, t.pieceCount, hostnames.get(hd.peerId))))
    )
  }))
  if (tasks.length === 0) view.tasks.replaceChildren(el('p', { class: 'empty' }, 'No blobs known yet.'))
}

function shareRow (holder, pieceCount, hostname) {
  const fraction = holder.complete ? 1 : pieceCount === 0 ? 0 : Math.min(1, holder.pieces / pieceCount)
  const fill = el('span', { class: holder.complete ? 'fill complete' : 'fill' })
  fill.style.width = `${fraction * 100}%`
  return el('li', { 'data-peer-id': holder.peerId, 'data-fraction': fraction, title: `${holder.peerId}: ${holder.pieces} of ${pieceCount} pieces` },
    el('span', { class: 'who' }, el('span', { class: 'mono' }, shortPeer(holder.peerId)), ' ', el('span', { class: 'muted' }, hostname ?? '')),
    el('span', { class: 'bar' }, fill),
    el('span', { class: 'pct' }, formatPercent(fraction))
  )
}

function setStatus (state, text) {
  view.status.dataset.state = state
  view.status.textContent = text
}

async function getJson (path) {
  const res = await fetch(path, { cache: 'no-store', signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) })
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`)
  return await res.text()
}

async function poll () {
  try {
    const [hostsText, tasksText, swarmText] = await Promise.all([getJson('/api/v1/hosts'), getJson('/api/v1/tasks'), getJson('/api/v1/swarm')])
    const hosts = JSON.parse(hostsText)
    if (hostsText !== lastHosts || tasksText !== lastTasks) {
      renderHosts(hosts)
      renderTasks(JSON.parse(tasksText), hosts)
    }
    const swarm = JSON.parse(swarmText)
    // `at` changes every time; compare the rest.
    const swarmKey = JSON.stringify({ ...swarm, at: undefined })
    if (swarmKey !== lastSwarm) renderTotals(swarm)
    lastHosts = hostsText
    lastTasks = tasksText
    lastSwarm = swarmKey
    lastOk = Date.now()
    polls++
    document.body.dataset.polls = String(polls)
    setStatus('live', `live · ${swarm.hosts} ${swarm.hosts === 1 ? 'host' : 'hosts'} (${swarm.seeds} ${swarm.seeds === 1 ? 'seed' : 'seeds'}) · ${swarm.tasks} ${swarm.tasks === 1 ? 'blob' : 'blobs'} · updated ${new Date(swarm.at).toLocaleTimeString()}`)
  } catch (err) {
    setStatus('stale', `scheduler unreachable, retrying${lastOk === 0 ? '' : ` · last update ${new Date(lastOk).toLocaleTimeString()}`} (${err.message})`)
  }
  setTimeout(poll, document.visibilityState === 'hidden' ? HIDDEN_POLL_MS : POLL_MS)
}

poll()
