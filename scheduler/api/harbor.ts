/*
 * Harbor's P2P preheat, with its "Dragonfly" provider pointed at this
 * scheduler's HTTP API (the provider instance's endpoint).
 *
 * What Harbor sends, from goharbor/harbor `src/pkg/p2p/preheat/provider/dragonfly.go`
 * (the open-API driver: Self().Version "2.1.59", stored version read through
 * the code index as file id 3548776277; the newest commit the index names for
 * that path, da7f356c24fc, holds the legacy driver, as does 0063430f6d8b):
 *
 *   health  GET  {endpoint}/healthy                    any 2xx is healthy
 *   create  POST {endpoint}/oapi/v1/jobs               Content-Type and Accept: application/json
 *           {"type":"preheat",
 *            "args":{"type":"image","url":"<ext endpoint>/v2/<project>/<repo>/manifests/<tag>",
 *                    "tag":"","filtered_query_params":"","headers":{"Authorization":"<value>"},
 *                    "scope":"single_peer|all_peers|…","concurrent_count":0,"timeout":0},
 *            "scheduler_cluster_ids":null | [uint…]}   (from the policy's extra_attrs.cluster_ids)
 *           The answer is unmarshalled into {id int, created_at, updated_at time, state}:
 *           `id` must be a JSON integer, the times RFC 3339.
 *   poll    GET  {endpoint}/oapi/v1/jobs/{id}          until the state is final
 *           state PENDING → Harbor RUNNING; SUCCESS → SUCCESS (it renders a table of
 *           result.job_states[].results[].success_tasks/failure_tasks {url, hostname, ip,
 *           description} with scheduler_cluster_id); FAILURE → FAIL with
 *           result.job_states[].error joined; any other state → FAIL "unknown state".
 *           So a running job must say PENDING, never STARTED.
 *   auth    every call carries the instance's credential (auth/cred.go, auth/token_handler.go):
 *           NONE; BASIC; OAUTH → `Authorization: Bearer <token>`; CUSTOM (a header of the
 *           instance's choosing). Our API token is checked as OAUTH sends it.
 *           A non-2xx answer is an error whose text includes our body.
 *
 * The registry credential is made by `src/controller/p2p/preheat/enforcer.go`
 * (commit 03112a23f1bd): `token.MakeToken(…, "distributor", …)` scoped to
 * repository:<project>/<repo>:pull, sent as "Bearer <token>" under the
 * "Authorization" key of args.headers; the URL is `manifestAPIPattern`
 * "%s/v2/%s/manifests/%s" over Harbor's external endpoint.
 *
 * Field shapes cross-checked with dragonflyoss/dragonfly `manager/types/job.go`
 * (commit 007340ee4c58: PreheatArgs type/url/headers/username/password/platform/scope…,
 * job states PENDING RECEIVED STARTED RETRY SUCCESS FAILURE).
 *
 * The legacy driver (Harbor before the open API; commit da7f356c24fc):
 *   GET /_ping; POST /preheats with Harbor's PreheatImage {type, url, headers, image,
 *   tag, digest} → {"ID": string}; GET /preheats/{id} → {ID, status, startTime,
 *   finishTime, errorMsg}, where WAITING means pending, FAILED failed, and any other
 *   status is taken as Harbor's own (RUNNING, SUCCESS).
 *
 * Both are answered here by turning the request into a preheat job
 * (scheduler/preheat) and the job into the answer Harbor reads, one entry per
 * blob. The registry credential goes to the job and from there to the seed,
 * which sends it to the origin as it is; it is in no answer and no log line.
 */
import type { FastifyError, FastifyInstance } from 'fastify'
import { InvalidPreheatRequestError, isDamselflyError } from '../../src/errors.ts'
import { validateName, validateReference } from '../../src/oci/names.ts'
import type { JobStatus, PreheatJob, PreheatJobs } from '../preheat/index.ts'
import type { SwarmState } from '../state/index.ts'

export interface HarborApiOptions {
  jobs: PreheatJobs
  state: SwarmState
}

/** Every route that creates or reads a preheat job: the API guard's (see guard.ts). */
export const PREHEAT_ROUTES = new Set(['/api/v1/preheat', '/api/v1/preheat/:id', '/oapi/v1/jobs', '/oapi/v1/jobs/:id', '/preheats', '/preheats/:id'])

/** Our job status → the open API's job state. Harbor takes only PENDING as "still running". */
const OPEN_API_STATE: Record<JobStatus, string> = { PENDING: 'PENDING', RUNNING: 'PENDING', SUCCESS: 'SUCCESS', FAILURE: 'FAILURE' }
/** Our job status → the legacy `/preheats` status. */
const LEGACY_STATUS: Record<JobStatus, string> = { PENDING: 'WAITING', RUNNING: 'RUNNING', SUCCESS: 'SUCCESS', FAILURE: 'FAILED' }

