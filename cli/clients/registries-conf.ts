import { isLoopback, type ClientRegistry, type Endpoint } from './registry.ts'

export interface RegistriesConfEntry {
  registry: ClientRegistry
  /** The peer for this registry (host[:port]; a scheme only decides `insecure`). */
  mirror: Endpoint
}

/**
 * A containers-registries.conf (v2) fragment, for /etc/containers/registries.conf.d/
 * or skopeo's --registries-conf: pulls of each registry try its mirror first
 * and the registry itself after.
 *
 * skopeo, podman and CRI-O send the mirror neither a header nor `ns`, so a
 * peer port serves one registry only: the peer's `--registry`, or the one a
 * `--mirrors PORT=URL` listener is bound to.
 */
export function renderRegistriesConf (entries: RegistriesConfEntry[], options: { insecureMirror?: boolean } = {}): string {
  const q = (s: string): string => JSON.stringify(s)
  const lines = [
    '# Written by `damselfly config registries-conf`.',
    '# Private images: containers/image never sends a registry\'s credentials to its',
    '# mirror; give the mirror host its own entry in auth.json (same user and password).',
    ''
  ]
  for (const { registry, mirror } of entries) {
    // A plain-http peer on loopback is the normal case; anything else plain-http must be asked for.
    const insecureMirror = options.insecureMirror === true || (mirror.scheme === 'http' && isLoopback(mirror.hostname))
    lines.push(
      '[[registry]]',
      `prefix = ${q(registry.name)}`,
      `location = ${q(registry.dockerHub ? 'docker.io' : registry.name)}`
    )
    if (registry.scheme === 'http') lines.push('insecure = true')
    lines.push(
      '',
      '[[registry.mirror]]',
      `location = ${q(mirror.host)}`
    )
    if (insecureMirror) lines.push('insecure = true')
    lines.push('')
  }
  return lines.join('\n')
}
