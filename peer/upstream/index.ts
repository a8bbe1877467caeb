import { InvalidRegistryError, RegistryNotAllowedError } from '../../src/errors.ts'
import { canonicalHost, parseHost, withoutDefaultPort } from '../../src/oci/hosts.ts'

/**
 * An origin registry, normalised. `origin` (scheme://host[:port]) is the
 * registry's identity for caches and the swarm; `host` is what containerd
 * would send as `ns`.
 */
export interface Upstream {
  readonly origin: string
  readonly scheme: 'http' | 'https'
  readonly host: string
  /**
   * The operator configured this registry. Only a trusted registry's bytes
   * enter the cache and the swarm, and only a trusted registry's yes lets a
   * caller read what they hold. An untrusted one (allowed only with
   * `allowUnlistedRegistries`) is a pass-through: its bytes go from it to its
   * caller and nowhere else.
   */
  readonly trusted: boolean
}

export interface UpstreamInit {
  /** Used when a request names no registry (no header, no `ns`). Trusted. */
  defaultRegistry: string
  /**
   * Every other registry the operator configured (`registries`, the `mirrors`
   * listeners' registries, the proxy's intercepted hosts as https). Trusted;
   * also how `ns=127.0.0.1:5000` comes to mean plain http.
   */
  registries?: ReadonlyArray<string>
  /**
   * Let requests name registries nobody configured, served as pass-throughs
   * (see `Upstream.trusted`). Default false: such requests are refused.
   */
  allowUnlisted?: boolean
}

export interface UpstreamSelector {
  readonly default: Upstream
  /** Every configured registry. */
  readonly trusted: readonly Upstream[]
  /**
   * First match wins: `X-Dragonfly-Registry`, then `ns`, then the default.
   * Throws `RegistryNotAllowedError` for a registry nobody configured, unless
   * unlisted registries are allowed.
   */
  select: (header: string | undefined, ns: string | undefined) => Upstream
  /** A full registry URL (a header, or a scheduler command); same rules as `select`. */
  parseUrl: (value: string) => Upstream
  /** A configured registry named by URL; throws `RegistryNotAllowedError` for anything else, whatever `allowUnlisted` says. */
  requireTrusted: (value: string) => Upstream
  /** A bare host (containerd's `ns`); same rules as `select`. */
  fromHost: (host: string) => Upstream
  /** The configured registry for host[:port], if any. */
  known: (host: string) => Upstream | undefined
}

export function createUpstreamSelector (init: UpstreamInit): UpstreamSelector {
  const byHost = new Map<string, Upstream>()
  const trusted = (u: Upstream): Upstream => ({ ...u, trusted: true })
  const defaultUpstream = trusted(parseRegistryUrl(init.defaultRegistry))
  for (const r of init.registries ?? []) {
    const upstream = trusted(parseRegistryUrl(r))
    if (!byHost.has(upstream.host)) byHost.set(upstream.host, upstream)
  }
  byHost.set(defaultUpstream.host, defaultUpstream)
  const all = [...byHost.values()]

  /** Host and port must match a configured registry exactly, and so must the scheme. */
  const admit = (named: Upstream): Upstream => {
    const configured = byHost.get(named.host)
    if (configured !== undefined && configured.scheme === named.scheme) return configured
    if (init.allowUnlisted === true) return named
    throw new RegistryNotAllowedError(named.origin, all.map(u => u.origin))
  }

  const parseUrl = (value: string): Upstream => admit(parseRegistryUrl(value))

  const fromHost = (raw: string): Upstream => {
    const host = canonicalHost(validateHost(raw.trim().toLowerCase(), raw))
    // ns carries no scheme: a configured host keeps its own, others are https as containerd would use.
    return admit(byHost.get(host) ?? makeUpstream('https', host))
  }

  return {
    default: defaultUpstream,
    trusted: all,
    parseUrl,
    fromHost,
    requireTrusted (value) {
      const named = parseRegistryUrl(value)
      const configured = byHost.get(named.host)
      if (configured === undefined || configured.scheme !== named.scheme) throw new RegistryNotAllowedError(named.origin, all.map(u => u.origin))
      return configured
    },
    known: (host) => byHost.get(canonicalHost(host.trim().toLowerCase())),
    select (header, ns) {
      if (header !== undefined && header.trim() !== '') return parseUrl(header)
      if (ns !== undefined && ns.trim() !== '') return fromHost(ns)
      return defaultUpstream
    }
  }
}

/** `scheme://host[:port]` with an optional trailing slash, nothing else. Not yet admitted: `trusted` is false. */
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
  const h = withoutDefaultPort(scheme, host)
  return { origin: `${scheme}://${h}`, scheme, host: h, trusted: false }
}

/** host | host:port | [ipv6] | [ipv6]:port, with RFC 1123 labels. */
function validateHost (authority: string, original: string): string {
  parseHost(authority, (why) => { throw new InvalidRegistryError(original, why) })
  return authority
}
