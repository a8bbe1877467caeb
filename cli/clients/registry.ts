import { isIP } from 'node:net'
import { ConfigError } from '../../src/errors.ts'
import { DOCKER_HUB_API_HOST, isDockerHub, parseHost, withoutDefaultPort } from '../../src/oci/hosts.ts'

/**
 * A registry as a client configuration names it. Clients key their settings
 * by the host written in image references (`docker.io`), while the registry
 * API may answer elsewhere (`https://registry-1.docker.io`).
 */
export interface ClientRegistry {
  /** host[:port] as image references write it, lowercase; Docker Hub is `docker.io`. */
  readonly name: string
  /** scheme://host[:port] of the registry API. */
  readonly server: string
  readonly scheme: 'http' | 'https'
  readonly dockerHub: boolean
}

/** A mirror endpoint: the peer, as clients reach it. */
export interface Endpoint {
  /** scheme://host[:port], no trailing slash. */
  readonly url: string
  readonly scheme: 'http' | 'https'
  /** host[:port] */
  readonly host: string
  /** The hostname alone (IPv6 without brackets). */
  readonly hostname: string
}

export const DOCKER_HUB_SERVER = `https://${DOCKER_HUB_API_HOST}`

/**
 * `host[:port]` (https) or `http(s)://host[:port]`. Everything else is refused
 * with the flag's name: the result names directories and goes into files, so
 * a path, a query or `..` must never get through.
 */
export function parseClientRegistry (value: string, flag = '--registry'): ClientRegistry {
  const { scheme, host } = parseAuthority(value, flag, 'https')
  if (isDockerHub(host)) return { name: 'docker.io', server: DOCKER_HUB_SERVER, scheme: 'https', dockerHub: true }
  return { name: host, server: `${scheme}://${host}`, scheme, dockerHub: false }
}

/** A mirror address; `defaultScheme` applies when none is written. */
export function parseEndpoint (value: string, flag: string, defaultScheme: 'http' | 'https' = 'http'): Endpoint {
  const { scheme, host, hostname } = parseAuthority(value, flag, defaultScheme)
  return { url: `${scheme}://${host}`, scheme, host, hostname }
}

/** Loopback addresses: a plain-http peer there needs no TLS to be trusted. */
export function isLoopback (hostname: string): boolean {
  if (hostname === 'localhost') return true
  if (isIP(hostname) === 4) return hostname.startsWith('127.')
  return hostname === '::1'
}

function parseAuthority (raw: string, flag: string, defaultScheme: 'http' | 'https'): { scheme: 'http' | 'https', host: string, hostname: string } {
  const fail = (why: string): never => {
    throw new ConfigError(flag, `${JSON.stringify(raw.length > 80 ? `${raw.slice(0, 80)}…` : raw)} is not host[:port] or http(s)://host[:port]: ${why}`)
  }
  const value = raw.trim()
  if (value === '') fail('empty')
  if (value.length > 300) fail('too long')
  let scheme = defaultScheme
  let rest = value
  const m = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\/(.*)$/.exec(value)
  if (m !== null) {
    const s = (m[1] as string).toLowerCase()
    if (s !== 'http' && s !== 'https') fail(`scheme ${JSON.stringify(s)} is not http or https`)
    scheme = s as 'http' | 'https'
    rest = (m[2] as string).replace(/\/$/, '')
  }
  if (/[/\\?#]/.test(rest)) fail('a registry is a host, without a path, query or fragment')
  if (rest.includes('@')) fail('credentials do not belong in the address')
  const authority = rest.toLowerCase()
  const { hostname } = parseHost(authority, fail)
  return { scheme, host: withoutDefaultPort(scheme, authority), hostname }
}
