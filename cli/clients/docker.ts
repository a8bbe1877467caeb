import { isDeepStrictEqual } from 'node:util'
import { ConfigError } from '../../src/errors.ts'
import type { Endpoint } from './registry.ts'

/**
 * Docker's daemon.json with the peer first in `registry-mirrors`, every other
 * key and mirror kept. Docker consults mirrors for Docker Hub only, and sends
 * them no registry name: the peer (or the `--mirrors` port) it talks to must
 * have Docker Hub as its registry.
 *
 * Returns the existing text untouched when nothing would change, so the
 * caller's write is a no-op however the file was formatted.
 */
export function mergeDaemonJson (existing: string | undefined, mirror: Endpoint, flag = '--daemon-json'): string {
  let current: Record<string, unknown> = {}
  if (existing !== undefined && existing.trim() !== '') {
    let parsed: unknown
    try {
      parsed = JSON.parse(existing)
    } catch (err) {
      throw new ConfigError(flag, `the file is not valid JSON (${(err as Error).message}); fix or remove it first`)
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw new ConfigError(flag, 'the file must hold a JSON object')
    current = parsed as Record<string, unknown>
  }
  const mirrors = current['registry-mirrors']
  if (mirrors !== undefined && (!Array.isArray(mirrors) || !mirrors.every(m => typeof m === 'string'))) {
    throw new ConfigError(flag, '"registry-mirrors" must be an array of URLs')
  }
  const others = ((mirrors ?? []) as string[]).filter(m => m.replace(/\/+$/, '') !== mirror.url)
  const next = { ...current, 'registry-mirrors': [mirror.url, ...others] }
  if (existing !== undefined && isDeepStrictEqual(next, current)) return existing
  return `${JSON.stringify(next, null, 2)}\n`
}
