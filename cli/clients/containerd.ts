import path from 'node:path'
import { childPath } from './files.ts'
import type { ClientRegistry, Endpoint } from './registry.ts'

/**
 * containerd's per-registry `hosts.toml` (config_path / `ctr --hosts-dir`):
 * the peer as the first host, the origin as `server`, tried when the peer
 * refuses the connection or answers 404/5xx.
 *
 * The peer learns the origin twice over: containerd 1.6 adds `?ns=<name>` to
 * every mirror request by itself (a bare host, so the peer would guess https),
 * and the `header` table sends `X-Dragonfly-Registry` with the full origin URL,
 * which the peer's upstream selector prefers and which keeps the scheme of a
 * plain-http registry.
 */
export function renderContainerdHostsToml (registry: ClientRegistry, mirror: Endpoint): string {
  const q = (s: string): string => JSON.stringify(s)
  const host = `host.${q(mirror.url)}`
  return [
    `# Pulls of ${registry.name} go through the damselfly peer at ${mirror.url};`,
    `# the server below stays the fallback. ${CONTAINERD_MARK}`,
    `server = ${q(registry.server)}`,
    '',
    `[${host}]`,
    '  capabilities = ["pull", "resolve"]',
    '',
    `[${host}.header]`,
    `  X-Dragonfly-Registry = [${q(registry.server)}]`,
    ''
  ].join('\n')
}

/** The mark every file this command writes carries: only such files are ever removed by it. */
export const CONTAINERD_MARK = 'Written by `damselfly config containerd`.'

/**
 * `_default/hosts.toml`: every registry without a directory of its own goes
 * through the peer. No `server` line, so containerd falls back to each
 * registry itself; no header either (one file serves every registry), so the
 * peer learns the registry from the `ns=` containerd adds, and uses the
 * scheme its registries list gives that host.
 */
export function renderContainerdDefaultHostsToml (mirror: Endpoint): string {
  const host = `host.${JSON.stringify(mirror.url)}`
  return [
    `# Pulls of every registry without its own hosts.toml go through the damselfly peer at ${mirror.url};`,
    `# containerd falls back to the registry itself. ${CONTAINERD_MARK}`,
    '',
    `[${host}]`,
    '  capabilities = ["pull", "resolve"]',
    ''
  ].join('\n')
}

/** `<hostsDir>/_default/hosts.toml`. */
export function containerdDefaultHostsFile (hostsDir: string): string {
  return path.join(hostsDir, '_default', 'hosts.toml')
}

/** `<hostsDir>/<registry name>/hosts.toml`, never outside hostsDir. */
export function containerdHostsFile (hostsDir: string, registry: ClientRegistry, flag = '--registry'): string {
  return path.join(childPath(hostsDir, registry.name, flag), 'hosts.toml')
}
