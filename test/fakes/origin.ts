import { createHash } from 'node:crypto'
import { Readable } from 'node:stream'
import { BlobUnknownError, ManifestUnknownError, OriginUnavailableError, UnauthorizedError } from '../../src/errors.ts'
import type { ByteRange } from '../../src/oci/range.ts'
import type { ListingResponse, OriginClient, OriginCredentials } from '../../peer/origin/index.ts'
import type { Upstream } from '../../peer/upstream/index.ts'

interface Content { data: Buffer, mediaType: string | undefined, repos: Set<string> }

/**
 * An in-memory origin registry implementing OriginClient, for unit tests of
 * what sits on top of it. It counts what it sends and can be told to fail.
 * The integration tests use a real registry instead.
 */
export class FakeOrigin implements OriginClient {
  readonly blobs = new Map<string, Content>()
  readonly manifests = new Map<string, Content>()
  readonly tags = new Map<string, string>()
  /** Repositories that need `authorization === validAuth`. */
  readonly privateRepos = new Set<string>()
  validAuth = 'Basic dXNlcjpwYXNz'
  bytesSent = 0
  requests: Array<{ method: string, what: string, range?: ByteRange | undefined }> = []
  down = false
  /** Break the next blob body after this many bytes. */
  failAfterBytes: number | undefined

  addBlob (repo: string, data: Buffer): string {
    const digest = `sha256:${createHash('sha256').update(data).digest('hex')}`
    const existing = this.blobs.get(digest)
    if (existing !== undefined) existing.repos.add(repo)
    else this.blobs.set(digest, { data, mediaType: undefined, repos: new Set([repo]) })
    return digest
  }

  addManifest (repo: string, tag: string, body: object, mediaType = 'application/vnd.oci.image.manifest.v1+json'): string {
    const data = Buffer.from(JSON.stringify(body))
    const digest = `sha256:${createHash('sha256').update(data).digest('hex')}`
    this.manifests.set(digest, { data, mediaType, repos: new Set([repo]) })
    this.tags.set(`${repo}:${tag}`, digest)
    return digest
  }

  #authorize (repo: string, credentials: OriginCredentials): void {
    if (this.down) throw new OriginUnavailableError('fake origin is down')
    if (this.privateRepos.has(repo) && credentials.authorization !== this.validAuth) {
      throw new UnauthorizedError('the origin requires authentication', 'Basic realm="fake"')
    }
  }

  #blob (repo: string, digest: string): Content {
    const content = this.blobs.get(digest)
    if (content === undefined || !content.repos.has(repo)) throw new BlobUnknownError(digest)
    return content
  }

  async headBlob (_u: Upstream, repo: string, digest: string, credentials: OriginCredentials): Promise<{ size: number, digest: string, mediaType: string }> {
    this.requests.push({ method: 'HEAD', what: digest })
    this.#authorize(repo, credentials)
    return { size: this.#blob(repo, digest).data.length, digest, mediaType: 'application/octet-stream' }
  }

  async getBlob (_u: Upstream, repo: string, digest: string, range: ByteRange | undefined, credentials: OriginCredentials): Promise<{ start: number, length: number, size: number, body: Readable }> {
    this.requests.push({ method: 'GET', what: digest, range })
    this.#authorize(repo, credentials)
    const { data } = this.#blob(repo, digest)
    const start = range?.start ?? 0
    const end = range?.end ?? data.length - 1
    let slice = data.subarray(start, end + 1)
    const failAt = this.failAfterBytes
    this.failAfterBytes = undefined
    if (failAt !== undefined) slice = slice.subarray(0, failAt)
    this.bytesSent += slice.length
    const chunks: Buffer[] = []
    for (let off = 0; off < slice.length; off += 64 * 1024) chunks.push(slice.subarray(off, off + 64 * 1024))
    const body = Readable.from((async function * () {
      yield * chunks
      if (failAt !== undefined) throw new Error('connection reset by fake origin')
    })(), { objectMode: false })
    return { start, length: end - start + 1, size: data.length, body }
  }

  async getManifest (_u: Upstream, repo: string, reference: string, _accept: string, credentials: OriginCredentials, options: { method?: 'GET' | 'HEAD' } = {}): Promise<{ status: number, mediaType: string | undefined, digest: string, size: number, body: Buffer }> {
    this.requests.push({ method: options.method ?? 'GET', what: reference })
    this.#authorize(repo, credentials)
    const digest = reference.startsWith('sha256:') ? reference : this.tags.get(`${repo}:${reference}`)
    const content = digest === undefined ? undefined : this.manifests.get(digest)
    if (digest === undefined || content === undefined || !content.repos.has(repo)) throw new ManifestUnknownError(reference)
    const head = options.method === 'HEAD'
    if (!head) this.bytesSent += content.data.length
    return { status: 200, mediaType: content.mediaType, digest, size: content.data.length, body: head ? Buffer.alloc(0) : content.data }
  }

  async authorize (_u: Upstream, _repo: string, identity: { username: string, password: string } | undefined): Promise<OriginCredentials> {
    return identity === undefined ? {} : { authorization: `Basic ${Buffer.from(`${identity.username}:${identity.password}`).toString('base64')}` }
  }

  /** Tags of a repository, from `tags` (keyed `repo:tag`), sorted; honours `n` and `last` and links the next page. */
  async listing (_u: Upstream, pathAndQuery: string, credentials: OriginCredentials): Promise<ListingResponse> {
    if (this.down) throw new OriginUnavailableError('fake origin is down')
    this.requests.push({ method: 'GET', what: pathAndQuery })
    const url = new URL(pathAndQuery, 'http://origin')
    const m = /^\/v2\/(.+)\/tags\/list$/.exec(url.pathname)
    const json = (status: number, body: unknown, headers: ListingResponse['headers'] = {}): ListingResponse =>
      ({ status, headers: { 'content-type': 'application/json', ...headers }, body: Buffer.from(JSON.stringify(body)) })
    if (m === null) return json(404, { errors: [{ code: 'NAME_UNKNOWN', message: 'no such route' }] })
    const repo = m[1] as string
    if (this.privateRepos.has(repo) && credentials.authorization !== this.validAuth) return json(401, { errors: [{ code: 'UNAUTHORIZED', message: 'authentication required' }] }, { 'www-authenticate': 'Basic realm="fake"' })
    const all = [...this.tags.keys()].filter(k => k.startsWith(`${repo}:`)).map(k => k.slice(repo.length + 1)).sort()
    if (all.length === 0) return json(404, { errors: [{ code: 'NAME_UNKNOWN', message: 'repository name not known to registry' }] })
    const last = url.searchParams.get('last')
    const n = Number(url.searchParams.get('n') ?? all.length)
    const rest = last === null ? all : all.filter(t => t > last)
    const page = rest.slice(0, n)
    const more = rest.length > page.length
    return json(200, { name: repo, tags: page }, more ? { link: `</v2/${repo}/tags/list?last=${page[page.length - 1] ?? ''}&n=${n}>; rel="next"` } : {})
  }

  async ping (_u: Upstream, credentials: OriginCredentials): Promise<{ status: number, challenge: string | undefined }> {
    if (this.down) throw new OriginUnavailableError('fake origin is down')
    return this.privateRepos.size > 0 && credentials.authorization !== this.validAuth ? { status: 401, challenge: 'Basic realm="fake"' } : { status: 200, challenge: undefined }
  }
}
