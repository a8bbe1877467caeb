import { mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { run } from './process.ts'
import { tmpDir } from './tmp.ts'

// What skopeo 1.9.3 (containers/image 5.23) sends to a mirror, observed with a
// logging HTTP proxy as the only [[registry.mirror]] of a registry at
// 127.0.0.1:R (`skopeo copy docker://127.0.0.1:R/team/app:v1 dir:…`):
//
// - No `ns`: the mirror sees only `/v2/team/app/...`; nothing tells it which
//   registry is meant (it must know its default upstream).
// - It pings first: `GET /v2/` (`User-Agent: skopeo/1.9.3`,
//   `Docker-Distribution-Api-Version: registry/2.0`, `Accept-Encoding: gzip`,
//   `Connection: close` on every request), then
//   `GET /v2/team/app/manifests/v1` (a GET, not a HEAD, also for tags) with
//   `Accept: application/vnd.oci.image.manifest.v1+json,
//   application/vnd.docker.distribution.manifest.v2+json,
//   application/vnd.docker.distribution.manifest.v1+prettyjws,
//   application/vnd.docker.distribution.manifest.v1+json,
//   application/vnd.docker.distribution.manifest.list.v2+json,
//   application/vnd.oci.image.index.v1+json`, then
//   `GET /v2/team/app/blobs/sha256:<digest>` for each layer and the config.
//   A by-digest reference gives `GET /v2/team/app/manifests/sha256:…` after the ping.
// - The mirror is chosen once, for the manifest: a refused connection or a
//   failing manifest request (401 included) moves on to the next mirror and
//   finally the primary. Once the manifest came from the mirror, every blob
//   comes from it too: a 500 on a blob fails the copy, with no fallback.
// - Auth: --src-creds are deliberately *not* sent to mirrors. After the ping's
//   401 (`Basic realm=…`) it sends `Authorization: Basic Og==` (base64 of ":",
//   empty user and password) to the mirror; if that is refused it falls back to
//   the primary, which does get --src-creds. A mirror only gets real
//   credentials from the auth file entry for the mirror's own host
//   (skopeoCopyToDir's `auths`), and then sends them pre-emptively on every
//   request after the ping.
// - registries.conf: skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF; the hidden
//   `--registries-conf FILE` flag works both as a global flag and on `copy`.

export interface SkopeoSandbox {
  dir: string
  /** --policy, --registries.d, --registries-conf and --tmpdir, to go before the subcommand. */
  globalArgs: string[]
  /** process.env with a private HOME, XDG dirs and REGISTRY_AUTH_FILE. */
  env: NodeJS.ProcessEnv
  /** Does not exist until written; pass it as --authfile. */
  authFile: string
  cleanup(): Promise<void>
}

/**
 * Private configuration for one skopeo run: an accept-anything policy, the
 * given (or an empty) registries.conf, an empty registries.d, a nonexistent
 * auth file and a private HOME, so nothing of the host is read or written.
 * skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF: registries.conf must be given
 * with the (hidden) --registries-conf flag, which globalArgs does.
 */
export async function skopeoSandbox (registriesConf?: string): Promise<SkopeoSandbox> {
  const tmp = await tmpDir('damselfly-skopeo')
  const policy = path.join(tmp.path, 'policy.json')
  const emptyConf = path.join(tmp.path, 'registries.conf')
  const registriesD = path.join(tmp.path, 'registries.d')
  const home = path.join(tmp.path, 'home')
  const authFile = path.join(tmp.path, 'auth.json')
  await writeFile(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }))
  await writeFile(emptyConf, 'unqualified-search-registries = []\n')
  await mkdir(registriesD)
  await mkdir(path.join(tmp.path, 'tmp'))
  await mkdir(home)
  return {
    dir: tmp.path,
    globalArgs: [
      '--policy', policy,
      '--registries.d', registriesD,
      '--registries-conf', registriesConf ?? emptyConf,
      '--tmpdir', path.join(tmp.path, 'tmp')
    ],
    env: {
      ...process.env,
      HOME: home,
      XDG_RUNTIME_DIR: path.join(tmp.path, 'run'),
      XDG_CONFIG_HOME: path.join(home, '.config'),
      REGISTRY_AUTH_FILE: authFile,
      DOCKER_CONFIG: path.join(home, '.docker')
    },
    authFile,
    cleanup: async () => tmp.cleanup()
  }
}

