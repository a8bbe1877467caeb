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
    '# the server below stays the fallback. Written by `damselfly config containerd`.',
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

/** `<hostsDir>/<registry name>/hosts.toml`, never outside hostsDir. */
export function containerdHostsFile (hostsDir: string, registry: ClientRegistry, flag = '--registry'): string {
  return path.join(childPath(hostsDir, registry.name, flag), 'hosts.toml')
}
