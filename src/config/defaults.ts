/**
 * Defaults that both the configuration schema and the components it
 * configures need, written once. Sizes as the schema shows them; components
 * read them in bytes through `bytes()`.
 */
export const DEFAULTS = {
  /** Byte quota of the piece cache. */
  cacheSize: '10GiB',
  /** Verified pieces kept in memory (the latest written and read). */
  memoryCacheSize: '32MiB',
  /**
   * Pieces a peer sends to other peers at once; more requests are answered
   * busy. Few, so that each piece leaves fast enough to be passed on: with
   * 32 a 1 MiB piece took a 100 MiB/s uplink 320 ms, and children queued
   * behind the parents everyone picked (fleet simulation in the README).
   */
  uploadConcurrency: 8,
  /** Upload-port connections in all (idle keep-alive ones from many children among them). */
  uploadConnections: 1024,
  /** Upload-port connections one address may hold. */
  uploadConnectionsPerAddress: 256
} as const

const UNITS: Record<string, number> = { KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3 }

/** `DEFAULTS` sizes in bytes. */
export function bytes (size: `${number}${'KiB' | 'MiB' | 'GiB'}`): number {
  const m = /^(\d+)(KiB|MiB|GiB)$/.exec(size) as RegExpExecArray
  return Number(m[1]) * (UNITS[m[2] as string] as number)
}
