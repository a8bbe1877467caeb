import type { BufferPool } from '../../src/buffer-pool.ts'
import type { Readable } from 'node:stream'
import type { AbortOptions } from '../../src/abort.ts'
import type { Logger } from '../../src/logger.ts'
import type { Registry } from '../../src/metrics.ts'
import type { RateLimits } from '../../src/rate.ts'
import type { ByteRange } from '../../src/oci/range.ts'
import type { AccessChecker, ContentKind } from '../auth/index.ts'
import type { OriginClient, OriginCredentials } from '../origin/index.ts'
import type { PieceWriter } from '../piece-store/index.ts'
import type { PieceSource, SwarmTask } from '../swarm/source.ts'
import type { Upstream } from '../upstream/index.ts'
import { DefaultBlobService } from './blob-service.ts'

/** One blob (or manifest by digest) and where it lives upstream. */
export interface BlobTask {
  readonly upstream: Upstream
  readonly repo: string
  readonly digest: string
  readonly kind: ContentKind
  readonly size: number
  readonly mediaType: string | undefined
  /** Credentials of the caller that opened the task; used for the origin only, kept in memory only. */
  readonly credentials: OriginCredentials
}

/** What the swarm is told of a task: never the credentials. */
export function swarmTask (task: BlobTask): SwarmTask {
  return { digest: task.digest, size: task.size, origin: { registry: task.upstream.origin, repo: task.repo, kind: task.kind } }
}

export interface OpenBlobRequest {
  upstream: Upstream
  repo: string
  digest: string
  kind: ContentKind
  credentials: OriginCredentials
}

/**
 * How urgent a read is; higher goes first wherever work queues (origin
 * requests). The values are Dragonfly's, so `X-Dragonfly-Priority` maps
 * straight onto them: nydusd sends 6 for on-demand reads, 3 for prefetch.
 */
export const Priority = {
  ON_DEMAND: 6,
  PREFETCH: 3,
  BACKGROUND: 1
} as const

export interface ReadOptions extends AbortOptions {
  /** Default `Priority.ON_DEMAND`. Work below it also asks the origin for shorter runs, so it never holds up an on-demand read for long. */
  priority?: number
}

export interface OpenBlob {
  readonly task: BlobTask
  /** True when the origin could not be asked and an older decision or a swarm fact was used. */
  readonly stale: boolean
  /**
   * Streams the verified bytes of `range` (or the whole blob) in order. The
   * first piece is in hand before this resolves, so a failure to start is a
   * clean error rather than a truncated response.
   */
  read: (range: ByteRange | undefined, options?: ReadOptions) => Promise<Readable>
}

export interface BlobServiceComponents {
  logger: Logger
  store: PieceWriter
  origin: OriginClient
  access: AccessChecker
  metrics?: Registry | undefined
  /** The swarm, when there is one; consulted before the origin. */
  source?: PieceSource | undefined
  /** Bandwidth limits on what comes in (origin, download, prefetch); none when absent. */
  rates?: Pick<RateLimits, 'origin' | 'download' | 'prefetch'> | undefined
  /** Piece buffers for origin bytes, shared with the swarm's piece client; fresh buffers when absent. */
  buffers?: BufferPool | undefined
}

export interface BlobServiceInit {
  /** Pieces a reader has under way ahead of the one it is sending. Default 8. */
  readahead?: number
  /** How far ahead of the piece being sent those may be, taken in a random order. Default 256. */
  window?: number
  /** Picks the pieces a reader fetches ahead; injected for tests. */
  random?: () => number
  /** Most pieces one origin request covers. Default 64. */
  maxRunPieces?: number
  /** Origin requests in flight at once, across all blobs. Default 16. */
  maxOriginRuns?: number
  /** Origin requests waiting for a slot before new ones are refused. Default 1024. */
  maxQueuedRuns?: number
  /** Background prefetches running at once; more wait in a queue of 16× this. Default 2. */
  maxPrefetches?: number
  /** Attempts to get one piece (each may start a new origin request from that piece on). Default 3. */
  pieceAttempts?: number
}

/** A piece's bytes, not to be changed, and lent until `release` (a pooled buffer goes back to its pool then; idempotent). */
export interface LentPiece {
  data: Buffer
  release: () => void
}

/** What other peers' requests for pieces are answered from (peer/upload). */
export interface PieceSupply {
  /**
   * A verified piece held here (on disk, or landed and still being written).
   * One read from disk goes into `into` when given (see PieceReader.readPiece).
   */
  held: (digest: string, index: number, into?: Buffer) => Promise<Buffer | undefined>
  /** The length of a piece held here on disk now; undefined when it is not (what a run of pieces may promise). */
  heldLength: (digest: string, index: number) => number | undefined
  /**
   * The piece once a fetch under way here lands it, lent until `release`;
   * undefined when none is under way. Every child waiting on a piece used to
   * get a fresh copy of its megabyte (emulated cluster: a tenth of the
   * peers' time went to those copies).
   */
  whenLanded: (digest: string, index: number) => Promise<LentPiece> | undefined
  /** Gets a piece of a task this node was sent to the origin for (whole-read rules: the child checks it against the table). */
  fetch: (task: BlobTask, index: number, signal: AbortSignal) => Promise<Buffer>
  /** A task this node opened lately, with what it needs to fetch more of it. */
  task: (digest: string) => BlobTask | undefined
}

export interface BlobService extends PieceSupply {
  /** Checks the caller with the origin (or what is known of it) and tracks the blob: nothing is fetched yet. */
  open: (request: OpenBlobRequest, options?: AbortOptions) => Promise<OpenBlob>
  /**
   * Fetches every missing piece of a task into the cache, in order, at the
   * pace the sources allow, and checks the whole digest. For seed peers,
   * preheat and prefetch; uses `signal` for cancellation, not any caller's.
   */
  complete: (task: BlobTask, options?: ReadOptions) => Promise<void>
  /**
   * Starts `complete` in the background at `Priority.BACKGROUND`, once per
   * task at a time, for a reader that asked for the whole blob to follow its
   * range (`X-Dragonfly-Prefetch`). False when it was not started: already
   * complete, already running, or too many prefetches queued.
   */
  prefetch: (task: BlobTask) => boolean
  /**
   * Keeps a blob whose bytes are already in hand and verified against its
   * digest (a manifest fetched by tag), cut into pieces as an origin run would.
   */
  keep: (task: BlobTask, bytes: Buffer) => Promise<void>
  /**
   * The swarm dropped this blob's piece table: fetches from other peers under
   * way for it stop (readers try again under the new table), and of the copy
   * here only what is known genuine stays (see `PieceWriter.keepTrusted`).
   */
  abandon: (digest: string) => Promise<void>
  /**
   * Forgets every task opened with exactly this credentials object (a
   * finished preheat job's), so they are not kept past their job. Pieces
   * already held are still served; missing ones are no longer fetched with them.
   */
  forget: (credentials: OriginCredentials) => void
  /** Bytes moved since start (the same numbers as the byte metrics, without a registry). */
  byteCounts: () => BlobByteCounts
  stop: () => Promise<void>
}

export interface BlobByteCounts {
  /** Bytes sent to clients, by where each piece came from (local: already cached). */
  served: { local: number, peer: number, origin: number }
  /** Piece bytes fetched into this node, by source. */
  fetched: { peer: number, origin: number }
}

export function createBlobService (components: BlobServiceComponents, init: BlobServiceInit = {}): BlobService {
  return new DefaultBlobService(components, init)
}