/** Longest header value taken; Harbor's JWT pull tokens run to a couple of KiB. */
const MAX_HEADER = 8192
const Headers = { type: ['object', 'null'], additionalProperties: { type: 'string', maxLength: MAX_HEADER }, maxProperties: 32 }

/*
 * Unknown members are ignored rather than refused: Harbor and Dragonfly add
 * fields between releases (piece_length, load_to_cache, …) that a preheat
 * here has no use for, and refusing them would break Harbor on upgrade.
 */
const CreateJobBody = {
  type: 'object',
  required: ['type', 'args'],
  properties: {
    type: { type: 'string', maxLength: 64 },
    bio: { type: 'string', maxLength: 1024 },
    args: {
      type: 'object',
      required: ['type', 'url'],
      properties: {
        type: { type: 'string', maxLength: 16 },
        url: { type: 'string', minLength: 1, maxLength: 2048 },
        headers: Headers,
        username: { type: 'string', maxLength: 512 },
        password: { type: 'string', maxLength: 4096 },
        platform: { type: 'string', pattern: '^$|^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$' },
        scope: { type: 'string', maxLength: 64 },
        tag: { type: 'string', maxLength: 1024 },
        filtered_query_params: { type: 'string', maxLength: 1024 }
      }
    },
    scheduler_cluster_ids: { type: ['array', 'null'], items: { type: 'integer', minimum: 0 }, maxItems: 256 }
  }
} as const

const LegacyPreheatBody = {
  type: 'object',
  required: ['type', 'url'],
  properties: {
    type: { type: 'string', maxLength: 16 },
    url: { type: 'string', minLength: 1, maxLength: 2048 },
    headers: Headers,
    image: { type: 'string', maxLength: 512 },
    tag: { type: 'string', maxLength: 128 },
    digest: { type: 'string', maxLength: 200 },
    scope: { type: 'string', maxLength: 64 }
  }
} as const

interface CreateJobRequest {
  type: string
  args: { type: string, url: string, headers?: Record<string, string> | null, username?: string, password?: string, platform?: string }
}

interface LegacyPreheatRequest {
  type: string
  url: string
  headers?: Record<string, string> | null
}

/**
 * Adds Harbor's provider endpoints to the scheduler's HTTP API, and the API
 * token check to every preheat endpoint (ours included). Call it on the root
 * instance before it is ready.
 */
/** Adds Harbor's provider endpoints to the scheduler's HTTP API (the API guard covers them: see PREHEAT_ROUTES). */
export function registerHarborApi (app: FastifyInstance, options: HarborApiOptions): void {
  app.register(async (scope) => { harborRoutes(scope, options) })
}

function harborRoutes (app: FastifyInstance, options: HarborApiOptions): void {
  const { jobs, state } = options
  // Harbor's client reads the open API's `id` as an integer: ours are UUIDs, so number them here.

  app.setErrorHandler((err: FastifyError, _request, reply) => {
    if (err.validation !== undefined) return reply.code(400).send({ code: 'DF_ERR_PREHEAT_INVALID', message: err.message })
    if (isDamselflyError(err)) return reply.code(400).send({ code: err.code, message: err.message })
    return reply.code(err.statusCode !== undefined && err.statusCode < 500 ? err.statusCode : 500).send({ message: err.statusCode !== undefined && err.statusCode < 500 ? err.message : 'internal error' })
  })

  // Dragonfly manager's open API, as Harbor's current driver calls it.
  app.post('/oapi/v1/jobs', { schema: { body: CreateJobBody } }, async (request, reply) => {
    const body = request.body as CreateJobRequest
    if (body.type !== 'preheat') throw new InvalidPreheatRequestError(`type: only preheat jobs are supported here, not ${JSON.stringify(body.type.slice(0, 64))}`)
    if (body.args.type !== 'image') throw new InvalidPreheatRequestError(`args.type: only image preheats are supported here, not ${JSON.stringify(body.args.type)}`)
    const image = parseManifestUrl(body.args.url, 'args.url')
    const authorization = authorizationOf(body.args.headers, 'args.headers')
    const username = body.args.username ?? ''
    const job = await jobs.create({
      ...image,
      platform: body.args.platform === undefined || body.args.platform === '' ? undefined : body.args.platform,
      authorization,
      credentials: authorization === undefined && username !== '' ? { username, password: body.args.password ?? '' } : undefined
    })
    return reply.code(200).send(openApiJob(job.number, job, state))
  })

  app.get('/oapi/v1/jobs/:id', async (request, reply) => {
    const raw = (request.params as { id: string }).id
    const id = /^\d{1,15}$/.test(raw) ? Number(raw) : undefined
    const job = id === undefined ? undefined : jobs.byNumber(id)
    if (id === undefined || job === undefined) return reply.code(404).send({ message: `no job ${JSON.stringify(raw.slice(0, 32))}` })
    return openApiJob(id, job, state)
  })

  // The legacy driver (Dragonfly 1.x's supernode API).
  app.get('/_ping', async (_request, reply) => reply.type('text/plain').send('OK'))

  app.post('/preheats', { schema: { body: LegacyPreheatBody } }, async (request, reply) => {
    const body = request.body as LegacyPreheatRequest
    if (body.type !== 'image') throw new InvalidPreheatRequestError(`type: only image preheats are supported here, not ${JSON.stringify(body.type)}`)
    const job = await jobs.create({ ...parseManifestUrl(body.url, 'url'), authorization: authorizationOf(body.headers, 'headers') })
    return reply.code(200).send({ ID: job.id })
  })

  app.get('/preheats/:id', async (request, reply) => {
    const job = jobs.get((request.params as { id: string }).id)
    if (job === undefined) return reply.code(404).send({ message: 'no such preheat task' })
    return {
      ID: job.id,
      status: LEGACY_STATUS[job.status],
      startTime: new Date(job.createdAt).toISOString(),
      finishTime: job.finishedAt === undefined ? '' : new Date(job.finishedAt).toISOString(),
      errorMsg: job.error ?? ''
    }
  })
}

