import { chmod, mkdir, readFile, readdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { request } from 'undici'
import { freePort } from './ports.ts'
import { run, spawnProcess, waitFor, type Spawned } from './process.ts'

/**
 * BitTorrent on loopback with Debian's tools, as a baseline for the swarm:
 * mktorrent makes the torrent, opentracker tracks it, aria2c seeds and
 * leeches it.
 */

/** Installs the Debian packages behind `commands` (command → package) that are missing. */
export async function ensureCommands (commands: Record<string, string>): Promise<void> {
  const missing: string[] = []
  for (const [cmd, pkg] of Object.entries(commands)) {
    if (!await has(cmd)) missing.push(pkg)
  }
  if (missing.length === 0) return
  const root = process.getuid?.() === 0
  if (!root && !await has('sudo')) throw new Error(`missing Debian packages ${missing.join(' ')}, and not root and no sudo to install them`)
  const sudo = root ? [] : ['sudo']
  const apt = async (args: string[]): Promise<void> => {
    const [cmd, ...rest] = [...sudo, 'env', 'DEBIAN_FRONTEND=noninteractive', 'apt-get', ...args] as [string, ...string[]]
    await run(cmd, rest, { timeoutMs: 600_000 })
  }
  await apt(['update', '-qq'])
  await apt(['install', '-y', '-qq', '--no-install-recommends', ...missing])
  for (const cmd of Object.keys(commands)) {
    if (!await has(cmd)) throw new Error(`${cmd} is still missing after apt-get install ${missing.join(' ')}`)
  }
}

async function has (cmd: string): Promise<boolean> {
  try {
    await run('sh', ['-c', 'command -v "$1"', 'sh', cmd], { timeoutMs: 10_000 })
    return true
  } catch {
    return false
  }
}

export interface Torrent {
  /** The .torrent file. */
  file: string
  /** The info hash, 40 lowercase hex digits. */
  infoHash: string
}

/** A single-file torrent of `file` (named after its basename) with `pieceSize`-byte pieces (a power of two). */
export async function makeTorrent (file: string, out: string, announce: string, pieceSize: number): Promise<Torrent> {
  const log2 = Math.log2(pieceSize)
  if (!Number.isInteger(log2)) throw new Error(`a torrent's piece size is a power of two, not ${pieceSize}`)
  await run('mktorrent', ['-l', String(log2), '-a', announce, '-o', out, file], { timeoutMs: 300_000 })
  const { stdout } = await run('aria2c', ['-S', out])
  const m = /^Info Hash: ([0-9a-f]{40})$/m.exec(stdout)
  if (m === null) throw new Error(`no info hash in aria2c -S ${out}:\n${stdout}`)
  return { file: out, infoHash: m[1] as string }
}

export interface Tracker {
  port: number
  announce: string
  close(): Promise<void>
}

/**
 * opentracker on 127.0.0.1:`port` (TCP only), tracking the torrents in
 * `infoHashes`: Debian builds it to track only whitelisted torrents. It
 * chroots into `dir` (when root) and reads the whitelist from there, so the
 * list lives in `dir`, which must be readable by nobody, its user after that.
 */
export async function startTracker (options: { dir: string, port: number, infoHashes: string[] }): Promise<Tracker> {
  await mkdir(options.dir, { recursive: true, mode: 0o755 })
  await chmod(options.dir, 0o755)
  await writeFile(path.join(options.dir, 'whitelist'), options.infoHashes.map(h => `${h}\n`).join(''), { mode: 0o644 })
  const proc = spawnProcess('opentracker', ['-i', '127.0.0.1', '-p', String(options.port), '-d', options.dir, '-w', 'whitelist'])
  const announce = `http://127.0.0.1:${options.port}/announce`
  try {
    // It reads the whitelist on a thread of its own after it binds: an announce before that is refused.
    // A "stopped" announce asks without adding a peer to the swarm.
    const first = options.infoHashes[0]
    if (first === undefined) throw new Error('a tracker with nothing to track')
    const infoHash = first.replace(/../g, '%$&')
    await waitFor(async () => {
      const res = await request(`${announce}?info_hash=${infoHash}&peer_id=-DF0000-readinesschk&port=1&uploaded=0&downloaded=0&left=0&compact=1&event=stopped`, { signal: AbortSignal.timeout(1000) })
      const body = await res.body.text()
      return res.statusCode === 200 && !body.includes('failure reason')
    }, {
      timeoutMs: 15_000,
      intervalMs: 50,
      what: `opentracker on port ${options.port}`,
      giveUpIf: () => proc.child.exitCode !== null || proc.child.signalCode !== null ? 'opentracker exited' : undefined
    })
  } catch (err) {
    await proc.stop('SIGKILL')
    throw new Error(`${(err as Error).message}\n--- opentracker output ---\n${proc.output()}`, { cause: err })
  }
  return { port: options.port, announce, close: async () => { await proc.stop() } }
}

export interface Aria2 {
  proc: Spawned
  listenPort: number
  stop(): Promise<void>
}

export interface Leecher extends Aria2 {
  /** The epoch ms at which the download completed (every piece verified), before it went on to seed. */
  completed: Promise<number>
}

/**
 * Flags every aria2c gets: a BitTorrent node on loopback that finds peers
 * through the tracker and peer exchange only (no DHT, no local discovery,
 * which would reach past loopback), with no upload or peer-count caps, and
 * that seeds until it is stopped (`--seed-ratio=0.0` without a seed time).
 */
function commonArgs (listenPort: number): string[] {
  return [
    '--no-conf=true',
    `--listen-port=${listenPort}`,
    '--enable-dht=false',
    '--enable-dht6=false',
    '--bt-enable-lpd=false',
    '--enable-peer-exchange=true',
    '--disable-ipv6=true',
    '--async-dns=false',
    '--bt-max-peers=0',
    '--max-overall-upload-limit=0',
    '--max-upload-limit=0',
    '--seed-ratio=0.0',
    '--bt-tracker-connect-timeout=5',
    '--bt-tracker-timeout=10',
    '--file-allocation=none',
    '--summary-interval=0',
    '--show-console-readout=false',
    '--enable-color=false',
    '--console-log-level=notice',
    // Should this process die without cleaning up, its aria2c processes end with it.
    `--stop-with-process=${process.pid}`
  ]
}

/**
 * An aria2c seeding `torrent` from `dir`, which already holds the complete
 * file: `--bt-seed-unverified` trusts it rather than hashing it all first.
 */
export async function startSeeder (torrent: Torrent, dir: string): Promise<Aria2> {
  const listenPort = await freePort()
  const proc = spawnProcess('aria2c', [...commonArgs(listenPort), '--bt-seed-unverified=true', '--check-integrity=false', `--dir=${dir}`, torrent.file])
  await waitListening(proc, listenPort)
  return { proc, listenPort, stop: async () => { await proc.stop() } }
}

/**
 * An aria2c leeching `torrent` into the empty `dir`, and seeding on after
 * completion until stopped. The completion hook stamps the time in a file
 * beside the download (`<file>.done`); `completed` polls for it.
 */
export function startLeecher (torrent: Torrent, dir: string, listenPort: number, hook: string, timeoutMs: number): Leecher {
  const proc = spawnProcess('aria2c', [...commonArgs(listenPort), '--check-integrity=false', `--on-bt-download-complete=${hook}`, `--dir=${dir}`, torrent.file])
  const completed = (async () => {
    let stamp: number | undefined
    await waitFor(async () => {
      stamp = await readDoneStamp(dir)
      return stamp !== undefined
    }, {
      timeoutMs,
      intervalMs: 25,
      what: `aria2c in ${dir} to complete`,
      giveUpIf: () => proc.child.exitCode !== null || proc.child.signalCode !== null ? `aria2c exited:\n${proc.output().slice(-4000)}` : undefined
    })
    return stamp as number
  })()
  // Awaited by the caller; without this an early rejection would be reported as unhandled.
  completed.catch(() => {})
  return { proc, listenPort, completed, stop: async () => { await proc.stop() } }
}

async function readDoneStamp (dir: string): Promise<number | undefined> {
  const done = (await readdir(dir)).find(f => f.endsWith('.done'))
  if (done === undefined) return undefined
  const stamp = Number((await readFile(path.join(dir, done), 'utf8')).trim())
  return Number.isFinite(stamp) && stamp > 0 ? stamp : undefined
}

/**
 * Writes the completion hook into `dir`: aria2c runs it with the GID, the
 * file count and the first file's path; it writes the epoch ms to
 * `<path>.done` (renamed into place, so a reader never sees it half written).
 */
export async function writeCompletionHook (dir: string): Promise<string> {
  const hook = path.join(dir, 'on-complete.sh')
  await writeFile(hook, '#!/bin/sh\ndate +%s%3N > "$3.done.tmp" && mv "$3.done.tmp" "$3.done"\n', { mode: 0o755 })
  return hook
}

/** Ready once aria2c logs (at notice level) that it bound its port; it exits when it cannot. */
async function waitListening (proc: Spawned, port: number): Promise<void> {
  await waitFor(async () => proc.output().includes(`listening on TCP port ${port}`), {
    timeoutMs: 15_000,
    intervalMs: 25,
    what: `aria2c to listen on port ${port}`,
    giveUpIf: () => proc.child.exitCode !== null ? `aria2c exited:\n${proc.output().slice(-4000)}` : undefined
  }).catch(async (err: unknown) => {
    await proc.stop('SIGKILL')
    throw new Error(`${(err as Error).message}\n--- aria2c output ---\n${proc.output()}`, { cause: err })
  })
}
