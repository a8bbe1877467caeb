import { spawn } from 'node:child_process'
import type { ChildProcess } from 'node:child_process'
import { setTimeout as sleep } from 'node:timers/promises'

export interface RunOptions {
  env?: NodeJS.ProcessEnv
  cwd?: string
  /** Kill the command (SIGKILL) and reject after this long. Default 120 s. */
  timeoutMs?: number
  /** Written to the command's stdin, which is then closed. Without it stdin is /dev/null. */
  input?: string | Buffer
}

const TAIL = 2048

function tail (text: string, max: number): string {
  return text.length > max ? `…${text.slice(-max)}` : text
}

function describe (cmd: string, args: string[]): string {
  return [cmd, ...args].map((a) => /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", "'\\''")}'`).join(' ')
}

/** Like run(), but stdout comes back as raw bytes (for binary output such as `ctr content get`). */
export async function runRaw (cmd: string, args: string[], opts: RunOptions = {}): Promise<{ stdout: Buffer, stderr: string }> {
  const timeoutMs = opts.timeoutMs ?? 120_000
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
      stdio: [opts.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe']
    })
    const out: Buffer[] = []
    const err: Buffer[] = []
    let timedOut = false
    let settled = false
    child.stdout?.on('data', (chunk: Buffer) => out.push(chunk))
    child.stderr?.on('data', (chunk: Buffer) => err.push(chunk))
    const timer = setTimeout(() => {
      timedOut = true
      child.kill('SIGKILL')
    }, timeoutMs)
    const fail = (message: string): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      const stderr = Buffer.concat(err).toString('utf8')
      const stdout = Buffer.concat(out).toString('utf8')
      reject(new Error(`${message}: ${describe(cmd, args)}\n--- stderr ---\n${tail(stderr, TAIL)}\n--- stdout ---\n${tail(stdout, TAIL)}`))
    }
    child.on('error', (e) => fail(`could not run (${e.message})`))
    child.on('close', (code, signal) => {
      if (settled) return
      if (timedOut) return fail(`timed out after ${timeoutMs} ms`)
      if (code !== 0) return fail(`exited with ${code ?? signal ?? 'unknown'}`)
      settled = true
      clearTimeout(timer)
      resolve({ stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString('utf8') })
    })
    if (opts.input !== undefined && child.stdin !== null) {
      child.stdin.on('error', () => {}) // the command may exit without reading it all
      child.stdin.end(opts.input)
    }
  })
}

/**
 * Runs a command to completion. Rejects with an Error naming the command, its
 * exit code (or signal) and the last 2 KiB of stderr and stdout when it fails
 * or outlives `timeoutMs`.
 */
export async function run (cmd: string, args: string[], opts: RunOptions = {}): Promise<{ stdout: string, stderr: string }> {
  const { stdout, stderr } = await runRaw(cmd, args, opts)
  return { stdout: stdout.toString('utf8'), stderr }
}

export interface Spawned {
  child: ChildProcess
  /** Combined stdout and stderr so far (the last 64 KiB). */
  output(): string
  /** Sends `signal` (SIGTERM), waits for the exit, SIGKILLs after 5 s. Resolves once it has exited. */
  stop(signal?: NodeJS.Signals): Promise<void>
  /** The exit code; null when killed by a signal or when it could not start. Never rejects. */
  exited: Promise<number | null>
}

const OUTPUT_MAX = 64 * 1024

/** Starts a long-running process whose output is kept for error messages. */
export function spawnProcess (cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv, cwd?: string } = {}): Spawned {
  const child = spawn(cmd, args, {
    env: opts.env ?? process.env,
    ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let output = ''
  const append = (chunk: Buffer | string): void => {
    output += chunk.toString()
    if (output.length > OUTPUT_MAX * 2) output = output.slice(-OUTPUT_MAX)
  }
  child.stdout?.on('data', append)
  child.stderr?.on('data', append)
  let done = false
  let closed = false
  child.once('close', () => { closed = true })
  // 'exit', not 'close': a grandchild may hold the pipes open after the process is gone.
  const exited = new Promise<number | null>((resolve) => {
    child.once('error', (e) => {
      append(`\n[spawn error: ${e.message}]\n`)
      // 'exit' does not follow a failure to spawn.
      if (child.pid === undefined) {
        done = true
        resolve(null)
      }
    })
    child.once('exit', (code) => {
      done = true
      resolve(code)
    })
  })
  return {
    child,
    exited,
    output: () => output.slice(-OUTPUT_MAX),
    async stop (signal: NodeJS.Signals = 'SIGTERM') {
      if (!done) {
        child.kill(signal)
        const timer = setTimeout(() => { if (!done) child.kill('SIGKILL') }, 5000)
        try {
          await exited
        } finally {
          clearTimeout(timer)
        }
      }
      // Give the last output a moment, then let go of pipes a grandchild may still hold.
      if (!closed) await Promise.race([new Promise((resolve) => child.once('close', resolve)), sleep(500)])
      child.stdout?.destroy()
      child.stderr?.destroy()
    }
  }
}

/** Polls `check` until it returns true; a throwing check counts as "not yet". */
export async function waitFor (check: () => Promise<boolean>, opts: {
  timeoutMs: number
  intervalMs?: number
  what: string
  /** Checked before each poll: a returned reason ends the wait at once (e.g. "the process exited"). */
  giveUpIf?: () => string | undefined
}): Promise<void> {
  const deadline = Date.now() + opts.timeoutMs
  const interval = opts.intervalMs ?? 100
  let lastError: unknown
  for (;;) {
    const reason = opts.giveUpIf?.()
    if (reason !== undefined) throw new Error(`gave up waiting for ${opts.what}: ${reason}`, { cause: lastError })
    try {
      if (await check()) return
      lastError = undefined
    } catch (e) {
      lastError = e
    }
    if (Date.now() >= deadline) throw new Error(`timed out waiting for ${opts.what}`, { cause: lastError })
    await sleep(Math.min(interval, Math.max(0, deadline - Date.now())))
  }
}
