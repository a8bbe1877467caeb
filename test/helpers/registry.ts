import { randomBytes } from 'node:crypto'
import { readFile, writeFile, mkdir } from 'node:fs/promises'
import path from 'node:path'
import { Agent, request } from 'undici'
import type { Dispatcher } from 'undici'
import type { NetnsNode } from './netns.ts'
import { freePort } from './ports.ts'
import { run, spawnProcess, waitFor } from './process.ts'
import type { Spawned } from './process.ts'
import { tmpDir } from './tmp.ts'

export interface RegistryOptions {
  /** htpasswd (bcrypt) basic auth for the whole registry. */
  auth?: { username: string, password: string }
  /** PEM file paths; the registry then serves https. */
  tls?: { cert: string, key: string }
  /** Address to listen on. Default 127.0.0.1. */
  host?: string
  /** Port to listen on. Default: a free one. */
  port?: number
  /** Run inside this node's network namespace (test/helpers/netns.ts). */
  netns?: Pick<NetnsNode, 'command'>
  /** Serve Prometheus metrics (bytes sent per handler) on this port of `host`, at /metrics. */
  metricsPort?: number
}

export interface TestRegistry {
  /** http://HOST:PORT (127.0.0.1 unless `host` was given), or https:// with tls. */
  url: string
  /** HOST:PORT */
  host: string
  port: number
  /** Storage root of the registry. */
  dataDir: string
  /** The running process's id; undefined while stopped. */
  readonly pid: number | undefined
  /** Stops the process; the data is kept. */
  stop(): Promise<void>
  /** Starts it again on the same port with the same data (for outage tests). */
  start(): Promise<void>
  /** stop() and remove the temporary directory. */
  close(): Promise<void>
}

/**
 * A self-signed certificate for 127.0.0.1 and localhost (openssl), to serve a
 * TestRegistry over https; `cert` doubles as the CA to trust.
 */
export async function makeTestCert (dir: string): Promise<{ cert: string, key: string }> {
  await mkdir(dir, { recursive: true })
  const cert = path.join(dir, 'registry.crt')
  const key = path.join(dir, 'registry.key')
  await run('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-sha256', '-days', '2',
    '-keyout', key, '-out', cert, '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-addext', 'basicConstraints=critical,CA:TRUE'
  ], { timeoutMs: 30_000 })
  return { cert, key }
}

/**
 * A CA of its own (EC P-256, openssl) for the peer to sign intercepted hosts'
 * certificates with; clients that trust it accept the peer's answers.
 */
export async function makeTestCa (dir: string, name: string): Promise<{ cert: string, key: string }> {
  await mkdir(dir, { recursive: true })
  const cert = path.join(dir, `${name}.crt`)
  const key = path.join(dir, `${name}.key`)
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-sha256', '-days', '2',
    '-keyout', key, '-out', cert, '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign'
  ], { timeoutMs: 30_000 })
  return { cert, key }
}

function registryConfig (o: { host: string, port: number, metricsPort: number | undefined, dataDir: string, tls: RegistryOptions['tls'], htpasswd: string | undefined }): string {
  const lines = [
    'version: 0.1',
    'log:',
    '  level: warn',
    '  formatter: text',
    '  accesslog:',
    '    disabled: true',
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${JSON.stringify(o.dataDir)}`,
    '  delete:',
    '    enabled: true',
    '  maintenance:',
    '    uploadpurging:',
    '      enabled: false',
    'http:',
    `  addr: ${o.host}:${o.port}`,
    `  secret: ${randomBytes(16).toString('hex')}`
  ]
  if (o.metricsPort !== undefined) {
    lines.push('  debug:', `    addr: ${o.host}:${o.metricsPort}`, '    prometheus:', '      enabled: true', '      path: /metrics')
  }
  if (o.tls !== undefined) {
    lines.push('  tls:', `    certificate: ${JSON.stringify(o.tls.cert)}`, `    key: ${JSON.stringify(o.tls.key)}`)
  }
  if (o.htpasswd !== undefined) {
    lines.push('auth:', '  htpasswd:', '    realm: damselfly-test', `    path: ${JSON.stringify(o.htpasswd)}`)
  }
  return lines.join('\n') + '\n'
}

/** Starts a real registry (distribution 2.8, `docker-registry serve`) on a free loopback port. */
export async function startRegistry (opts: RegistryOptions = {}): Promise<TestRegistry> {
  const tmp = await tmpDir('damselfly-registry')
  try {
    const port = opts.port ?? await freePort()
    const bind = opts.host ?? '127.0.0.1'
    const dataDir = path.join(tmp.path, 'data')
    await mkdir(dataDir)
    let htpasswd: string | undefined
    if (opts.auth !== undefined) {
      htpasswd = path.join(tmp.path, 'htpasswd')
      const { stdout } = await run('htpasswd', ['-Bbn', opts.auth.username, opts.auth.password])
      await writeFile(htpasswd, stdout)
    }
    const configFile = path.join(tmp.path, 'config.yml')
    await writeFile(configFile, registryConfig({ host: bind, port, metricsPort: opts.metricsPort, dataDir, tls: opts.tls, htpasswd }))

    const scheme = opts.tls !== undefined ? 'https' : 'http'
    const host = `${bind}:${port}`
    const url = `${scheme}://${host}`
    const dispatcher: Dispatcher = opts.tls !== undefined
      ? new Agent({ connect: { ca: await readFile(opts.tls.cert) } })
      : new Agent()

    let proc: Spawned | undefined
    const start = async (): Promise<void> => {
      if (proc !== undefined) return
      const { cmd, args } = opts.netns?.command('docker-registry', ['serve', configFile]) ?? { cmd: 'docker-registry', args: ['serve', configFile] }
      const p = spawnProcess(cmd, args)
      proc = p
      let exited: number | null | undefined
      void p.exited.then((code) => { exited = code })
      try {
        await waitFor(async () => {
          const res = await request(`${url}/v2/`, { dispatcher, headersTimeout: 2000, bodyTimeout: 2000 })
          await res.body.dump()
          return res.statusCode === 200 || res.statusCode === 401
        }, {
          timeoutMs: 15_000,
          intervalMs: 50,
          what: `registry on ${url}`,
          giveUpIf: () => exited !== undefined ? `docker-registry exited with ${exited}` : undefined
        })
      } catch (e) {
        await p.stop('SIGKILL')
        proc = undefined
        throw new Error(`${(e as Error).message}\n--- docker-registry output ---\n${p.output()}`, { cause: e })
      }
    }
    const stop = async (): Promise<void> => {
      const p = proc
      proc = undefined
      if (p !== undefined) await p.stop()
    }
    await start()
    return {
      url,
      host,
      port,
      dataDir,
      get pid () { return proc?.child.exitCode === null ? proc.child.pid : undefined },
      start,
      stop,
      async close () {
        await stop()
        await dispatcher.close()
        await tmp.cleanup()
      }
    }
  } catch (e) {
    await tmp.cleanup()
    throw e
  }
}
