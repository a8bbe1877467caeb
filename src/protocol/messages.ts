import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { TypeCompiler, type TypeCheck } from '@sinclair/typebox/compiler'
import { ProtocolError } from '../errors.ts'

/**
 * The wire between peers and the scheduler, and between peers. Every message
 * is one length-prefixed JSON document; each is checked against its schema on
 * receipt, since any member of the cluster could send anything.
 *
 * These types are the only thing `peer/` and `scheduler/` share.
 */

/** Peer ↔ scheduler RPC: one request and one response per stream (peers before the session channel). */
export const SCHEDULER_PROTOCOL = '/damselfly/scheduler/1.0.0'
/**
 * Peer ↔ scheduler session: one long-lived stream per session carrying the
 * same requests and responses as SCHEDULER_PROTOCOL, as frames with ids, and
 * the session's heartbeat (src/p2p/channel.ts).
 */
export const SCHEDULER_SESSION_PROTOCOL = '/damselfly/scheduler-session/1.0.0'
/** Scheduler → peer commands (fetch a task, run a preheat, evict a blob). */
export const CONTROL_PROTOCOL = '/damselfly/control/1.0.0'
/** Peer ↔ peer over libp2p: one piece per stream, a JSON header then the raw bytes. */
export const PIECE_PROTOCOL = '/damselfly/piece/1.0.0'
/**
 * Peer ↔ peer over HTTP (the default data plane): `GET PIECE_HTTP_PATH/<digest>/<index>?wait=<ms>[&count=<k>]`
 * on the parent's upload port. The body is the piece (with `count`, that
 * piece and those after it the parent holds, see `PIECE_HTTP_PIECES_HEADER`);
 * the child checks each against the piece table like any other.
 */
export const PIECE_HTTP_PATH = '/damselfly/v1/pieces'
/** Names the parent on every upload-port answer, so a child that reached the wrong node knows. */
export const PIECE_HTTP_PEER_HEADER = 'x-damselfly-peer'
/**
 * On a child's request: `<peer id> <upload port>`, how other children may
 * reach it once it has the piece. The parent pairs the port with the address
 * the request came from, never with an address the child names.
 */
export const PIECE_HTTP_CHILD_HEADER = 'x-damselfly-child'
/**
 * On a 200 to a request for a run of pieces (`&count=<k>`): how many of them,
 * from the one asked for on, the body holds back to back (at least 1, at most
 * k). Each is still checked alone against the piece table.
 */
export const PIECE_HTTP_PIECES_HEADER = 'x-damselfly-pieces'
/** Most pieces one request may ask for. */
export const MAX_PIECE_RUN = 16
/** Proof of the cluster secret, run once per connection before any other protocol. */
export const JOIN_PROTOCOL = '/damselfly/join/1.0.0'

/** Largest JSON message accepted (a full inventory of a large cache fits). */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024

const Digest = Type.String({ pattern: '^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$' })
const Sha256Hex = Type.String({ pattern: '^[0-9a-f]{64}$' })
const PeerId = Type.String({ minLength: 1, maxLength: 128 })
const Index = Type.Integer({ minimum: 0, maximum: 10_000_000 })
const Size = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER })
const Base64 = Type.String({ maxLength: 8 * 1024 * 1024 })
const OriginUrl = Type.String({ pattern: '^https?://[^/?#@\\s]+$', maxLength: 300 })
const Repo = Type.String({ minLength: 1, maxLength: 255 })

export const OriginRef = Type.Object({
  /** Registry origin, `scheme://host[:port]`. Never credentials. */
  registry: OriginUrl,
  repo: Repo,
  kind: Type.Union([Type.Literal('blob'), Type.Literal('manifest')])
})
export type OriginRef = Static<typeof OriginRef>

export const HostInfo = Type.Object({
  peerId: PeerId,
  /** Multiaddrs other peers dial to reach this one. */
  addrs: Type.Array(Type.String({ maxLength: 256 }), { maxItems: 32 }),
  hostname: Type.String({ maxLength: 253 }),
  seed: Type.Boolean(),
  location: Type.String({ maxLength: 256 }),
  idc: Type.String({ maxLength: 128 }),
  /** Pieces this peer uploads at once. */
  uploadCapacity: Type.Integer({ minimum: 1, maximum: 100_000 }),
  version: Type.String({ maxLength: 64 }),
  /** Base URLs of this peer's HTTP upload port, best first; absent when pieces go over libp2p only. */
  upload: Type.Optional(Type.Array(Type.String({ pattern: '^http://[^/?#@\\s]+$', maxLength: 256 }), { maxItems: 16 }))
})
export type HostInfo = Static<typeof HostInfo>

