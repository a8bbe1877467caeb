import type { AbortOptions } from '../../src/abort.ts'
import type { Lease } from '../../src/buffer-pool.ts'
import type { OriginRef } from '../../src/protocol/messages.ts'

/**
 * What the data path asks the swarm for, and what it gets. The swarm is a
 * piece source below the blob service: it knows digests, sizes and where
 * content comes from (registry, repository), never a caller's credentials.
 */
export interface SwarmTask {
  readonly digest: string
  readonly size: number
  readonly origin: OriginRef
}

export interface PieceSourceContext {
  task: SwarmTask
  /** Last piece this reader will want; lets a source plan ahead. */
  lastWanted: number
  /**
   * The reader checks the whole blob's digest before it completes (a full
   * read, a prefetch, a seed's fetch), so bytes that match a table entry only
   * its author vouches for will do. False for a range read, which needs
   * trusted pieces (see `RemotePiece.trusted`).
   */
  whole: boolean
  /**
   * Lets the source take pieces after the one asked for in the same answer
   * from a parent (a run: one request instead of several). `claim` makes this
   * fetch responsible for a piece nobody here holds or is getting (false when
   * someone is); `unclaim` hands one back that it will not bring after all.
   * Claimed pieces that came arrive in `RemotePiece.more`. Absent: one piece
   * per fetch.
   */
  ahead?: PieceClaims | undefined
}

export interface PieceClaims {
  claim: (index: number) => boolean
  unclaim: (index: number) => void
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
  /** The receiver's claim on `data` when it sits in a pooled buffer: released when done with it (see `BufferPool`). */
  lease?: Lease | undefined
  /** Claimed pieces (see `PieceSourceContext.ahead`) that came with this one, verified alike: the next indexes in order. */
  more?: RemotePiece[] | undefined
}

export interface OriginDirective {
  kind: 'origin'
  /** Last piece (inclusive) of the run this node should fetch from the origin, starting at the asked index. */
  upTo: number
}

/** One entry of the swarm's piece table, as this node last heard it. */
export interface TableEntry {
  sha256: string
  /** Only its author vouches for it so far. */
  provisional: boolean
}

/**
 * A source of verified pieces other than the origin. `fetch` returns a
 * piece's bytes already checked against the swarm's piece table, or tells
 * the caller to fetch pieces `index..upTo` from the origin itself (it was
 * sent there, or the swarm cannot help). It never returns unverified bytes.
 */
export interface PieceSource {
  fetch: (ctx: PieceSourceContext, index: number, options: AbortOptions) => Promise<RemotePiece | OriginDirective>
  /** The swarm's table entry for a piece, if this node has heard it: what bytes from the origin must match. */
  expected: (digest: string, index: number) => TableEntry | undefined
  /** The origin failed pieces this node was told to fetch; the swarm should hand them to someone else. */
  originFailed: (task: SwarmTask, error: unknown) => void
  /**
   * The swarm's table for this blob is wrong: the origin sent `evidence.piece`
   * with another SHA-256, or (with `table`, the SHA-256 of the table checked)
   * a blob assembled from pieces matching it did not match its digest.
   */
  mismatch: (task: SwarmTask, evidence: { piece: number, sha256: string } | { table: string } | undefined) => void
  /**
   * Every parent the swarm last offered for this blob holds all of it, and
   * nobody is fetching it from the origin: a reader has nothing to gain from
   * taking pieces out of order (see the reader's `Ahead`). Absent or false
   * while that is not known.
   */
  settled?: (digest: string) => boolean
}
