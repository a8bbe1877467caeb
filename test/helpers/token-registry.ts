import { createPrivateKey, randomBytes, sign, X509Certificate } from 'node:crypto'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import http, { type IncomingMessage, type ServerResponse } from 'node:http'
import path from 'node:path'
import { request } from 'undici'
import { freePort } from './ports.ts'
import { run, spawnProcess, waitFor, type Spawned } from './process.ts'
import { tmpDir } from './tmp.ts'

/**
 * A real registry (Debian's docker-registry 2.8) with `auth: token`, the way
 * Docker Hub and Harbor authenticate: `/v2/` answers 401 with a Bearer
 * challenge naming a token server that this helper runs in the test process.
 * The token server issues RS256 JWTs whose `x5c` header carries a self-signed
 * certificate that is the registry's whole `rootcertbundle`.
 *
 * Grants, per `scope=repository:<name>:<actions>` asked for:
 * - a user from `users` with the right password: what `grants` gives that user
 *   (default for `alice`: pull and push on `private/app` and on `public/*`);
 * - no Authorization at all: pull on `public/*` only (anything else asked for
 *   is left out of the token, so the registry answers 401 insufficient_scope);
 * - a wrong user or password: 401.
 */
export interface TokenRegistryOptions {
  /** username → password. Default `{ alice: 'alice-password' }`. */
  users?: Record<string, string>
  /** username → repository patterns (`name` or `prefix/*`) → actions. Default: every user may pull and push `private/app` and `public/*`. */
  grants?: Record<string, Record<string, string[]>>
  /** Repository patterns anonymous callers may pull. Default `['public/*']`. */
  anonymousPull?: string[]
}

export interface TokenRequest {
  /** Who asked: a username, '' for anonymous, or undefined when the password was wrong. */
  account: string | undefined
  scopes: string[]
  status: number
}

export interface TokenRegistry {
  /** http://127.0.0.1:PORT of the registry. */
  url: string
  /** 127.0.0.1:PORT of the registry. */
  host: string
  port: number
  /** http://127.0.0.1:PORT/token: the realm of the Bearer challenge. */
  realm: string
  service: string
  /** Every token request, oldest first. */
  readonly tokenRequests: TokenRequest[]
  /**
   * A token the way a client gets one (GET realm with Basic credentials, or
   * anonymously), e.g. `await token('repository:private/app:pull', 'alice:alice-password')`.
   * Throws on a non-200 answer; `tokenStatus` gives the status instead.
   */
  token: (scope: string, creds?: string) => Promise<string>
  tokenStatus: (scope: string, creds?: string) => Promise<number>
  /** user:password for `pushImage(..., { creds })`. */
  creds: (user?: string) => string
  stop: () => Promise<void>
  start: () => Promise<void>
  /** Stops the registry and the token server and removes the temporary directory. */
  close: () => Promise<void>
}

const SERVICE = 'damselfly-token-test'
const ISSUER = 'damselfly-token-test-issuer'

function b64url (data: Buffer | string): string {
  return Buffer.from(data).toString('base64url')
}

function matches (pattern: string, name: string): boolean {
  return pattern.endsWith('/*') ? name.startsWith(pattern.slice(0, -1)) : pattern === name
}

function registryConfig (o: { port: number, dataDir: string, realm: string, rootCert: string }): string {
  return [
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
    `  addr: 127.0.0.1:${o.port}`,
    `  secret: ${randomBytes(16).toString('hex')}`,
    'auth:',
    '  token:',
    `    realm: ${JSON.stringify(o.realm)}`,
    `    service: ${JSON.stringify(SERVICE)}`,
    `    issuer: ${JSON.stringify(ISSUER)}`,
    `    rootcertbundle: ${JSON.stringify(o.rootCert)}`,
    ''
  ].join('\n')
}