/** What a peer holds of one task, or how that changed. */
export const TaskUpdate = Type.Object({
  digest: Digest,
  size: Size,
  mediaType: Type.Optional(Type.String({ maxLength: 256 })),
  origin: Type.Optional(OriginRef),
  /** Pieces now held, each with the SHA-256 the peer computed or verified. */
  add: Type.Optional(Type.Array(Type.Tuple([Index, Sha256Hex]))),
  /**
   * Which of `add` this peer fetched from the origin itself. A piece that a
   * peer other than the table's author took from the origin, with the same
   * SHA-256, confirms that entry of the table.
   */
  fromOrigin: Type.Optional(Type.Array(Index)),
  /** This peer holds every piece and the whole blob hashed to its digest. */
  verified: Type.Optional(Type.Boolean()),
  /** Pieces no longer held; `true` for all of them (the blob left the cache). */
  remove: Type.Optional(Type.Union([Type.Array(Index), Type.Literal(true)]))
})
export type TaskUpdate = Static<typeof TaskUpdate>

/** Facts about content, never about a caller: safe to share across the swarm. */
export const Fact = Type.Union([
  Type.Object({ kind: Type.Literal('tag'), registry: OriginUrl, repo: Repo, tag: Type.String({ maxLength: 128 }), digest: Digest, mediaType: Type.Optional(Type.String({ maxLength: 256 })), size: Size, seenAt: Type.Integer({ minimum: 0 }) }),
  Type.Object({ kind: Type.Literal('public'), registry: OriginUrl, repo: Repo, digest: Digest, mediaType: Type.Optional(Type.String({ maxLength: 256 })), size: Size })
])
export type Fact = Static<typeof Fact>

/**
 * Bytes a peer moved since it started, cumulative, for the scheduler's status
 * page. Counts only; they steer nothing.
 */
export const ByteCounts = Type.Object({
  /** Bytes sent to this peer's clients, by where each piece came from (local: already cached). */
  served: Type.Object({ local: Size, peer: Size, origin: Size }),
  /** Piece bytes fetched into this peer, by source. */
  fetched: Type.Object({ peer: Size, origin: Size }),
  /** Piece bytes sent to other peers. */
  uploaded: Size
})
export type ByteCounts = Static<typeof ByteCounts>

/** Upload load, so the scheduler can send children to parents with free slots. */
export const Load = Type.Object({
  activeUploads: Type.Integer({ minimum: 0 }),
  /** Throughput children measured from parents, bytes per second. */
  parents: Type.Optional(Type.Array(Type.Tuple([PeerId, Type.Number({ minimum: 0 })]), { maxItems: 256 })),
  /** Absent from peers older than the field; the scheduler then shows no counts for them. */
  bytes: Type.Optional(ByteCounts)
})
export type Load = Static<typeof Load>

export const Report = Type.Union([
  /** A parent sent a piece that failed verification against the piece table. */
  Type.Object({ kind: Type.Literal('bad-piece'), parent: PeerId, digest: Digest, piece: Index }),
  /**
   * The piece table is wrong: a blob assembled from pieces that matched it did
   * not hash to its digest, or the origin sent this peer a piece (`piece`, with
   * the `sha256` it had) that disagrees with the table.
   */
  Type.Object({
    kind: Type.Literal('blob-mismatch'),
    digest: Digest,
    piece: Type.Optional(Index),
    sha256: Type.Optional(Sha256Hex),
    /** SHA-256 of the whole table the peer checked (its piece SHA-256s, concatenated), so a report about a table since replaced is told apart. */
    table: Type.Optional(Sha256Hex)
  }),
  /** This peer could not fetch pieces it was assigned from the origin. */
  Type.Object({ kind: Type.Literal('origin-failed'), digest: Digest, code: Type.String({ maxLength: 64 }) })
])
export type Report = Static<typeof Report>

