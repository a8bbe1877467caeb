import type { ClientRegistry, Endpoint } from './registry.ts'

// Field names follow the upstream definitions:
// - nydusd's registry backend and its `mirrors` entries: dragonflyoss/nydus
//   api/src/config.rs (`RegistryConfig`, `MirrorConfig`; `mirrors` exists in
//   v2.1.0–v2.3.4 and is ignored as an unknown key from v2.3.5 on; `auth_through`
//   only means something before v2.2.3).
// - the snapshotter's mirror files: containerd/nydus-snapshotter
//   config/daemonconfig/mirrors.go (`HostFileConfig`: containerd's hosts.toml
//   keys plus `ping_url`, `health_check_interval`, `failure_limit`), read from
//   `[remote.mirrors_config] dir` as `<dir>/<host>/hosts.toml`.

export interface NydusInit {
  registry: ClientRegistry
  mirror: Endpoint
  /** Seconds between pings of a mirror that failed. Default 5 (nydusd's own default). */
  healthCheckInterval?: number
  /** Failures in a row before nydusd bypasses the mirror. Default 5. */
  failureLimit?: number
}

/**
 * nydus-snapshotter looks Docker Hub images up as `index.docker.io`
 * (config/daemonconfig/daemonconfig.go, SupplementDaemonConfig), and nydusd
 * connects to that host.
 */
export function nydusRegistryHost (registry: ClientRegistry): string {
  return registry.dockerHub ? 'index.docker.io' : registry.name
}

function origin (registry: ClientRegistry): string {
  return registry.dockerHub ? 'https://index.docker.io' : registry.server
}

/** A nydusd configuration (FUSE, `--config`) whose registry backend reads through the peer. */
export function renderNydusdConfig (init: NydusInit): string {
  const { registry, mirror } = init
  const config = {
    device: {
      backend: {
        type: 'registry',
        config: {
          scheme: registry.scheme,
          host: nydusRegistryHost(registry),
          skip_verify: false,
          timeout: 10,
          connect_timeout: 10,
          retry_limit: 2,
          mirrors: [{
            host: mirror.url,
            // Kept for nydusd before v2.2.3: false sends requests without a token straight to the origin.
            auth_through: false,
            headers: { 'X-Dragonfly-Registry': origin(registry) },
            ping_url: `${mirror.url}/healthy`,
            health_check_interval: init.healthCheckInterval ?? 5,
            failure_limit: init.failureLimit ?? 5
          }]
        }
      },
      cache: { type: 'blobcache', config: { work_dir: '/var/lib/nydus/cache' } }
    },
    mode: 'direct',
    digest_validate: false,
    iostats_files: false,
    enable_xattr: true
  }
  return `${JSON.stringify(config, null, 2)}\n`
}

/** `<mirrors_config.dir>/<host>/hosts.toml` for nydus-snapshotter. */
export function renderSnapshotterHostsToml (init: NydusInit): string {
  const { registry, mirror } = init
  const q = (s: string): string => JSON.stringify(s)
  const host = `host.${q(mirror.url)}`
  return [
    `# nydus-snapshotter mirror for ${nydusRegistryHost(registry)}: the damselfly peer at ${mirror.url}.`,
    '# Written by `damselfly config nydusd --snapshotter`.',
    `[${host}]`,
    // The snapshotter picks the first mirror whose ping answers 2xx within 3 s.
    `  ping_url = ${q(`${mirror.url}/healthy`)}`,
    `  health_check_interval = ${init.healthCheckInterval ?? 5}`,
    `  failure_limit = ${init.failureLimit ?? 5}`,
    '',
    `[${host}.header]`,
    `  X-Dragonfly-Registry = [${q(origin(registry))}]`,
    ''
  ].join('\n')
}
