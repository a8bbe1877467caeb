import { isIP } from 'node:net'

/** Docker Hub's names for itself: image references, clients and URLs use all of them for one registry. */
export const DOCKER_HUB_ALIASES: ReadonlySet<string> = new Set(['docker.io', 'index.docker.io', 'registry-1.docker.io', 'registry.hub.docker.com'])
/** Where Docker Hub's registry API answers. */
export const DOCKER_HUB_API_HOST = 'registry-1.docker.io'

const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/

export function isDockerHub (host: string): boolean {
  return DOCKER_HUB_ALIASES.has(host)
}

/** Docker Hub's aliases made one host; every other host as it is. */
export function canonicalHost (host: string): string {
  return isDockerHub(host) ? DOCKER_HUB_API_HOST : host
}

/**
 * Splits a lowercase `host`, `host:port`, `[ipv6]` or `[ipv6]:port`. The host
 * is an IP address or RFC 1123 labels and the port is 1-65535; anything else
 * goes to `fail` with the reason, so each caller throws its own error.
 */
export function parseHost (authority: string, fail: (why: string) => never): { hostname: string, port: number | undefined } {
  let hostname = authority
  let port: string | undefined
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']')
    if (close === -1) fail('unterminated IPv6 literal')
    hostname = authority.slice(1, close)
    const after = authority.slice(close + 1)
    if (after !== '') {
      if (!after.startsWith(':')) fail('malformed host')
      port = after.slice(1)
    }
    if (isIP(hostname) !== 6) fail('malformed IPv6 address')
  } else {
    const colon = authority.lastIndexOf(':')
    if (colon !== -1) {
      hostname = authority.slice(0, colon)
      port = authority.slice(colon + 1)
    }
    if (hostname === '' || hostname.length > 253) fail('malformed host')
    if (isIP(hostname) === 0 && !hostname.split('.').every(label => LABEL.test(label))) fail('malformed host name')
  }
  if (port !== undefined && (!/^\d{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535)) fail('port must be 1-65535')
  return { hostname, port: port === undefined ? undefined : Number(port) }
}

/** `host[:port]` without the scheme's default port. */
export function withoutDefaultPort (scheme: 'http' | 'https', host: string): string {
  const defaultPort = scheme === 'https' ? ':443' : ':80'
  return host.endsWith(defaultPort) ? host.slice(0, -defaultPort.length) : host
}