export const SchedulerRequest = Type.Union([
  /** Starts a session: the scheduler forgets what it knew of this host; inventory follows in announces. */
  Type.Object({ type: Type.Literal('register'), host: HostInfo }),
  Type.Object({ type: Type.Literal('announce'), tasks: Type.Array(TaskUpdate), facts: Type.Optional(Type.Array(Fact)), load: Type.Optional(Load) }),
  /**
   * Where to fetch pieces first..last from. `whole` (default true): the reader
   * checks the whole blob's digest before it completes, so entries only their
   * author vouches for will do; false (a range read) asks for confirmed ones.
   */
  Type.Object({ type: Type.Literal('parents'), digest: Digest, size: Size, origin: OriginRef, first: Index, last: Index, exclude: Type.Optional(Type.Array(PeerId, { maxItems: 256 })), whole: Type.Optional(Type.Boolean()) }),
  Type.Object({ type: Type.Literal('digests'), digest: Digest, pieces: Type.Array(Index, { maxItems: 4096 }), waitMs: Type.Integer({ minimum: 0, maximum: 120_000 }) }),
  Type.Object({ type: Type.Literal('report'), report: Report }),
  Type.Object({ type: Type.Literal('lookup-tag'), registry: OriginUrl, repo: Repo, tag: Type.String({ maxLength: 128 }) }),
  Type.Object({ type: Type.Literal('lookup-public'), registry: OriginUrl, repo: Repo, digest: Digest }),
  Type.Object({ type: Type.Literal('leave') })
])
export type SchedulerRequest = Static<typeof SchedulerRequest>

export const ParentInfo = Type.Object({
  peerId: PeerId,
  addrs: Type.Array(Type.String({ maxLength: 256 })),
  upload: Type.Optional(Type.Array(Type.String({ maxLength: 256 }), { maxItems: 16 })),
  seed: Type.Boolean(),
  /** Holds every piece. */
  complete: Type.Boolean(),
  /** Base64 bitset of pieces held (absent when complete). */
  held: Type.Optional(Base64),
  /** Base64 bitset of pieces this parent is fetching from the origin right now. */
  fetching: Type.Optional(Base64),
  /**
   * Of `fetching`, the pieces it was sent for as a confirmer: its bytes come
   * from the origin and not from the entry's author, so a range reader that
   * finds them equal to the table may trust them.
   */
  confirming: Type.Optional(Base64)
})
export type ParentInfo = Static<typeof ParentInfo>

const Ok = { ok: Type.Literal(true) }

export const ParentsResponse = Type.Object({
  ...Ok,
  pieceSize: Type.Integer({ minimum: 1 }),
  pieceCount: Type.Integer({ minimum: 0 }),
  /** Best first. */
  parents: Type.Array(ParentInfo, { maxItems: 64 }),
  /** Known SHA-256 of pieces in the asked window. */
  digests: Type.Array(Type.Tuple([Index, Sha256Hex])),
  /**
   * Which of `digests` only their author vouches for so far (no peer but the
   * one that fetched them has confirmed them). Bytes checked against such an
   * entry are fit for a whole-blob read, which checks the digest at the end,
   * but not for a range.
   */
  provisional: Type.Optional(Type.Array(Index)),
  /** Pieces of the window this peer should fetch from the origin itself. */
  assigned: Type.Array(Index)
})
export type ParentsResponse = Static<typeof ParentsResponse>

export const DigestsResponse = Type.Object({ ...Ok, digests: Type.Array(Type.Tuple([Index, Sha256Hex])), provisional: Type.Optional(Type.Array(Index)) })
export type DigestsResponse = Static<typeof DigestsResponse>

export const RegisterResponse = Type.Object({ ...Ok, schedulerId: Type.String({ maxLength: 128 }) })
export type RegisterResponse = Static<typeof RegisterResponse>

export const LookupTagResponse = Type.Object({ ...Ok, fact: Type.Optional(Fact) })
export type LookupTagResponse = Static<typeof LookupTagResponse>

export const AckResponse = Type.Object({ ...Ok })
export type AckResponse = Static<typeof AckResponse>

export const ErrorResponse = Type.Object({ ok: Type.Literal(false), code: Type.String({ maxLength: 64 }), message: Type.String({ maxLength: 1024 }) })
export type ErrorResponse = Static<typeof ErrorResponse>

/** Registry credentials a preheat job carries to the seed that runs it; held in memory for the job only. */
export const JobCredentials = Type.Object({ username: Type.String({ maxLength: 512 }), password: Type.String({ maxLength: 4096 }) })
/** An `Authorization` header value for the origin (`Basic …`, `Bearer <token>`); visible ASCII and spaces only. */
export const JobAuthorization = Type.String({ minLength: 1, maxLength: 8192, pattern: '^[\\x20-\\x7e]+$' })

