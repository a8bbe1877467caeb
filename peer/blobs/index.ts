import type { Readable } from 'node:stream'
import type { AbortOptions } from '../../src/abort.ts'
import type { Logger } from '../../src/logger.ts'
import type { Registry } from '../../src/metrics.ts'
import type { ByteRange } from '../../src/oci/range.ts'
import type { AccessChecker, ContentKind } from '../auth/index.ts'
import type { OriginClient, OriginCredentials } from '../origin/index.ts'
import type { PieceStore } from '../piece-store/index.ts'
import type { Upstream } from '../upstream/index.ts'
import { DefaultBlobService } from './blob-service.ts'

/** Where a piece can come from besides the local cache and the origin: the swarm. */
export interface PieceSourceContext {
  task: BlobTask
  /** Last piece this reader will want; lets a source plan ahead. */
  lastWanted: number
  /**
   * The reader checks the whole blob's digest before it completes (a full
   * read, a prefetch, a seed's fetch), so bytes that match a table entry only
   * its author vouches for will do. False for a range read, which needs
   * trusted pieces (see `RemotePiece.trusted`).
   */
  whole: boolean
}

/**
 * A source of verified pieces other than the origin (the swarm). `fetch`
 * returns the piece's bytes already verified against the swarm's piece table,
 * or tells the caller to fetch pieces `index..originUpTo` from the origin
 * itself (it was made their first fetcher, or the swarm cannot help). It must
 * never return unverified bytes.
 */
export interface RemotePieceSource {
  fetch: (ctx: PieceSourceContext, index: number, options: AbortOptions) => Promise<RemotePiece | OriginDirective>
  /** The origin failed pieces this node was told to fetch; the swarm should hand them to someone else. */
  originFailed?: (task: BlobTask, error: unknown) => void
  /**
   * The swarm's table for this blob is wrong: the origin sent `evidence.piece`
   * with another SHA-256, or (no evidence) a blob assembled from pieces
   * matching it did not match its digest.
   */
  mismatch?: (task: BlobTask, evidence: { piece: number, sha256: string } | undefined) => void
}

export interface RemotePiece {
  kind: 'piece'
  data: Buffer
  sha256: string
  /**
   * The bytes are known genuine: they matched an entry someone other than its
   * author vouched for, or came from a peer that took them from the origin to
   * confirm such an entry. Only trusted pieces serve range reads.
   */
  trusted: boolean
}

export interface OriginDirective {
  kind: 'origin'
  /** Last piece (inclusive) of the run this node should fetch from the origin, starting at the asked index. */
  upTo: number
}

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
  store: PieceStore
  origin: OriginClient
  access: AccessChecker
  metrics?: Registry | undefined
  /** The swarm, when there is one; consulted before the origin. */
  remote?: RemotePieceSource | undefined
}

export interface BlobServiceInit {
  /** Pieces a reader fetches ahead of the one it is sending. Default 4. */
  readahead?: number
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
  /**
   * Other peers' requests waiting at once for a piece this node is still
   * getting; more are refused as busy (`QueueFullError`). Waits hold no
   * upload slot, so this is what bounds them. Default 256.
   */
  maxPieceWaits?: number
}

export interface ServePieceOptions extends AbortOptions {
  /** How long to wait for a piece this node is fetching (or was asked to fetch); then `undefined`. */
  waitMs: number
  /**
   * Whether this node was sent to the origin for the piece (first fetcher,
   * confirmer, a seed's task): then a piece neither held nor in flight is
   * fetched now, once the task is known here (the scheduler may name this
   * node before its command to take the task has arrived). Otherwise such a
   * request is answered at once, whatever it was willing to wait.
   */
  fetch: boolean | (() => boolean)
}

export interface BlobService {
  open: (request: OpenBlobRequest, options?: AbortOptions) => Promise<OpenBlob>
  /**
   * A verified piece for another peer: held, or in flight here and waited
   * for, or — when `fetch` is set and this node knows the task — fetched now.
   * `undefined` when this node has nothing to give (yet). Throws
   * `QueueFullError` when too many requests wait already.
   */
  servePiece: (digest: string, index: number, options: ServePieceOptions) => Promise<Buffer | undefined>
  /**
   * The swarm dropped this blob's piece table: fetches from other peers under
   * way for it stop (readers try again under the new table), and of the copy
   * here only what is known genuine stays (see `PieceStore.keepTrusted`).
   */
  abandon: (digest: string) => Promise<void>
  /** Remembers a task (with its upstream) so pieces of it can be fetched for other peers. */
  adopt: (task: BlobTask) => void
  /**
   * Forgets every remembered task that carries exactly this credentials
   * object (a finished preheat job's), so they are not kept past their job.
   * Pieces already held are still served; missing ones are no longer fetched
   * with them.
   */
  forget: (credentials: OriginCredentials) => void
  /**
   * Fetches every missing piece of a task into the cache, in order, at the
   * pace the sources allow. For seed peers and prefetch; uses `signal` for
   * cancellation, not any caller's.
   */
  complete: (task: BlobTask, options?: ReadOptions) => Promise<void>
  /**
   * Starts `complete` in the background at `Priority.BACKGROUND`, once per
   * task at a time, for a reader that asked for the whole blob to follow its
   * range (`X-Dragonfly-Prefetch`). False when it was not started: already
   * complete, already running, or too many prefetches queued.
   */
  prefetch: (task: BlobTask) => boolean
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
