import { spawn } from 'node:child_process'
import path from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import type { OriginRef, Report } from '../../src/protocol/messages.ts'
import type { HostileConfig, Lie } from './hostile-member-main.ts'
import { tmpDir } from './tmp.ts'

export type { Lie }

const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), 'hostile-member-main.ts')

export interface HostileStatus {
  peerId: string
  upload: string
  seed: boolean
  /** `fetch` commands the scheduler sent (it appointed this node first fetcher). */
  fetches: Array<{ digest: string, size: number, lie: string, at: number }>
  /** `evict` commands received (noted, not obeyed). */
  evictions: string[]
  reports: Array<{ report: Report, answer: unknown }>
  /** Pieces served from the upload port, per digest. */
  served: Record<string, number>
  servedBytes: number
  /** Piece requests answered 404. */
  refused: number
  blobs: Array<{ digest: string, size: number, pieces: number, count: number, lie: string, error?: string }>
}

export interface HostileMember {
  readonly name: string
  readonly peerId: string
  readonly upload: string
  status: () => Promise<HostileStatus>
  /** What the next blobs the scheduler makes it fetch are announced and served as. */
  lie: (lie: Lie) => Promise<void>
  /** Sends a report to the scheduler; resolves to the scheduler's answer. */
  report: (report: Report) => Promise<unknown>
  /** Announces a whole blob it does not hold: zero-filled pieces and their SHA-256s (and serves the zeros). */
  preannounce: (digest: string, size: number, origin?: OriginRef) => Promise<unknown>
  /** stderr of the process, last 64 KiB. */
  output: () => string
  /** Leaves the scheduler and exits; SIGKILL after 5 s. Idempotent. */
  close: () => Promise<void>
}

/**
 * Starts a hostile cluster member (hostile-member-main.ts) as its own process.
 * It holds the cluster secret; the test steers its lies over its stdin.
 */
export async function startHostileMember (options: { scheduler: string, clusterSecret: string, registry?: string, seed?: boolean, name?: string }): Promise<HostileMember> {
  const tmp = await tmpDir('df-hostile-')
  const name = options.name ?? 'hostile'
  const config: HostileConfig = { scheduler: options.scheduler, clusterSecret: options.clusterSecret, dataDir: tmp.path, registry: options.registry, seed: options.seed ?? false, name }
  const child = spawn(process.execPath, [MAIN, JSON.stringify(config)], { stdio: ['pipe', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (chunk: Buffer) => {
    stderr += chunk.toString()
    if (stderr.length > 128 * 1024) stderr = stderr.slice(-64 * 1024)
  })
  child.stdin.on('error', () => {})
  let exited = false
  const exit = new Promise<void>((resolve) => {
    child.once('exit', () => { exited = true; resolve() })
    child.once('error', () => { exited = true; resolve() })
  })
  const pending = new Map<number, { resolve: (v: Record<string, unknown>) => void, reject: (e: Error) => void }>()
  let nextId = 1
  const ready = Promise.withResolvers<{ peerId: string, upload: string }>()
  const lines = createInterface({ input: child.stdout })
  lines.on('line', (line) => {
    let msg: Record<string, unknown>
    try {
      msg = JSON.parse(line) as Record<string, unknown>
    } catch {
      return
    }
    if (msg.event === 'ready') {
      ready.resolve({ peerId: String(msg.peerId), upload: String(msg.upload) })
      return
    }
    const waiter = pending.get(Number(msg.id))
    if (waiter === undefined) return
    pending.delete(Number(msg.id))
    if (msg.ok === true) waiter.resolve(msg)
    else waiter.reject(new Error(`${name}: ${String(msg.error)}`))
  })
  void exit.then(() => {
    const err = new Error(`${name} exited\n${stderr.slice(-4000)}`)
    ready.reject(err)
    for (const w of pending.values()) w.reject(err)
    pending.clear()
  })
  ready.promise.catch(() => {})

  let closing: Promise<void> | undefined
  const close = async (): Promise<void> => {
    closing ??= (async () => {
      if (!exited) {
        child.stdin.end()
        const timer = setTimeout(() => { if (!exited) child.kill('SIGKILL') }, 5_000)
        await exit
        clearTimeout(timer)
      }
      lines.close()
      child.stdout.destroy()
      child.stderr.destroy()
      await tmp.cleanup()
    })()
    await closing
  }

  let info: { peerId: string, upload: string }
  try {
    const timeout = setTimeout(() => { ready.reject(new Error(`${name} did not start in 30 s\n${stderr.slice(-4000)}`)) }, 30_000)
    info = await ready.promise.finally(() => { clearTimeout(timeout) })
  } catch (err) {
    await close()
    throw err
  }

  const send = async (command: Record<string, unknown>): Promise<Record<string, unknown>> => {
    if (exited) throw new Error(`${name} has exited\n${stderr.slice(-4000)}`)
    const id = nextId++
    const answer = new Promise<Record<string, unknown>>((resolve, reject) => { pending.set(id, { resolve, reject }) })
    child.stdin.write(`${JSON.stringify({ ...command, id })}\n`)
    return answer
  }

  return {
    name,
    peerId: info.peerId,
    upload: info.upload,
    status: async () => await send({ cmd: 'status' }) as unknown as HostileStatus,
    lie: async (lie) => { await send({ cmd: 'lie', lie }) },
    report: async (report) => (await send({ cmd: 'report', report })).answer,
    preannounce: async (digest, size, origin) => (await send({ cmd: 'preannounce', digest, size, ...(origin === undefined ? {} : { origin }) })).answer,
    output: () => stderr.slice(-64 * 1024),
    close
  }
}
