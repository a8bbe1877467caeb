import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { request } from 'undici'
import { spawnProcess, waitFor, type Spawned } from './process.ts'

/**
 * Helpers of the trust-model attack tests: processes started with exactly the
 * flags a test names (startPeer and startScheduler add their own listen hosts),
 * the machine's non-loopback address, and connection probes.
 */

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')
export const CLI = path.join(ROOT, 'bin', 'damselfly.js')

/** The first non-internal IPv4 address of this machine (eth0's), or undefined. */
export function nonLoopbackIPv4 (): string | undefined {
  for (const list of Object.values(os.networkInterfaces())) {
    for (const a of list ?? []) {
      if (a.family === 'IPv4' && !a.internal && !a.address.startsWith('127.')) return a.address
    }
  }
  return undefined
}

/** 'open' when a TCP connection to host:port is accepted, else the error code (ECONNREFUSED, …). */
export async function probeConnect (host: string, port: number, opts: { localAddress?: string, timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port, ...(opts.localAddress === undefined ? {} : { localAddress: opts.localAddress }) })
    const timer = setTimeout(() => { socket.destroy(); resolve('timeout') }, opts.timeoutMs ?? 3_000)
    socket.once('connect', () => { clearTimeout(timer); socket.destroy(); resolve('open') })
    socket.once('error', (err: NodeJS.ErrnoException) => { clearTimeout(timer); socket.destroy(); resolve(err.code ?? err.message) })
  })
}

export interface Launched {
  /** 'healthy': /healthy answered 200; 'exited': the process ended first; 'timeout': neither. */
  outcome: 'healthy' | 'exited' | 'timeout'
  /** The exit code when it exited (null when killed by a signal). */
  code: number | null | undefined
  proc: Spawned
  stderr: () => string
  output: () => string
  stop: () => Promise<void>
}

/**
 * Runs `damselfly <args>` (nothing added) and waits until `healthUrl/healthy`
 * answers 200 or the process exits. The process is left running when healthy;
 * stop() it.
 */
export async function launch (args: string[], healthUrl: string, opts: { timeoutMs?: number, env?: NodeJS.ProcessEnv, cwd?: string, cli?: string } = {}): Promise<Launched> {
  const proc = spawnProcess(process.execPath, [opts.cli ?? CLI, ...args], {
    env: { ...process.env, ...opts.env },
    ...(opts.cwd === undefined ? {} : { cwd: opts.cwd })
  })
  let stderr = ''
  proc.child.stderr?.on('data', (d: Buffer) => { stderr += d.toString() })
  let code: number | null | undefined
  let exited = false
  void proc.exited.then((c) => { code = c; exited = true })
  let outcome: Launched['outcome'] = 'timeout'
  try {
    await waitFor(async () => {
      const res = await request(`${healthUrl}/healthy`, { signal: AbortSignal.timeout(1_000) })
      await res.body.dump()
      return res.statusCode === 200
    }, { timeoutMs: opts.timeoutMs ?? 30_000, intervalMs: 100, what: 'the process to become healthy', giveUpIf: () => exited ? 'exited' : undefined })
    outcome = 'healthy'
  } catch {
    outcome = exited ? 'exited' : 'timeout'
  }
  if (outcome === 'exited') await proc.stop() // collects the last output
  return {
    outcome,
    get code () { return code },
    proc,
    stderr: () => stderr,
    output: () => proc.output(),
    stop: async () => { await proc.stop() }
  }
}
