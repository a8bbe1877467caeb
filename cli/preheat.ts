import { setTimeout as delay } from 'node:timers/promises'
import { request } from 'undici'
import { DamselflyError } from '../src/errors.ts'

interface JobView {
  id: string
  status: 'PENDING' | 'RUNNING' | 'SUCCESS' | 'FAILURE'
  error?: string
  results?: Array<{ digest: string, size: number, status: string, error?: string }>
}

/**
 * Creates a preheat job through the scheduler's HTTP API and waits for it,
 * reporting progress lines. `token` is the scheduler's API token, when it has one.
 */
export async function preheat (base: string, body: { image: string, platform?: string | undefined, username?: string | undefined, password?: string | undefined }, timeoutMs: number, say: (line: string) => void, token?: string): Promise<JobView> {
  const deadline = Date.now() + timeoutMs
  const auth: Record<string, string> = token === undefined || token === '' ? {} : { authorization: `Bearer ${token}` }
  const created = await request(`${base}/api/v1/preheat`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...auth },
    body: JSON.stringify(Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined))),
    signal: AbortSignal.timeout(30_000)
  })
  const createdBody = await created.body.json() as JobView & { error?: string, message?: string }
  if (created.statusCode !== 202) throw new DamselflyError('DF_ERR_PREHEAT', `scheduler refused the job (${created.statusCode}): ${createdBody.error ?? createdBody.message ?? ''}`)
  say(`job ${createdBody.id} accepted`)
  let last = ''
  for (;;) {
    const res = await request(`${base}/api/v1/preheat/${createdBody.id}`, { headers: auth, signal: AbortSignal.timeout(30_000) })
    if (res.statusCode !== 200) throw new DamselflyError('DF_ERR_PREHEAT', `scheduler answered ${res.statusCode} for job ${createdBody.id}: ${(await res.body.text()).slice(0, 300)}`)
    const job = await res.body.json() as JobView
    if (job.status !== last) {
      say(`job ${job.id}: ${job.status}`)
      last = job.status
    }
    if (job.status === 'SUCCESS' || job.status === 'FAILURE') {
      for (const r of job.results ?? []) say(`  ${r.status.padEnd(8)} ${r.digest} ${r.size} bytes${r.error === undefined ? '' : ` (${r.error})`}`)
      if (job.error !== undefined) say(`error: ${job.error}`)
      return job
    }
    if (Date.now() > deadline) throw new DamselflyError('DF_ERR_TIMEOUT', `preheat job ${job.id} still ${job.status} after ${timeoutMs / 1000} s`)
    await delay(500)
  }
}
