import { lookup as dnsLookup } from 'node:dns/promises'
import { raceSignal, withDeadline, type AbortOptions } from '../../src/abort.ts'
import { ConfigError, SchedulerUnavailableError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { ipMultiaddr, parseDialAddress, type DialAddress } from '../../src/p2p/address.ts'

/** Every address a name resolves to, as node:dns `lookup(name, { all: true, family })` answers. */
export type ResolveAll = (host: string, family: 0 | 4 | 6) => Promise<Array<{ address: string, family: number }>>

export interface SchedulerTargetsComponents {
  logger: Logger
  /** Name resolution. Default: node:dns `lookup` (the system resolver, /etc/hosts included). */
  resolve?: ResolveAll
  /** A number in [0, 1), to pick the first scheduler. Default `Math.random`. */
  random?: () => number
}

export interface SchedulerTargetsInit {
  /** Scheduler addresses as configured: `host:port` or a multiaddr each. */
  addresses: string[]
  /** Deadline of one name's resolution. Default 5 s. */
  resolveTimeoutMs?: number
}

export interface SchedulerTargets {
  /**
   * Resolves every configured address again and names the one to dial next:
   * a random one the first time (so that peers spread over the replicas),
   * then the one after the last named. `count` is how many there were, so
   * that the caller knows when every one of them has been tried. Throws
   * `SchedulerUnavailableError` when no address resolved.
   */
  next: (options?: AbortOptions) => Promise<{ address: string, count: number }>
}

/**
 * The schedulers a peer may join. Names are resolved at every call, not once
 * at start: the replicas behind a Kubernetes headless Service change as pods
 * are replaced, and a peer whose scheduler went must find the ones up now.
 */
export function createSchedulerTargets (components: SchedulerTargetsComponents, init: SchedulerTargetsInit): SchedulerTargets {
  const logger = components.logger
  const resolveAll = components.resolve ?? (async (host, family) => dnsLookup(host, { all: true, family }))
  const random = components.random ?? Math.random
  const resolveTimeoutMs = init.resolveTimeoutMs ?? 5_000
  if (init.addresses.length === 0) throw new ConfigError('scheduler', 'no scheduler address')
  const entries = init.addresses.map((text): DialAddress => {
    const parsed = parseDialAddress(text)
    if ('problem' in parsed) throw new ConfigError('scheduler', `${JSON.stringify(text)}: ${parsed.problem}`)
    return parsed.address
  })
  let last: { address: string, index: number } | undefined

  async function expand (entry: DialAddress, options: AbortOptions): Promise<string[]> {
    if (!entry.name) return [ipMultiaddr(entry.host, entry.family as 4 | 6, entry.port, entry.peerId)]
    try {
      // getaddrinfo cannot be cancelled: the deadline only stops the wait for it.
      const found = await raceSignal(resolveAll(entry.host, entry.family), withDeadline(options.signal, resolveTimeoutMs, `resolve ${entry.host}`))
      // Sorted: resolvers rotate their answers, and "the next one" must mean the same one each time.
      return found
        .filter(a => a.family === 4 || a.family === 6)
        .sort((a, b) => a.family - b.family || (a.address < b.address ? -1 : a.address > b.address ? 1 : 0))
        .map(a => ipMultiaddr(a.address, a.family as 4 | 6, entry.port, entry.peerId))
    } catch (err) {
      options.signal?.throwIfAborted()
      logger.debug({ host: entry.host, err: (err as Error).message }, 'cannot resolve a scheduler address')
      return []
    }
  }

  return {
    async next (options = {}) {
      options.signal?.throwIfAborted()
      const addresses = [...new Set((await Promise.all(entries.map(async e => expand(e, options)))).flat())]
      if (addresses.length === 0) throw new SchedulerUnavailableError(`no scheduler address resolved (${init.addresses.join(', ')})`)
      const found = last === undefined ? -1 : addresses.indexOf(last.address)
      // The last one is gone from the list (its pod was replaced): the one now at its place comes after it.
      const index = last === undefined
        ? Math.floor(random() * addresses.length) % addresses.length
        : found >= 0 ? (found + 1) % addresses.length : last.index % addresses.length
      const address = addresses[index] as string
      last = { address, index }
      return { address, count: addresses.length }
    }
  }
}
