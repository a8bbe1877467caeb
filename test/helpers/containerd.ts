import { mkdir, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { run, runRaw, spawnProcess, waitFor } from './process.ts'
import type { Spawned } from './process.ts'
import { tmpDir } from './tmp.ts'

export const CONTAINERD_NAMESPACE = 'damselfly-test'

export interface FetchOptions {
  /** A --hosts-dir holding <registry host>/hosts.toml (see writeHostsToml). */
  hostsDir: string
  /** user:pass for the registry (ctr --user). */
  user?: string
  /** e.g. linux/arm64; default: the host's platform. */
  platform?: string
  allPlatforms?: boolean
  /** Also pass --plain-http (only matters for hosts without a hosts.toml; hosts.toml URLs carry their scheme). */
  plainHttp?: boolean
  timeoutMs?: number
}

export interface TestContainerd {
  /** Path of the containerd gRPC socket. */
  address: string
  /** `ctr content fetch` of `ref` (e.g. 127.0.0.1:5000/team/app:v1) through the hosts.toml in `hostsDir`. */
  fetch(ref: string, opts: FetchOptions): Promise<{ stdout: string, stderr: string }>
  /** The bytes of one blob in the content store. */
  readContent(digest: string): Promise<Buffer>
  /** Digests of everything in the content store (of the test namespace). */
  listContent(): Promise<string[]>
  /** Deletes every image and all content of the namespace, so the next fetch downloads again. */
  removeAll(): Promise<void>
  /** Any ctr subcommand against this instance (the namespace is set). */
  ctr(args: string[], opts?: { timeoutMs?: number }): Promise<{ stdout: string, stderr: string }>
  /** Stops containerd and removes its directories. */
  close(): Promise<void>
}

// What containerd 1.6.20 (`ctr content fetch --hosts-dir`) sends to a mirror,
// observed with a logging HTTP proxy as the only [host] of a registry at
// 127.0.0.1:R (hosts.toml `server = "http://127.0.0.1:R"`, mirror with
// capabilities ["pull", "resolve"]):
//
// - No ping: `/v2/` is never requested, neither on the mirror nor on the server.
// - Every request to the mirror carries `?ns=127.0.0.1%3AR`: the registry host of
//   the image reference, port included, URL-encoded. The path is the plain
//   repository (`/v2/team/app/...`), no registry prefix. Requests to the server
//   itself carry no ns.
// - 1. `HEAD /v2/team/app/manifests/v1?ns=…` with
//      `User-Agent: containerd/1.6.20~ds1` and `Accept:
//      application/vnd.docker.distribution.manifest.v2+json,
//      application/vnd.docker.distribution.manifest.list.v2+json,
//      application/vnd.oci.image.manifest.v1+json,
//      application/vnd.oci.image.index.v1+json, */*` (no Accept-Encoding).
//      The digest comes from the answer's Docker-Content-Digest header.
//   2. `GET /v2/team/app/manifests/sha256:<manifest>?ns=…` (by digest),
//      `Accept: application/vnd.oci.image.manifest.v1+json, */*` (the
//      descriptor's media type), `Accept-Encoding: gzip`.
//   3. `GET /v2/team/app/blobs/sha256:<digest>?ns=…` for the layers and the
//      config, concurrently, `Accept: <media type>, */*`, `Accept-Encoding: gzip`.
//   For an index with --all-platforms: the index, then every platform manifest,
//   then the blobs, all by digest.
// - With capabilities ["pull"] only, the tag HEAD goes to the server and the
//   mirror gets only the by-digest manifest and blob GETs.
// - Fallback, per request: connection refused, 404 or 5xx from the mirror make
//   containerd try the next host and finally the server ("trying next host").
//   A 500 on the HEAD is not retried as a GET on the same mirror; the later
//   by-digest requests still go to the mirror first.
// - Auth: the first request of each kind goes out without Authorization. On a
//   401 with `WWW-Authenticate: Basic realm=…` it is repeated with
//   `Authorization: Basic base64(--user)`: the HEAD and the manifest GET each
//   got a 401 and a retry, the blob GETs then carried Basic straight away.
//   ctr's --user is handed to every host, mirrors included. Without --user a
//   401 from the mirror is final: the fetch fails ("pulling from host
//   127.0.0.1:M failed with status code [manifests v1]: 401 Unauthorized")
//   and does not fall through to the server.
// - The hosts dir may be named `127.0.0.1:R` (written here) or `127.0.0.1_R_`
//   (looked up first). A hosts.toml without any `host` table is rejected
//   ("invalid `host` tree") and containerd silently uses its defaults.
//
// harness.test.ts re-checks the headline facts (no ping, ns on every request).

function configToml (dir: string): string {
  const q = (s: string): string => JSON.stringify(s)
  return [
    'version = 2',
    `root = ${q(path.join(dir, 'root'))}`,
    `state = ${q(path.join(dir, 'state'))}`,
    // Only content, metadata and image services are needed to fetch; the rest
    // wants kernel features, cgroups or host paths (the opt plugin writes /opt/containerd).
    'disabled_plugins = [',
    ...[
      'io.containerd.grpc.v1.cri',
      'io.containerd.internal.v1.opt',
      'io.containerd.internal.v1.tracing',
      'io.containerd.tracing.processor.v1.otlp',
      'io.containerd.internal.v1.restart',
      'io.containerd.snapshotter.v1.btrfs',
      'io.containerd.snapshotter.v1.zfs',
      'io.containerd.snapshotter.v1.aufs',
      'io.containerd.snapshotter.v1.devmapper',
      'io.containerd.snapshotter.v1.overlayfs',
      'io.containerd.runtime.v1.linux',
      'io.containerd.runtime.v2.task',
      'io.containerd.monitor.v1.cgroups',
      'io.containerd.service.v1.tasks-service',
      'io.containerd.grpc.v1.tasks'
    ].map((p) => `  ${q(p)},`),
    ']',
    '[grpc]',
    `  address = ${q(path.join(dir, 'containerd.sock'))}`,
    '[ttrpc]',
    `  address = ${q(path.join(dir, 'containerd.sock.ttrpc'))}`,
    '[debug]',
    '  address = ""',
    '  level = "warn"',
    '[metrics]',
    '  address = ""',
    ''
  ].join('\n')
}

/** Starts a private containerd (needs root) with its own root, state and socket in a temp dir. */
export async function startContainerd (): Promise<TestContainerd> {
  if (process.getuid?.() !== 0) throw new Error('startContainerd needs root')
  const tmp = await tmpDir('damselfly-containerd')
  const address = path.join(tmp.path, 'containerd.sock')
  const configFile = path.join(tmp.path, 'config.toml')
  let proc: Spawned | undefined
  const ctr = async (args: string[], opts: { timeoutMs?: number } = {}): Promise<{ stdout: string, stderr: string }> =>
    run('ctr', ['--address', address, '--namespace', CONTAINERD_NAMESPACE, ...args], { timeoutMs: opts.timeoutMs ?? 60_000 })
  const close = async (): Promise<void> => {
    await proc?.stop()
    proc = undefined
    await tmp.cleanup()
  }
  try {
    await writeFile(configFile, configToml(tmp.path))
    const p = spawnProcess('containerd', ['--config', configFile])
    proc = p
    let exited: number | null | undefined
    void p.exited.then((code) => { exited = code })
    try {
      await waitFor(async () => {
        await run('ctr', ['--address', address, 'version'], { timeoutMs: 5000 })
        return true
      }, {
        timeoutMs: 20_000,
        intervalMs: 100,
        what: 'containerd to answer `ctr version`',
        giveUpIf: () => exited !== undefined ? `containerd exited with ${exited}` : undefined
      })
    } catch (e) {
      throw new Error(`${(e as Error).message}\n--- containerd output ---\n${p.output()}`, { cause: e })
    }
  } catch (e) {
    await close()
    throw e
  }

  return {
    address,
    ctr,
    async fetch (ref, opts) {
      const args = ['content', 'fetch', '--hosts-dir', opts.hostsDir]
      if (opts.user !== undefined) args.push('--user', opts.user)
      if (opts.plainHttp === true) args.push('--plain-http')
      if (opts.allPlatforms === true) args.push('--all-platforms')
      else if (opts.platform !== undefined) args.push('--platform', opts.platform)
      args.push(ref)
      return ctr(args, { timeoutMs: opts.timeoutMs ?? 120_000 })
    },
    async readContent (digest) {
      const { stdout } = await runRaw('ctr', ['--address', address, '--namespace', CONTAINERD_NAMESPACE, 'content', 'get', digest], { timeoutMs: 60_000 })
      return stdout
    },
    async listContent () {
      const { stdout } = await ctr(['content', 'ls', '--quiet'])
      return stdout.split('\n').map((l) => l.trim()).filter((l) => l !== '')
    },
    async removeAll () {
      const images = (await ctr(['images', 'ls', '--quiet'])).stdout.split('\n').map((l) => l.trim()).filter((l) => l !== '')
      if (images.length > 0) await ctr(['images', 'rm', '--sync', ...images])
      const left = (await ctr(['content', 'ls', '--quiet'])).stdout.split('\n').map((l) => l.trim()).filter((l) => l !== '')
      if (left.length > 0) await ctr(['content', 'rm', ...left])
    },
    close
  }
}

/**
 * Writes `<hostsDir>/<registryHost>/hosts.toml`: the mirrors in order (each
 * with pull and resolve), then `server` as the fallback. containerd 1.6 looks
 * for `host_port_` first and then `host:port`; the latter is what is written.
 */
export async function writeHostsToml (hostsDir: string, registryHost: string, opts: { server: string, mirrors: string[], skipVerify?: boolean }): Promise<void> {
  const q = (s: string): string => JSON.stringify(s)
  // Top-level keys configure the server itself (the fallback after the mirrors).
  const lines = [`server = ${q(opts.server)}`]
  if (opts.skipVerify === true) lines.push('skip_verify = true')
  lines.push('')
  // containerd 1.6 rejects a hosts.toml without a `host` table ("invalid `host` tree")
  // and then silently falls back to its defaults: an empty one keeps the file valid.
  if (opts.mirrors.length === 0) lines.push('[host]', '')
  for (const mirror of opts.mirrors) {
    lines.push(`[host.${q(mirror)}]`, '  capabilities = ["pull", "resolve"]')
    if (opts.skipVerify === true) lines.push('  skip_verify = true')
    lines.push('')
  }
  const dir = path.join(hostsDir, registryHost)
  await mkdir(dir, { recursive: true })
  await writeFile(path.join(dir, 'hosts.toml'), lines.join('\n'))
}