function tomlString (s: string): string {
  return JSON.stringify(s)
}

/**
 * Writes a registries.conf (v2) that sends pulls from `registryHost` to `mirror`
 * first (for tags too, not only digests), both as insecure (http or unverified https).
 */
export async function writeRegistriesConf (file: string, opts: { registryHost: string, mirror: string, insecure?: boolean }): Promise<void> {
  const insecure = opts.insecure ?? true
  await writeFile(file, [
    'unqualified-search-registries = []',
    '',
    '[[registry]]',
    `prefix = ${tomlString(opts.registryHost)}`,
    `location = ${tomlString(opts.registryHost)}`,
    `insecure = ${insecure}`,
    '',
    '[[registry.mirror]]',
    `location = ${tomlString(opts.mirror)}`,
    `insecure = ${insecure}`,
    ''
  ].join('\n'))
}

export interface SkopeoCopyOptions {
  /** A registries.conf (see writeRegistriesConf); default: an empty one. */
  registriesConf?: string
  /** user:pass for the source registry (--src-creds). skopeo never sends these to a mirror. */
  creds?: string
  /** host[:port] → user:pass written to the private auth.json; the only way to give a mirror credentials. */
  auths?: Record<string, string>
  /** Default false. */
  tlsVerify?: boolean
  timeoutMs?: number
}

/**
 * `skopeo copy <ref> dir:<destDir>` with a private policy, auth file and HOME;
 * `registriesConf` (see writeRegistriesConf) is passed with --registries-conf,
 * otherwise an empty one is used, so the host's /etc/containers is never read.
 */
export async function skopeoCopyToDir (ref: string, destDir: string, opts: SkopeoCopyOptions = {}): Promise<{ stdout: string, stderr: string }> {
  const sandbox = await skopeoSandbox(opts.registriesConf)
  try {
    if (opts.auths !== undefined) {
      const auths: Record<string, { auth: string }> = {}
      for (const [host, creds] of Object.entries(opts.auths)) auths[host] = { auth: Buffer.from(creds).toString('base64') }
      await writeFile(sandbox.authFile, JSON.stringify({ auths }))
    }
    return await run('skopeo', [
      ...sandbox.globalArgs,
      'copy', '--quiet', '--authfile', sandbox.authFile,
      `--src-tls-verify=${opts.tlsVerify ?? false}`,
      ...(opts.creds !== undefined ? ['--src-creds', opts.creds] : []),
      ref, `dir:${destDir}`
    ], { env: sandbox.env, timeoutMs: opts.timeoutMs ?? 120_000 })
  } finally {
    await sandbox.cleanup()
  }
}

/** `skopeo list-tags <ref>` in a sandbox (plain http allowed); the parsed tag list. */
export async function skopeoListTags (ref: string, opts: { creds?: string, timeoutMs?: number } = {}): Promise<string[]> {
  const sandbox = await skopeoSandbox()
  try {
    const { stdout } = await run('skopeo', [
      ...sandbox.globalArgs,
      'list-tags', '--authfile', sandbox.authFile, '--tls-verify=false',
      ...(opts.creds !== undefined ? ['--creds', opts.creds] : []),
      ref
    ], { env: sandbox.env, timeoutMs: opts.timeoutMs ?? 60_000 })
    return (JSON.parse(stdout) as { Tags: string[] }).Tags
  } finally {
    await sandbox.cleanup()
  }
}
