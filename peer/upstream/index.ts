import { isIP } from 'node:net'
import { InvalidRegistryError, RegistryNotAllowedError } from '../../src/errors.ts'

/**
 * An origin registry, normalised. `origin` (scheme://host[:port]) is the
 * registry's identity for caches and the swarm; `host` is what containerd
 * would send as `ns`.
 */
export interface Upstream {
  readonly origin: string
  readonly scheme: 'http' | 'https'
  readonly host: string
}

export interface UpstreamInit {
  /** Used when a request names no registry (no header, no `ns`). */
  defaultRegistry: string
  /**
   * Registries by `ns` host, so `ns=127.0.0.1:5000` can mean plain http. Hosts
   * not listed are reached over https, as containerd itself would.
   */
  registries?: ReadonlyArray<string>
  /** When set, only these hosts may be used as upstream (guards against SSRF through the headers). */
  allowedHosts?: ReadonlyArray<string> | undefined
}

/** Docker Hub's names for itself; all mean the registry API host. */
const DOCKER_HUB_ALIASES = new Set(['docker.io', 'index.docker.io', 'registry-1.docker.io', 'registry.hub.docker.com'])
const DOCKER_HUB_API = 'registry-1.docker.io'

export interface UpstreamSelector {
  readonly default: Upstream
  /** First match wins: `X-Dragonfly-Registry`, then `ns`, then the default. */
  select: (header: string | undefined, ns: string | undefined) => Upstream
  /** Parses a full registry URL (header or configuration). */
  parseUrl: (value: string) => Upstream
  /** Resolves a bare host (containerd's `ns`). */
  fromHost: (host: string) => Upstream
  /** The configured registry for host[:port] (default or `registries`), if any. */
  known: (host: string) => Upstream | undefined
}

export function createUpstreamSelector (init: UpstreamInit): UpstreamSelector {
  const known = new Map<string, Upstream>()
  const allowed = init.allowedHosts === undefined ? undefined : new Set(init.allowedHosts.map(h => canonicalHost(h.toLowerCase())))

  const check = (upstream: Upstream): Upstream => {
    if (allowed !== undefined && !allowed.has(upstream.host)) throw new RegistryNotAllowedError(upstream.host)
    return upstream
  }

  const parseUrl = (value: string): Upstream => check(parseRegistryUrl(value))

  const fromHost = (raw: string): Upstream => {
    const host = canonicalHost(validateHost(raw.trim().toLowerCase(), raw))
    return check(known.get(host) ?? makeUpstream('https', host))
  }

  for (const r of init.registries ?? []) {
    const upstream = parseRegistryUrl(r)
    known.set(upstream.host, upstream)
  }
  const defaultUpstream = parseRegistryUrl(init.defaultRegistry)
  known.set(defaultUpstream.host, defaultUpstream)

  return {
    default: defaultUpstream,
    parseUrl,
    known: (host) => known.get(canonicalHost(host.trim().toLowerCase())),
    fromHost,
    select (header, ns) {
      if (header !== undefined && header.trim() !== '') return parseUrl(header)
      if (ns !== undefined && ns.trim() !== '') return fromHost(ns)
      return check(defaultUpstream)
    }
  }
}

/** `scheme://host[:port]` with an optional trailing slash, nothing else. */
export function parseRegistryUrl (value: string): Upstream {
  const trimmed = value.trim()
  if (trimmed.length > 512) throw new InvalidRegistryError(trimmed, 'too long')
  const m = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\/([^/?#]*)\/?$/.exec(trimmed)
  if (m === null) {
    if (/^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//.test(trimmed)) throw new InvalidRegistryError(trimmed, 'expected scheme://host[:port] with no path, query or fragment')
    throw new InvalidRegistryError(trimmed, 'expected a URL with an http or https scheme')
  }
  const scheme = (m[1] as string).toLowerCase()
  if (scheme !== 'http' && scheme !== 'https') throw new InvalidRegistryError(trimmed, `scheme ${JSON.stringify(scheme)} is not http or https`)
  const authority = m[2] as string
  if (authority.includes('@')) throw new InvalidRegistryError(trimmed, 'credentials in the URL are not accepted')
  const host = canonicalHost(validateHost(authority.toLowerCase(), trimmed))
  return makeUpstream(scheme, host)
}

function makeUpstream (scheme: 'http' | 'https', host: string): Upstream {
  const defaultPort = scheme === 'https' ? ':443' : ':80'
  const h = host.endsWith(defaultPort) ? host.slice(0, -defaultPort.length) : host
  return { origin: `${scheme}://${h}`, scheme, host: h }
}

/** Docker Hub's aliases made one host; every other host as it is. */
export function canonicalHost (host: string): string {
  return DOCKER_HUB_ALIASES.has(host) ? DOCKER_HUB_API : host
}

/** host | host:port | [ipv6] | [ipv6]:port, with RFC 1123 labels. */
function validateHost (authority: string, original: string): string {
  let hostname = authority
  let port: string | undefined
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']')
    if (close === -1) throw new InvalidRegistryError(original, 'unterminated IPv6 literal')
    hostname = authority.slice(1, close)
    const rest = authority.slice(close + 1)
    if (rest !== '') {
      if (!rest.startsWith(':')) throw new InvalidRegistryError(original, 'malformed host')
      port = rest.slice(1)
    }
    if (isIP(hostname) !== 6) throw new InvalidRegistryError(original, 'malformed IPv6 address')
  } else {
    const colon = authority.lastIndexOf(':')
    if (colon !== -1) {
      hostname = authority.slice(0, colon)
      port = authority.slice(colon + 1)
    }
    if (hostname.length === 0 || hostname.length > 253) throw new InvalidRegistryError(original, 'malformed host')
    if (isIP(hostname) === 0 && !hostname.split('.').every(label => /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/.test(label))) {
      throw new InvalidRegistryError(original, 'malformed host')
    }
  }
  if (port !== undefined) {
    const n = Number(port)
    if (!/^\d{1,5}$/.test(port) || n < 1 || n > 65535) throw new InvalidRegistryError(original, 'port must be 1-65535')
  }
  return authority
}
