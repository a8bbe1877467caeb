import { readFile } from 'node:fs/promises'
import type { FastifyInstance } from 'fastify'
import type { ByteCounts } from '../../src/protocol/messages.ts'
import type { SwarmState } from '../state/index.ts'

export interface SwarmPageOptions {
  state: SwarmState
}

/** Totals across the connected hosts, as `GET /api/v1/swarm` answers them. */
export interface SwarmSummary {
  hosts: number
  seeds: number
  tasks: number
  /** Hosts whose byte counts are in `bytes` (peers older than the counts send none). */
  reporting: number
  bytes: ByteCounts
  at: string
}

/**
 * The page is static: the HTML loads one script and one stylesheet from here
 * and everything on it comes from the JSON API, so nothing a peer sends is
 * ever part of markup. The policy allows nothing but this origin.
 */
const CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "connect-src 'self'",
  "img-src 'self'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'"
].join('; ')

const FILES = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/ui/app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  '/ui/style.css': { file: 'style.css', type: 'text/css; charset=utf-8' }
} as const

export function swarmSummary (state: SwarmState, now = Date.now()): SwarmSummary {
  const bytes: ByteCounts = { served: { local: 0, peer: 0, origin: 0 }, fetched: { peer: 0, origin: 0 }, uploaded: 0 }
  let seeds = 0
  let reporting = 0
  for (const host of state.hosts()) {
    if (host.info.seed) seeds++
    const b = host.bytes
    if (b === undefined) continue
    reporting++
    bytes.served.local += b.served.local
    bytes.served.peer += b.served.peer
    bytes.served.origin += b.served.origin
    bytes.fetched.peer += b.fetched.peer
    bytes.fetched.origin += b.fetched.origin
    bytes.uploaded += b.uploaded
  }
  return { hosts: state.hostCount, seeds, tasks: state.taskCount, reporting, bytes, at: new Date(now).toISOString() }
}

/**
 * The swarm status page (`GET /`, its script and stylesheet under `/ui/`) and
 * the summary it shows on top (`GET /api/v1/swarm`). The page polls the JSON
 * API about once a second; it holds no connection open between polls.
 */
export async function swarmPage (app: FastifyInstance, options: SwarmPageOptions): Promise<void> {
  const dir = new URL('../ui/', import.meta.url)
  for (const [url, { file, type }] of Object.entries(FILES)) {
    const body = await readFile(new URL(file, dir))
    app.get(url, async (_request, reply) => {
      return reply
        .header('content-type', type)
        .header('content-security-policy', CONTENT_SECURITY_POLICY)
        .header('x-content-type-options', 'nosniff')
        .header('referrer-policy', 'no-referrer')
        .header('cache-control', 'no-cache')
        .send(body)
    })
  }

  app.get('/api/v1/swarm', async () => swarmSummary(options.state))
}
