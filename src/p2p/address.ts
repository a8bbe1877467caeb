import { isIPv4, isIPv6 } from 'node:net'

/**
 * An address to dial as an operator writes it, taken apart: `host:port`,
 * `[IPv6]:port`, or a TCP multiaddr. A DNS name is kept as a name, so that
 * whoever dials can resolve it again each time (a Kubernetes headless
 * Service's name stands for whichever replicas are up now).
 */
export interface DialAddress {
  /** An IP literal (without brackets) or a DNS name. */
  host: string
  port: number
  /** Whether `host` is a DNS name to resolve. */
  name: boolean
  /** The family `host` is, or must resolve to (`/dns4`, `/dns6`); 0 for either. */
  family: 0 | 4 | 6
  /** The node's id from a `/p2p/` suffix: only that node is accepted there. */
  peerId?: string | undefined
}

/** The forms `parseDialAddress` accepts, in words (for error messages). */
export const DIAL_ADDRESS_FORMS = 'host:port, [IPv6]:port or a TCP multiaddr (/ip4, /ip6, /dns, /dns4 or /dns6, then /tcp/PORT, optionally /p2p/ID)'

const LABEL = '[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?'
const HOSTNAME = new RegExp(`^(?=.{1,253}$)${LABEL}(?:\\.${LABEL})*\\.?$`)
const MULTIADDR = /^\/(ip4|ip6|dns|dns4|dns6)\/([^/]+)\/tcp\/([^/]+)(?:\/p2p\/([^/]+))?\/?$/
const PEER_ID = /^[A-Za-z0-9]{1,128}$/

/** The address taken apart, or what is wrong with it. */
export function parseDialAddress (text: string): { address: DialAddress } | { problem: string } {
  const value = text.trim()
  if (value.startsWith('/')) return parseMultiaddr(value)
  if (value.includes('://')) return { problem: 'a URL; give host:port' }
  const bracketed = /^\[([^\]]*)\]:([^:]*)$/.exec(value)
  if (bracketed !== null) {
    const host = bracketed[1] as string
    if (!isIPv6(host)) return { problem: `${JSON.stringify(host)} in brackets is not an IPv6 address` }
    return withPort({ host, name: false, family: 6 }, bracketed[2] as string)
  }
  const colon = value.lastIndexOf(':')
  if (colon < 0) return { problem: 'no port' }
  const host = value.slice(0, colon)
  // "::1:8002" could be ::1 port 8002 or the address ::1:8002 with no port: make the writer say which.
  if (isIPv6(host)) return { problem: 'an IPv6 address with a port needs brackets, e.g. [::1]:8002' }
  return withHost(host, value.slice(colon + 1))
}

function parseMultiaddr (value: string): { address: DialAddress } | { problem: string } {
  const m = MULTIADDR.exec(value)
  if (m === null) return { problem: 'not a TCP multiaddr' }
  const [, proto, host, port, peerId] = m as unknown as [string, string, string, string, string | undefined]
  if (peerId !== undefined && !PEER_ID.test(peerId)) return { problem: `${JSON.stringify(peerId)} is not a peer id` }
  const extra = peerId === undefined ? {} : { peerId }
  if (proto === 'ip4') return isIPv4(host) ? withPort({ host, name: false, family: 4, ...extra }, port) : { problem: `${JSON.stringify(host)} is not an IPv4 address` }
  if (proto === 'ip6') return isIPv6(host) ? withPort({ host, name: false, family: 6, ...extra }, port) : { problem: `${JSON.stringify(host)} is not an IPv6 address` }
  if (!HOSTNAME.test(host)) return { problem: `${JSON.stringify(host)} is not a DNS name` }
  return withPort({ host, name: true, family: proto === 'dns4' ? 4 : proto === 'dns6' ? 6 : 0, ...extra }, port)
}

function withHost (host: string, port: string): { address: DialAddress } | { problem: string } {
  if (isIPv4(host)) return withPort({ host, name: false, family: 4 }, port)
  if (!HOSTNAME.test(host)) return { problem: `${JSON.stringify(host)} is neither an IP address nor a DNS name` }
  return withPort({ host, name: true, family: 0 }, port)
}

function withPort (address: Omit<DialAddress, 'port'>, port: string): { address: DialAddress } | { problem: string } {
  const n = /^\d{1,5}$/.test(port) ? Number(port) : NaN
  if (!(n >= 1 && n <= 65535)) return { problem: port === '' ? 'no port' : `port ${JSON.stringify(port)} is not from 1 to 65535` }
  return { address: { ...address, port: n } }
}

/** The multiaddr to dial an IP literal of an address at. */
export function ipMultiaddr (ip: string, family: 4 | 6, port: number, peerId?: string): string {
  return `/ip${family}/${ip}/tcp/${port}${peerId === undefined ? '' : `/p2p/${peerId}`}`
}