export const ControlCommand = Type.Union([
  /** Fetch a whole task into the swarm (the scheduler made this seed its first fetcher). */
  Type.Object({ type: Type.Literal('fetch'), digest: Digest, size: Size, mediaType: Type.Optional(Type.String({ maxLength: 256 })), origin: OriginRef }),
  /**
   * Resolve an image and fetch every blob of it. `authorization`, when set, is
   * the origin's `Authorization` header value exactly as the job's creator gave
   * it (Harbor hands out a pull token); it wins over `credentials`. Both are
   * held in memory for the job only.
   */
  Type.Object({ type: Type.Literal('preheat'), jobId: Type.String({ maxLength: 128 }), registry: Type.String({ minLength: 1, maxLength: 300 }), repo: Repo, reference: Type.String({ maxLength: 200 }), platform: Type.Optional(Type.String({ maxLength: 64 })), credentials: Type.Optional(JobCredentials), authorization: Type.Optional(JobAuthorization) }),
  /** The blob failed its whole-digest check elsewhere: drop it. */
  Type.Object({ type: Type.Literal('evict'), digest: Digest })
])
export type ControlCommand = Static<typeof ControlCommand>

export const PreheatBlobResult = Type.Object({
  digest: Digest,
  size: Size,
  status: Type.Union([Type.Literal('SUCCESS'), Type.Literal('FAILURE')]),
  error: Type.Optional(Type.String({ maxLength: 1024 }))
})
export type PreheatBlobResult = Static<typeof PreheatBlobResult>

export const ControlResponse = Type.Union([
  Type.Object({ ...Ok, results: Type.Optional(Type.Array(PreheatBlobResult)) }),
  ErrorResponse
])
export type ControlResponse = Static<typeof ControlResponse>

export const PieceRequest = Type.Object({
  digest: Digest,
  index: Index,
  /** How long the parent may wait for a piece it is still fetching, in ms. */
  waitMs: Type.Integer({ minimum: 0, maximum: 120_000 }),
  /** Pieces from `index` on the child would take in one answer (HTTP only); the parent sends the first and as many following ones as it holds. */
  count: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_PIECE_RUN }))
})
export type PieceRequest = Static<typeof PieceRequest>

/**
 * Where else a piece may be had: a peer a busy parent recently sent it to,
 * which holds it or is receiving it. Given with a busy answer, so the child
 * asks that peer next instead of pausing; the piece is checked against the
 * table whoever sends it.
 */
export const PieceHint = Type.Object({
  peerId: PeerId,
  upload: Type.Array(Type.String({ pattern: '^http://[^/?#@\\s]+$', maxLength: 64 }), { minItems: 1, maxItems: 1 })
})
export type PieceHint = Static<typeof PieceHint>
/** Hints in one busy answer. */
export const MAX_PIECE_HINTS = 4

export const PieceHeader = Type.Union([
  Type.Object({ status: Type.Literal('ok'), length: Type.Integer({ minimum: 0, maximum: 64 * 1024 * 1024 }) }),
  Type.Object({
    status: Type.Union([Type.Literal('not-found'), Type.Literal('busy'), Type.Literal('error')]),
    message: Type.Optional(Type.String({ maxLength: 512 })),
    try: Type.Optional(Type.Array(PieceHint, { maxItems: MAX_PIECE_HINTS }))
  })
])
export type PieceHeader = Static<typeof PieceHeader>

/** Parses a JSON message and checks it against its schema; anything else is a ProtocolError. */
export function decode<T extends TSchema> (schema: T, bytes: Uint8Array, what: string): Static<T> {
  let value: unknown
  try {
    value = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'))
  } catch {
    throw new ProtocolError(`${what}: not JSON`)
  }
  return check(schema, value, what)
}

/**
 * Each schema's checker, compiled on first use: an interpreted check of a
 * request walked the schema anew every time (a fifth of a scheduler's CPU per
 * plan). Schemas are module constants, so the map stays small.
 */
const checkers = new WeakMap<TSchema, TypeCheck<TSchema>>()

/** Checks a parsed message against its schema; a ProtocolError naming the first fault when it does not fit. */
export function check<T extends TSchema> (schema: T, value: unknown, what: string): Static<T> {
  let checker = checkers.get(schema)
  if (checker === undefined) {
    checker = TypeCompiler.Compile(schema)
    checkers.set(schema, checker)
  }
  if (!checker.Check(value)) {
    const first = checker.Errors(value).First()
    throw new ProtocolError(`${what}: ${first === undefined ? 'invalid' : `${first.path || '/'} ${first.message}`}`)
  }
  return value as Static<T>
}

export function encode (value: unknown): Uint8Array {
  return Buffer.from(JSON.stringify(value))
}
