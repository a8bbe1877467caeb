import net from 'node:net'
import path from 'node:path'
import tls from 'node:tls'
import { readFile, writeFile } from 'node:fs/promises'
import { freePort } from './ports.ts'
import { makeTestCert } from './registry.ts'
import { spawnProcess, waitFor, type Spawned } from './process.ts'
import { tmpDir } from './tmp.ts'

export interface RedisOptions {
  /** requirepass; the password is also written to `passwordFile`. */
  password?: string
  /** Keep data across restarts (append-only file in the data dir). Default false: a restart loses everything. */
  persist?: boolean
  /** Serve TLS only (a self-signed certificate for 127.0.0.1, which is also the CA: `ca`). */
  tls?: boolean
}

export interface TestRedis {
  /** redis://127.0.0.1:PORT/0, or rediss:// with `tls`. */
  url: string
  /** With `tls`: the PEM file to trust. */
  caFile: string | undefined
  port: number
  /** A file holding the password, when there is one. */
  passwordFile: string | undefined
  /** Stops the process (SIGKILL with `crash`). */
  stop: (crash?: boolean) => Promise<void>
  /** Starts it again on the same port (and data, with `persist`). */
  start: () => Promise<void>
  /** One command over RESP, for assertions (e.g. `['XLEN', 'damselfly:events']`). */
  command: (...args: string[]) => Promise<string>
  close: () => Promise<void>
}

/** Debian's redis-server on 127.0.0.1, in a temporary directory. */
export async function startRedis (opts: RedisOptions = {}): Promise<TestRedis> {
  const tmp = await tmpDir('damselfly-redis-')
  const port = await freePort()
  let passwordFile: string | undefined
  if (opts.password !== undefined) {
    passwordFile = path.join(tmp.path, 'password')
    await writeFile(passwordFile, `${opts.password}\n`)
  }
  const cert = opts.tls === true ? await makeTestCert(path.join(tmp.path, 'tls')) : undefined
  const ca = cert === undefined ? undefined : await readFile(cert.cert, 'utf8')
  const listen = cert === undefined ? ['--port', String(port)] : ['--port', '0', '--tls-port', String(port), '--tls-cert-file', cert.cert, '--tls-key-file', cert.key, '--tls-auth-clients', 'no']
  const args = [...listen, '--bind', '127.0.0.1', '--dir', tmp.path, '--save', '', '--appendonly', opts.persist === true ? 'yes' : 'no', '--protected-mode', 'no',
    ...(opts.password === undefined ? [] : ['--requirepass', opts.password])]
  let proc: Spawned | undefined
  const command = async (...cmd: string[]): Promise<string> => respCommand(port, opts.password, ca, cmd)
  const start = async (): Promise<void> => {
    if (proc !== undefined) return
    const p = spawnProcess('redis-server', args)
    proc = p
    let exited: number | null | undefined
    void p.exited.then((code) => { exited = code })
    await waitFor(async () => (await command('PING')) === 'PONG', {
      timeoutMs: 10_000,
      intervalMs: 50,
      what: `redis-server on port ${port}`,
      giveUpIf: () => exited !== undefined ? `redis-server exited with ${exited}: ${p.output()}` : undefined
    })
  }
  const stop = async (crash = false): Promise<void> => {
    const p = proc
    proc = undefined
    if (p !== undefined) await p.stop(crash ? 'SIGKILL' : 'SIGTERM')
  }
  await start()
  return {
    url: `${cert === undefined ? 'redis' : 'rediss'}://127.0.0.1:${port}/0`,
    caFile: cert?.cert,
    port,
    passwordFile,
    stop,
    start,
    command,
    async close () {
      await stop()
      await tmp.cleanup()
    }
  }
}

/** Sends one command and returns its reply as text (errors as `-ERR …`, arrays as their length). */
async function respCommand (port: number, password: string | undefined, ca: string | undefined, cmd: string[]): Promise<string> {
  const encode = (parts: string[]): string => `*${parts.length}\r\n${parts.map(p => `$${Buffer.byteLength(p)}\r\n${p}\r\n`).join('')}`
  const payload = (password === undefined ? '' : encode(['AUTH', password])) + encode(cmd)
  const replies = password === undefined ? 1 : 2
  return new Promise((resolve, reject) => {
    const socket = ca === undefined ? net.connect({ host: '127.0.0.1', port }) : tls.connect({ host: '127.0.0.1', port, ca })
    let data = ''
    socket.setTimeout(5_000, () => socket.destroy(new Error('redis did not answer')))
    socket.on('error', reject)
    socket.on('data', (chunk) => {
      data += chunk.toString('utf8')
      const lines = data.split('\r\n')
      // Simple replies only, enough for assertions: +OK, :1, $len\r\nvalue, -ERR, *n.
      const out: string[] = []
      for (let i = 0; i < lines.length - 1 && out.length < replies; i++) {
        const line = lines[i] as string
        if (line.startsWith('$')) {
          if (line === '$-1') { out.push(''); continue }
          if (i + 1 >= lines.length - 1) return
          out.push(lines[++i] as string)
        } else {
          out.push(line.replace(/^[+:*]/, ''))
        }
      }
      if (out.length < replies) return
      socket.end()
      resolve(out[replies - 1] as string)
    })
    socket.write(payload)
  })
}