export async function startTokenRegistry (opts: TokenRegistryOptions = {}): Promise<TokenRegistry> {
  const users = opts.users ?? { alice: 'alice-password' }
  const anonymousPull = opts.anonymousPull ?? ['public/*']
  const grantsOf = (user: string): Record<string, string[]> => opts.grants?.[user] ?? { 'private/app': ['pull', 'push'], 'public/*': ['pull', 'push'] }
  const tokenRequests: TokenRequest[] = []
  const tmp = await tmpDir('damselfly-token-registry')
  let tokenServer: http.Server | undefined
  let proc: Spawned | undefined
  try {
    // The signing key and its certificate: the registry trusts exactly this one.
    const keyFile = path.join(tmp.path, 'token.key')
    const certFile = path.join(tmp.path, 'token.crt')
    await run('openssl', [
      'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-sha256', '-days', '2',
      '-keyout', keyFile, '-out', certFile, '-subj', '/CN=damselfly-token-signer',
      '-addext', 'basicConstraints=critical,CA:TRUE',
      '-addext', 'keyUsage=critical,digitalSignature,keyCertSign'
    ], { timeoutMs: 30_000 })
    const key = createPrivateKey(await readFile(keyFile))
    const x5c = new X509Certificate(await readFile(certFile)).raw.toString('base64')

    const issue = (subject: string, access: Array<{ type: string, name: string, actions: string[] }>): string => {
      const now = Math.floor(Date.now() / 1000)
      const header = b64url(JSON.stringify({ typ: 'JWT', alg: 'RS256', x5c: [x5c] }))
      const claims = b64url(JSON.stringify({ iss: ISSUER, sub: subject, aud: SERVICE, exp: now + 600, nbf: now - 10, iat: now, jti: randomBytes(12).toString('hex'), access }))
      const signature = sign('sha256', Buffer.from(`${header}.${claims}`), key)
      return `${header}.${claims}.${b64url(signature)}`
    }

    const handleToken = (req: IncomingMessage, res: ServerResponse): void => {
      req.resume()
      const url = new URL(req.url ?? '/', 'http://token')
      const scopes = url.searchParams.getAll('scope').flatMap(s => s.split(' ')).filter(s => s !== '')
      const send = (status: number, body: unknown, account: string | undefined): void => {
        tokenRequests.push({ account, scopes, status })
        const text = JSON.stringify(body)
        res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
        res.end(text)
      }
      if (url.pathname !== '/token') return send(404, { errors: [{ code: 'NOT_FOUND' }] }, undefined)
      let account = ''
      const auth = req.headers.authorization
      if (auth !== undefined && auth !== '') {
        const m = /^Basic\s+(\S+)$/i.exec(auth)
        const decoded = m === null ? '' : Buffer.from(m[1] as string, 'base64').toString('utf8')
        const colon = decoded.indexOf(':')
        const user = colon === -1 ? '' : decoded.slice(0, colon)
        if (colon === -1 || !Object.hasOwn(users, user) || users[user] !== decoded.slice(colon + 1)) {
          res.setHeader('www-authenticate', `Basic realm="${SERVICE}"`)
          return send(401, { errors: [{ code: 'UNAUTHORIZED', message: 'bad username or password' }] }, undefined)
        }
        account = user
      }
      const access: Array<{ type: string, name: string, actions: string[] }> = []
      for (const scope of scopes) {
        const m = /^repository(?:\([^)]*\))?:([^:]+):(.*)$/.exec(scope)
        if (m === null) continue
        const name = m[1] as string
        const asked = (m[2] as string).split(',').map(a => a.trim())
        let allowed: string[]
        if (account === '') {
          allowed = anonymousPull.some(p => matches(p, name)) ? ['pull'] : []
        } else {
          allowed = [...new Set(Object.entries(grantsOf(account)).filter(([p]) => matches(p, name)).flatMap(([, a]) => a))]
        }
        const actions = asked.filter(a => allowed.includes(a) || (a === '*' && allowed.length > 0))
        if (actions.length > 0) access.push({ type: 'repository', name, actions })
      }
      const token = issue(account, access)
      send(200, { token, access_token: token, expires_in: 600, issued_at: new Date().toISOString() }, account)
    }

    const server = http.createServer(handleToken)
    tokenServer = server
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen({ host: '127.0.0.1', port: 0 }, () => { server.off('error', reject); resolve() })
    })
    const tokenAddress = server.address()
    if (tokenAddress === null || typeof tokenAddress !== 'object') throw new Error('token server has no address')
    const realm = `http://127.0.0.1:${tokenAddress.port}/token`

    const port = await freePort()
    const dataDir = path.join(tmp.path, 'data')
    await mkdir(dataDir)
    const configFile = path.join(tmp.path, 'config.yml')
    await writeFile(configFile, registryConfig({ port, dataDir, realm, rootCert: certFile }))
    const host = `127.0.0.1:${port}`
    const url = `http://${host}`

    const start = async (): Promise<void> => {
      if (proc !== undefined) return
      const p = spawnProcess('docker-registry', ['serve', configFile])
      proc = p
      let exited: number | null | undefined
      void p.exited.then((code) => { exited = code })
      try {
        await waitFor(async () => {
          const res = await request(`${url}/v2/`, { headersTimeout: 2000, bodyTimeout: 2000 })
          await res.body.dump()
          return res.statusCode === 401
        }, {
          timeoutMs: 15_000,
          intervalMs: 50,
          what: `token-auth registry on ${url}`,
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
    const ask = async (scope: string, creds?: string): Promise<{ status: number, token: string | undefined }> => {
      const q = new URLSearchParams({ service: SERVICE, scope })
      const headers: Record<string, string> = creds === undefined ? {} : { authorization: `Basic ${Buffer.from(creds).toString('base64')}` }
      const res = await request(`${realm}?${q.toString()}`, { headers })
      const body = await res.body.json() as { token?: string }
      return { status: res.statusCode, token: body.token }
    }
    await start()
    return {
      url,
      host,
      port,
      realm,
      service: SERVICE,
      tokenRequests,
      async token (scope, creds) {
        const { status, token } = await ask(scope, creds)
        if (status !== 200 || token === undefined) throw new Error(`token server answered ${status} for ${scope}`)
        return token
      },
      async tokenStatus (scope, creds) { return (await ask(scope, creds)).status },
      creds: (user = 'alice') => `${user}:${users[user] ?? ''}`,
      start,
      stop,
      async close () {
        await stop()
        server.closeAllConnections()
        await new Promise<void>((resolve) => server.close(() => resolve()))
        await tmp.cleanup()
      }
    }
  } catch (e) {
    await proc?.stop('SIGKILL')
    if (tokenServer !== undefined) {
      tokenServer.closeAllConnections()
      await new Promise<void>((resolve) => tokenServer?.close(() => resolve()))
    }
    await tmp.cleanup()
    throw e
  }
}