/** `scheme://host[:port]/v2/<repository>/manifests/<tag|digest>` → what a preheat job needs. */
export function parseManifestUrl (value: string, field: string): { registry: string, repo: string, reference: string } {
  let url: URL
  try {
    url = new URL(value)
  } catch {
    throw new InvalidPreheatRequestError(`${field}: not a URL: ${JSON.stringify(value.slice(0, 200))}`)
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new InvalidPreheatRequestError(`${field}: must be an http(s) URL`)
  // Our job views show the registry: a credential in it would show there.
  if (url.username !== '' || url.password !== '') throw new InvalidPreheatRequestError(`${field}: credentials go in the Authorization header, not in the URL`)
  const m = /^\/v2\/(.+)\/manifests\/([^/]+)$/.exec(url.pathname)
  if (m === null) throw new InvalidPreheatRequestError(`${field}: expected scheme://host/v2/<repository>/manifests/<tag or digest>, got path ${JSON.stringify(url.pathname.slice(0, 200))}`)
  const repo = m[1] as string
  const reference = decodeURIComponent(m[2] as string)
  try {
    validateName(repo)
    validateReference(reference)
  } catch (err) {
    throw new InvalidPreheatRequestError(`${field}: ${(err as Error).message}`)
  }
  return { registry: `${url.protocol}//${url.host}`, repo, reference }
}

/** The `Authorization` entry of Harbor's header map (any case); undefined when there is none. */
function authorizationOf (headers: Record<string, string> | null | undefined, field: string): string | undefined {
  const entry = Object.entries(headers ?? {}).find(([name]) => name.toLowerCase() === 'authorization')
  if (entry === undefined || entry[1] === '') return undefined
  if (!/^[\x20-\x7e]+$/.test(entry[1])) throw new InvalidPreheatRequestError(`${field}.Authorization: must be a header value of printable ASCII`)
  return entry[1]
}

/** A job as Dragonfly's manager shows it. Never the request's headers or credentials. */
function openApiJob (id: number, job: PreheatJob, state: SwarmState): Record<string, unknown> {
  const { registry, repo, reference } = job.request
  const seed = job.seed === undefined ? undefined : state.hostByPeer(job.seed)?.info
  const where = { hostname: seed?.hostname ?? '', ip: ipOf(seed?.addrs ?? []) }
  const done = job.status === 'SUCCESS' || job.status === 'FAILURE'
  return {
    id,
    created_at: new Date(job.createdAt).toISOString(),
    updated_at: new Date(job.finishedAt ?? job.createdAt).toISOString(),
    is_del: 0,
    // Our own job id: the same job is at /api/v1/preheat/<task_id>.
    task_id: job.id,
    bio: '',
    type: 'preheat',
    state: OPEN_API_STATE[job.status],
    args: { type: 'image', url: `${registry}/v2/${repo}/manifests/${reference}`, ...(job.request.platform === undefined ? {} : { platform: job.request.platform }) },
    user_id: 0,
    result: !done
      ? null
      : {
          job_states: [{
            error: job.error ?? '',
            results: [{
              success_tasks: job.results.filter(r => r.status === 'SUCCESS').map(r => ({ url: `${registry}/v2/${repo}/blobs/${r.digest}`, ...where })),
              failure_tasks: job.results.filter(r => r.status === 'FAILURE').map(r => ({ url: `${registry}/v2/${repo}/blobs/${r.digest}`, ...where, description: r.error ?? '' })),
              scheduler_cluster_id: 1
            }]
          }]
        }
  }
}

/** The first IP address among a host's multiaddrs, for Harbor's result table. */
function ipOf (addrs: readonly string[]): string {
  for (const a of addrs) {
    const m = /^\/ip[46]\/([^/]+)\//.exec(a)
    if (m !== null) return m[1] as string
  }
  return ''
}
