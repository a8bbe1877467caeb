import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import { request } from 'undici'
import { parse as parseYaml } from 'yaml'
import type { BuiltImage } from '../test/helpers/image.ts'
import { waitFor, type Spawned } from '../test/helpers/process.ts'

export const MIB = 1024 * 1024

/** One row of the results table: a measured ratio and the target it is held to. */
export interface Row {
  scenario: string
  metric: string
  value: number
  /** How the value reads: 'x' (a ratio), 'MiB/s', 'MiB', 'ms', 'req/s'. */
  unit: string
  /** The target, when the issue sets one. */
  target?: { op: '<=' | '>=', value: number } | undefined
  /** Figures behind the ratio, for the JSON file. */
  detail?: Record<string, unknown> | undefined
}

export interface Scenario {
  name: string
  run: (options: { quick: boolean, log: (line: string) => void }) => Promise<Row[]>
}

export function pass (row: Row): 'pass' | 'miss' | '' {
  if (row.target === undefined) return ''
  return (row.target.op === '<=' ? row.value <= row.target.value : row.value >= row.target.value) ? 'pass' : 'miss'
}

/**
 * A containerd-style pull through a mirror: the manifest by tag, then every
 * blob by digest (three at a time, as containerd does), each hashed as it
 * streams. Throws on a bad status or a digest mismatch.
 */
export async function pullImage (mirror: string, nsHost: string, repo: string, image: BuiltImage): Promise<number> {
  const started = performance.now()
  const ns = `ns=${encodeURIComponent(nsHost)}`
  const res = await request(`${mirror}/v2/${repo}/manifests/${image.tag}?${ns}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })
  await res.body.dump()
  if (res.statusCode !== 200) throw new Error(`manifest from ${mirror}: ${res.statusCode}`)
  const queue = [image.config, ...image.layers]
  await Promise.all([0, 1, 2].map(async () => {
    for (let b = queue.shift(); b !== undefined; b = queue.shift()) await fetchVerified(`${mirror}/v2/${repo}/blobs/${b.digest}?${ns}`, b.digest)
  }))
  return performance.now() - started
}

export async function fetchVerified (url: string, digest: string, headers: Record<string, string> = {}): Promise<number> {
  const r = await request(url, { headers })
  const hash = createHash('sha256')
  let bytes = 0
  for await (const chunk of r.body) {
    hash.update(chunk as Buffer)
    bytes += (chunk as Buffer).length
  }
  if (r.statusCode !== 200) throw new Error(`${url}: ${r.statusCode}`)
  if (`sha256:${hash.digest('hex')}` !== digest) throw new Error(`${url}: bytes do not match ${digest}`)
  return bytes
}

export function percentile (values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b)
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] as number
}

export function round (n: number, digits = 3): number {
  const f = 10 ** digits
  return Math.round(n * f) / f
}

/**
 * The environment deploy/ runs a peer with (the image's malloc tuning, the
 * DaemonSet's NODE_OPTIONS), so the bench measures the peer as deployed.
 */
export function deployedPeerEnv (): Record<string, string> {
  const root = new URL('../deploy/', import.meta.url)
  const env: Record<string, string> = {}
  const dockerfile = readFileSync(new URL('Dockerfile', root), 'utf8')
  for (const [, name, value] of dockerfile.matchAll(/\b(MALLOC_[A-Z_]+)=(\d+)/g)) env[name as string] = value as string
  const daemonSet = parseYaml(readFileSync(new URL('kubernetes/base/peer-daemonset.yaml', root), 'utf8')) as { spec: { template: { spec: { containers: Array<{ name: string, env?: Array<{ name: string, value?: string }> }> } } } }
  const peer = daemonSet.spec.template.spec.containers.find(c => c.name === 'peer')
  const options = peer?.env?.find(e => e.name === 'NODE_OPTIONS')?.value
  if (options !== undefined) env.NODE_OPTIONS = options
  return env
}

/** The port a bench server prints as `{"port":N}` on its first line. */
export async function portOf (server: Spawned, what: string): Promise<number> {
  let port = 0
  await waitFor(async () => {
    const m = /"port":(\d+)/.exec(server.output())
    if (m !== null) port = Number(m[1])
    return port > 0
  }, { timeoutMs: 30_000, what })
  return port
}
