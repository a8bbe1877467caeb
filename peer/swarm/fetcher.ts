import { setTimeout as sleep } from 'node:timers/promises'
import { LRUCache } from 'lru-cache'
import { deadline, type AbortOptions } from '../../src/abort.ts'
import { PeerBusyError, PeerUnavailableError, PieceNotHeldError, ProtocolError, SchedulerUnavailableError, isAbort } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import { Counter, type Registry } from '../../src/metrics.ts'
import { sha256Hex } from '../../src/oci/digest.ts'
import { messages, sig, type P2PNode } from '../../src/p2p/index.ts'
import { PieceSet, pieceBounds } from '../../src/pieces.ts'
import { DigestsResponse, PIECE_PROTOCOL, ParentsResponse, PieceHeader, type ParentInfo } from '../../src/protocol/messages.ts'
import type { PieceHttpClient } from './piece-http.ts'
import type { ReadPiece } from './piece-client.ts'
import type { OriginDirective, PieceSource, PieceSourceContext, RemotePiece, SwarmTask, TableEntry } from './source.ts'
import type { SchedulerClient } from './scheduler-client.ts'

export interface PieceFetcherComponents {
  logger: Logger
  node: P2PNode
  client: SchedulerClient
  metrics?: Registry | undefined
  /** The HTTP data plane; without it every piece goes over libp2p streams. */
  http?: PieceHttpClient | undefined
}

export interface PieceFetcherInit {
  /** Pieces asked about per parents request. Default 64. */
  window?: number
  /** A plan is reused this long before the scheduler is asked again. Default 2 s. */
  planTtlMs?: number
  /** How long a parent may hold a request for a piece it is still fetching from the origin (then the plan is asked again). Default 15 s. */
  inProgressWaitMs?: number
  /** How long a parent that failed us is skipped. Default 30 s. */
  parentBackoffMs?: number
  /** How long a parent that sent bad bytes is never asked again. Default 1 h. */
  barMs?: number
  /**
   * Times a plan is asked for again when the scheduler is connected but did
   * not answer in time, before this node goes to the origin. Default 2.
   */
  planRetries?: number
  /** First pause before asking again; doubled each time, with jitter. Default 500 ms. */
  planRetryDelayMs?: number
  /**
   * How long parents that answer busy (or have not got an in-progress piece
   * yet) are asked again, with growing pauses, before the origin is. Default 20 s.
   */
  busyPatienceMs?: number
  /**
   * How long a read waits for the session with the scheduler to move to
   * another replica before it goes to the origin. Default 10 s; it only
   * waits while the client has replicas left to try.
   */
  failoverWaitMs?: number
}

interface Parent {
  info: ParentInfo
  /**
   * Named by a busy parent, not by the scheduler: its address is that
   * parent's word, so what comes from it cannot be held against the peer id
   * it goes by (a lying parent could pair an honest id with its own address).
   */
  hinted?: boolean
  held: PieceSet | undefined
  fetching: PieceSet | undefined
  /** Pieces it is taking from the origin to confirm an entry it did not write. */
  confirming: PieceSet | undefined
}

interface Plan {
  /** Where it is cached. */
  key: string
  first: number
  last: number
  at: number
  pieceSize: number
  parents: Parent[]
  digests: Map<number, string>
  /** Entries of `digests` only their author vouches for. */
  provisional: Set<number>
  assigned: Set<number>
}

export interface PieceFetcher extends PieceSource {
  /** Whether the scheduler made this node the first fetcher of a piece. */
  isFirstFetcher: (digest: string, index: number) => boolean
  /** Measured throughput per parent (bytes/s), for the load report. */
  parentRates: () => Array<[string, number]>
  /** Drops what was planned for a blob this node no longer holds (its table may be gone too). */
  forget: (digest: string) => void
}

/**
 * Gets pieces from other peers. For each piece it follows the scheduler's
 * plan: fetch it from the best parent holding it (a second parent is asked
 * when the first is slow), wait for a parent still fetching it, or — when
 * this node is the piece's first fetcher — let the origin run take it.
 * Every piece is checked against the swarm's piece table before it is
 * returned; a parent that sends bad bytes is barred and reported.
 */
export function createPieceFetcher (components: PieceFetcherComponents, init: PieceFetcherInit = {}): PieceFetcher {
  const { node, client } = components
  const logger = components.logger.child({ component: 'peer:fetcher' })
  const window = init.window ?? 64
  const planTtlMs = init.planTtlMs ?? 2_000
  const inProgressWaitMs = init.inProgressWaitMs ?? 15_000
  const parentBackoffMs = init.parentBackoffMs ?? 30_000
  const barMs = init.barMs ?? 3_600_000
  const planRetries = init.planRetries ?? 2
  const planRetryDelayMs = init.planRetryDelayMs ?? 500
  const busyPatienceMs = init.busyPatienceMs ?? 20_000
  const failoverWaitMs = init.failoverWaitMs ?? 10_000
  const plans = new LRUCache<string, Plan>({ max: 1024 })
  /** The swarm's piece table as heard, per blob: what origin bytes must match. */
  const tables = new LRUCache<string, Map<number, TableEntry>>({ max: 1024, ttl: 600_000 })
  const learn = (digest: string, entries: ReadonlyArray<readonly [number, string]>, provisional: ReadonlySet<number>): void => {
    if (entries.length === 0) return
    let table = tables.get(digest)
    if (table === undefined) {
      table = new Map()
      tables.set(digest, table)
    }
    for (const [i, sha256] of entries) table.set(i, { sha256, provisional: provisional.has(i) })
  }
  const assigned = new LRUCache<string, Set<number>>({ max: 1024, ttl: 120_000 })
  /** Blobs whose latest plan offered only parents holding all of them (see `PieceSource.settled`). */
  const settled = new LRUCache<string, boolean>({ max: 1024, ttl: 60_000 })
  /** Per blob, when a parent last sent this node one of its pieces: patience with busy parents counts from there. */
  const lastFromParents = new LRUCache<string, number>({ max: 1024, ttl: FIRST_FETCHER_WAIT_MS })
  const failing = new LRUCache<string, true>({ max: 4096, ttl: parentBackoffMs })
  const barred = new LRUCache<string, true>({ max: 4096, ttl: barMs })
  const rates = new LRUCache<string, number>({ max: 1024, ttl: 60_000 })
  let pieceMs = 200
  const registers = components.metrics === undefined ? undefined : [components.metrics]
  const m = registers === undefined
    ? undefined
    : {
        barred: new Counter({ name: 'damselfly_parents_barred_total', help: 'Parents barred after sending a piece that failed verification', registers }),
        bad: new Counter({ name: 'damselfly_peer_pieces_rejected_total', help: 'Pieces from parents that failed verification against the piece table', registers }),
        hedged: new Counter({ name: 'damselfly_pieces_hedged_total', help: 'Slow pieces asked of a second parent', registers }),
        planRetries: new Counter({ name: 'damselfly_scheduler_plan_retries_total', help: 'Plans asked for again because the connected scheduler did not answer in time', registers }),
        fallbacks: new Counter({ name: 'damselfly_swarm_origin_fallbacks_total', help: 'Pieces fetched from the origin because the swarm could not deliver them', labelNames: ['reason'], registers }),
        hints: new Counter({ name: 'damselfly_piece_hints_followed_total', help: 'Peers asked for a piece because a busy parent said it had sent them that piece', registers }),
        parentsBusy: new Counter({ name: 'damselfly_parents_busy_total', help: 'Pauses before asking parents again because they were busy or had not got a piece yet', registers }),
        stillComing: new Counter({ name: 'damselfly_first_fetcher_waits_total', help: 'Waits, past the patience for busy parents, for a first fetcher still taking the blob from the origin (instead of the origin)', registers })
      }

  /**
   * Plans for a whole read and for a range differ (a range needs confirmed
   * entries): cached apart. A reader asks for pieces anywhere within a window
   * ahead of it, so a blob has a plan per block of `window` pieces (by its
   * first piece): one plan per blob was replaced at every piece outside it,
   * and the fleet simulation's peers asked for 32 plans a second each.
   */
  const planKey = (digest: string, whole: boolean, first: number): string => `${digest}${whole ? '' : '#range'}@${Math.floor(first / window)}`

  async function plan (ctx: PieceSourceContext, index: number, exclude: Set<string>, options: AbortOptions): Promise<Plan> {
    const last = Math.max(index, Math.min(ctx.lastWanted, index + window - 1))
    const res = await client.request({
      type: 'parents',
      digest: ctx.task.digest,
      size: ctx.task.size,
      origin: ctx.task.origin,
      first: index,
      last,
      ...(exclude.size > 0 ? { exclude: [...exclude].slice(0, 256) } : {}),
      ...(ctx.whole ? {} : { whole: false })
    }, ParentsResponse, options)
    const p: Plan = {
      key: planKey(ctx.task.digest, ctx.whole, index),
      first: index,
      last,
      at: Date.now(),
      pieceSize: res.pieceSize,
      parents: res.parents.filter(x => x.peerId !== node.peerId).map(info => ({
        info,
        held: info.held === undefined ? undefined : PieceSet.fromBase64(res.pieceCount, info.held),
        fetching: info.fetching === undefined ? undefined : PieceSet.fromBase64(res.pieceCount, info.fetching),
        confirming: info.confirming === undefined ? undefined : PieceSet.fromBase64(res.pieceCount, info.confirming)
      })),
      digests: new Map(res.digests),
      provisional: new Set(res.provisional ?? []),
      assigned: new Set(res.assigned)
    }
    learn(ctx.task.digest, res.digests, p.provisional)
    if (p.assigned.size > 0) {
      const mine = assigned.get(ctx.task.digest) ?? new Set<number>()
      for (const i of p.assigned) mine.add(i)
      assigned.set(ctx.task.digest, mine)
    }
    plans.set(p.key, p)
    settled.set(ctx.task.digest, p.parents.length > 0 && p.assigned.size === 0 && p.parents.every(x => x.info.complete))
    return p
  }

  /**
   * A scheduler that is still connected but did not answer in time is
   * overloaded, not gone. Sending every waiting reader to the origin then is
   * what turns a slow swarm into a stampede on the registry (one bench run on
   * a starved machine: 5.6× the image at N = 16), so the plan is asked for
   * again, spread out, before the origin; a scheduler that is gone (not
   * connected) sends this node to the origin at once.
   */
  async function patientPlan (ctx: PieceSourceContext, index: number, exclude: Set<string>, options: AbortOptions): Promise<Plan> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await plan(ctx, index, exclude, options)
      } catch (err) {
        if (options.signal?.aborted === true || attempt >= planRetries || !schedulerGone(err)) throw err
        // Its session dropped: asked again of the replica it moves to, if it moves.
        if (!client.connected) {
          if (await client.awaitSession({ maxMs: failoverWaitMs, signal: options.signal })) continue
          throw err
        }
        m?.planRetries.inc()
        logger.debug({ err: (err as Error).message, digest: ctx.task.digest, attempt }, 'the scheduler is slow; asking again')
        const delay = planRetryDelayMs * 2 ** attempt
        await sleep(delay / 2 + Math.random() * delay, undefined, options.signal === undefined ? undefined : { signal: options.signal })
      }
    }
  }

  /** A fresh plan covering `index`: one made from its block, or from the block before (a plan spans up to `window` pieces). */
  function cachedPlan (digest: string, index: number, whole: boolean): Plan | undefined {
    for (const from of [index, index - window]) {
      if (from < 0) continue
      const p = plans.get(planKey(digest, whole, from))
      if (p !== undefined && index >= p.first && index <= p.last && Date.now() - p.at <= planTtlMs) return p
    }
    return undefined
  }

  /** The table's entry for a piece, and whether only its author vouches for it. */
  async function expectedDigest (task: SwarmTask, index: number, p: Plan, options: AbortOptions): Promise<{ hex: string, provisional: boolean }> {
    const planned = p.digests.get(index)
    if (planned !== undefined) return { hex: planned, provisional: p.provisional.has(index) }
    // The piece was still being fetched when we planned; its first fetcher announces it as it lands.
    const res = await client.request({ type: 'digests', digest: task.digest, pieces: [index], waitMs: 15_000 }, DigestsResponse, { ...options, waitMs: 15_000 })
    const hex = res.digests.find(([i]) => i === index)?.[1]
    if (hex === undefined) throw new SchedulerUnavailableError(`no piece digest for piece ${index} of ${task.digest}; its bytes cannot be verified`)
    const provisional = res.provisional?.includes(index) === true
    p.digests.set(index, hex)
    if (provisional) p.provisional.add(index)
    learn(task.digest, [[index, hex]], provisional ? new Set([index]) : new Set())
    return { hex, provisional }
  }

  /** The libp2p transport, for parents without an upload port (or when it is turned off). */
  async function viaStream (parent: Parent, task: SwarmTask, index: number, length: number, waitMs: number, signal: AbortSignal): Promise<Buffer> {
    const stream = await node.openStream({ peerId: parent.info.peerId, addrs: parent.info.addrs }, PIECE_PROTOCOL, { signal })
    try {
      // The parent may send the whole piece before we read its header.
      const io = messages(stream, 4096, 2 * length + 8192)
      await io.write({ digest: task.digest, index, waitMs }, { signal })
      const header = await io.read(PieceHeader, 'piece header', { signal })
      if (header.status !== 'ok') {
        const why = `${parent.info.peerId} answered ${header.status} for piece ${index}`
        if (header.status === 'busy') throw new PeerBusyError(why, header.try ?? [])
        if (header.status === 'not-found') throw new PieceNotHeldError(why)
        throw new PeerUnavailableError(why)
      }
      if (header.length !== length) throw new ProtocolError(`${parent.info.peerId} offered ${header.length} bytes for a ${length}-byte piece`)
      const data = Buffer.allocUnsafe(length)
      let off = 0
      for await (const chunk of io.unwrap()) {
        // A list is walked buffer by buffer: flattening it first would copy every byte twice.
        for (const bytes of chunk instanceof Uint8Array ? [chunk] : chunk) {
          if (off + bytes.length > length) throw new ProtocolError(`${parent.info.peerId} sent more than ${length} bytes`)
          data.set(bytes, off)
          off += bytes.length
        }
        if (off === length) break
      }
      if (off !== length) throw new PeerUnavailableError(`${parent.info.peerId} stopped after ${off} of ${length} bytes`)
      await stream.close(sig({ signal })).catch(() => {})
      return data
    } catch (err) {
      stream.abort(err as Error)
      throw err
    }
  }

  /**
   * One piece from one parent, checked against the table; with `extras` (the
   * next pieces, claimed from the caller), a run of them in the same answer,
   * each checked alike. A piece that fails bars the parent and fails the lot.
   */
  async function fetchFrom (parent: Parent, task: SwarmTask, index: number, p: Plan, inProgress: boolean, signal: AbortSignal, extras: readonly number[] = []): Promise<RemotePiece> {
    const started = performance.now()
    const { length } = pieceBounds(index, task.size, p.pieceSize)
    const waitMs = inProgress ? inProgressWaitMs : 0
    const upload = components.http === undefined ? undefined : parent.info.upload
    const http = upload !== undefined && upload.length > 0
    const lengths = [length, ...extras.map(i => pieceBounds(i, task.size, p.pieceSize).length)]
    // Over HTTP a piece may take as long as it keeps coming (a parent's upload shared by many children is slow,
    // and cutting it off only sends the same bytes again, or the child to the origin); it fails once it stops.
    // Cleared once the piece is in: a timer left to run out per piece (two minutes) piled up by the thousand at line rate.
    const limit = deadline([signal], waitMs + (http ? PIECE_LIMIT_MS * lengths.length : Math.max(20_000, length / 1024)), `piece ${index} from ${parent.info.peerId}`)
    let got: ReadPiece[]
    try {
      got = http
        ? await (components.http as PieceHttpClient).fetch({ peerId: parent.info.peerId, upload }, { digest: task.digest, index, waitMs, ...(extras.length > 0 ? { count: lengths.length } : {}) }, extras.length > 0 ? lengths : length, { signal: limit.signal, stall: { firstByteMs: waitMs + STALL_MS, idleMs: STALL_MS } })
        : [{ data: await viaStream(parent, task, index, length, waitMs, limit.signal) }]
    } finally {
      limit.clear()
    }
    const release = (): void => { for (const x of got) x.lease?.release() }
    const pieces: RemotePiece[] = []
    for (let k = 0; k < got.length; k++) {
      const { data, lease } = got[k] as ReadPiece
      const at = k === 0 ? index : extras[k - 1] as number
      const hex = sha256Hex(data)
      let expected: { hex: string, provisional: boolean }
      try {
        expected = await expectedDigest(task, at, p, { signal })
      } catch (err) {
        release()
        throw err
      }
      if (hex !== expected.hex) {
        release()
        m?.bad.inc()
        if (parent.hinted === true) throw new PeerUnavailableError(`piece ${at} from ${parent.info.upload?.[0] ?? ''} (named by a busy parent as ${parent.info.peerId}) failed verification`)
        m?.barred.inc()
        barred.set(parent.info.peerId, true)
        logger.warn({ parent: parent.info.peerId, digest: task.digest, piece: at }, 'a parent sent a piece that failed verification; barring it')
        client.report({ kind: 'bad-piece', parent: parent.info.peerId, digest: task.digest, piece: at })
        throw new PeerUnavailableError(`piece ${at} from ${parent.info.peerId} failed verification`)
      }
      // A confirmer's bytes came from the origin, not from the entry's author: equal to it, they vouch for it.
      pieces.push({ kind: 'piece', data, sha256: hex, trusted: !expected.provisional || parent.confirming?.has(at) === true, lease })
    }
    const ms = performance.now() - started
    if (!inProgress) {
      pieceMs = pieceMs * 0.8 + ms / got.length * 0.2
      const bytes = lengths.slice(0, got.length).reduce((a, b) => a + b, 0)
      const rate = bytes / Math.max(1, ms) * 1000
      rates.set(parent.info.peerId, (rates.get(parent.info.peerId) ?? rate) * 0.7 + rate * 0.3)
    }
    const [first, ...more] = pieces as [RemotePiece, ...RemotePiece[]]
    return more.length > 0 ? { ...first, more } : first
  }

  /**
   * The pieces after `index` worth asking `parent` for in the same answer,
   * claimed from the reader: consecutive, within the plan and what the reader
   * wants, held by the parent, with table entries this read may use, and
   * nobody here holding or getting them.
   */
  function claimRun (ctx: PieceSourceContext, index: number, parent: Parent, p: Plan): number[] {
    const out: number[] = []
    const ahead = ctx.ahead
    if (ahead === undefined || pieceMs > RUN_BELOW_MS || components.http === undefined || parent.info.upload === undefined || parent.info.upload.length === 0) return out
    const last = Math.min(index + PIECE_RUN - 1, ctx.lastWanted, p.last)
    for (let i = index + 1; i <= last; i++) {
      const holds = parent.info.complete || parent.held?.has(i) === true
      if (!holds || !p.digests.has(i) || (!ctx.whole && p.provisional.has(i)) || !ahead.claim(i)) break
      out.push(i)
    }
    return out
  }

  /**
   * Tries the parents in turn. While one is slow (well past the usual piece
   * time) the next is asked too, and the first verified answer wins. A busy
   * parent's hints (peers it sent the piece to) join the end of the line when
   * `hintsUsable`; they may still be receiving it, so each is asked to wait.
   */
  async function fromParents (ctx: PieceSourceContext, index: number, p: Plan, holders: Parent[], fetchers: Parent[], hintsUsable: boolean, options: AbortOptions): Promise<RemotePiece | 'later' | undefined> {
    const { task } = ctx
    const order = holderOrder(index, holders, fetchers, x => x.info.seed)
    let hinted = 0
    /** Peers a busy parent sent the piece to, asked next as parents that may still be receiving it. */
    const follow = (hints: ReadonlyArray<{ peerId: string, upload: string[] }>): void => {
      for (const hint of hints) {
        if (hinted >= MAX_HINTED || hint.peerId === node.peerId || barred.has(hint.peerId) || failing.has(hint.peerId)) continue
        if (order.some(x => x.info.peerId === hint.peerId)) continue
        order.push({ info: { peerId: hint.peerId, addrs: [], upload: hint.upload, seed: false, complete: false }, held: undefined, fetching: undefined, confirming: undefined, hinted: true })
        hinted++
        m?.hints.inc()
      }
    }
    const race = new AbortController()
    const signal = AbortSignal.any([race.signal, ...(options.signal === undefined ? [] : [options.signal])])
    const attempts: Array<Promise<RemotePiece | undefined>> = []
    /** How to hand back the pieces a run brought, should it not be the one kept. */
    const runs = new Map<RemotePiece, (from: number) => void>()
    let resolveFirst!: (value: RemotePiece | undefined) => void
    const first = new Promise<RemotePiece | undefined>(resolve => { resolveFirst = resolve })
    let failed = 0
    let next = 0
    /** Parents that were busy, or had not got the piece yet: worth asking again, not worth avoiding. */
    let later = 0
    const launch = (): void => {
      if (next >= order.length) return
      const parent = order[next++] as Parent
      const inProgress = !(parent.info.complete || parent.held?.has(index) === true)
      // A parent that holds what follows sends it in the same answer; a hedge finds those claimed already.
      const extras = inProgress || parent.hinted === true ? [] : claimRun(ctx, index, parent, p)
      const unclaim = (from: number): void => { for (const i of extras.slice(from)) ctx.ahead?.unclaim(i) }
      const attempt = fetchFrom(parent, task, index, p, inProgress, signal, extras).then(piece => {
        // What the parent did not send comes another way.
        unclaim(piece.more?.length ?? 0)
        runs.set(piece, unclaim)
        resolveFirst(piece)
        return piece
      }, (err: unknown) => {
        unclaim(0)
        // The scheduler going away mid-piece (its digest unknown yet) says nothing about the parent.
        if (err instanceof PeerBusyError || (inProgress && err instanceof PieceNotHeldError) || schedulerGone(err)) {
          if (err instanceof PeerBusyError && hintsUsable) follow(err.hints)
          later++
        } else if (!isAbort(err)) {
          logger.debug({ parent: parent.info.peerId, piece: index, err: (err as Error).message }, 'parent failed a piece')
          if (parent.hinted !== true && !barred.has(parent.info.peerId)) failing.set(parent.info.peerId, true)
        }
        failed++
        if (failed === order.length) resolveFirst(undefined)
        else if (failed === next) launch()
        return undefined
      })
      attempts.push(attempt)
      // Hedge a holder that is taking too long, and a hinted peer (which may be a member stalling on purpose);
      // never hedge a wait for a piece the scheduler says is on its way.
      if (!inProgress || parent.hinted === true) {
        const timer = setTimeout(() => {
          if (next < order.length && failed < next) {
            m?.hedged.inc()
            launch()
          }
        }, Math.min(5_000, Math.max(750, pieceMs * 4)) * (1 + extras.length))
        timer.unref()
        void attempt.finally(() => { clearTimeout(timer) })
      }
    }
    launch()
    const winner = await first
    race.abort()
    // A second parent's copy that arrived anyway is not needed.
    for (const settled of await Promise.allSettled(attempts)) {
      const piece = settled.status === 'fulfilled' ? settled.value : undefined
      if (piece === undefined || piece === winner) continue
      piece.lease?.release()
      for (const x of piece.more ?? []) x.lease?.release()
      runs.get(piece)?.(0)
    }
    return winner ?? (later > 0 ? 'later' : undefined)
  }

  function forgetPlans (digest: string): void {
    for (const key of [...plans.keys()]) if (key.startsWith(`${digest}#`) || key.startsWith(`${digest}@`)) plans.delete(key)
    tables.delete(digest)
  }

  /**
   * The plan-and-fetch rounds of `fetch`. Parents that were busy are asked
   * again, after a pause, for `busyPatienceMs` from the later of this piece's
   * first look and the last piece of the blob a parent sent here, and never
   * past `FIRST_FETCHER_WAIT_MS`. While the swarm keeps delivering the blob,
   * a piece every parent is busy with is still coming: with a 48 MiB layer
   * behind a 1 MiB/s origin, children gave up on the busy seed after 20 s
   * and read from the origin beside it: emulated cluster, 16 nodes, origin
   * 2.1–2.25× the layer and slowest 1.86–2.01× T*, now 1.000× and 1.33×. A
   * node nobody sends anything for that long goes to the origin as before.
   * The cost: a member that holds a piece nobody else has and answers busy
   * for it, while others send the rest, holds that piece up to the bound, as
   * a first fetcher trickling out other pieces already could.
   */
  async function fetchPatiently (ctx: PieceSourceContext, index: number, options: AbortOptions): Promise<RemotePiece | OriginDirective> {
    const { task } = ctx
    const exclude = new Set<string>()
    /** How much of the blob each first fetcher held when this piece last looked, and since when. */
    const progress = new Map<string, Progress>()
    const began = Date.now()
    const patienceEnds = (): number => patienceEnd(began, lastFromParents.get(task.digest), busyPatienceMs)
    let pauses = 0
    for (let round = 0; round < 3; round++) {
      let p = round === 0 ? cachedPlan(task.digest, index, ctx.whole) : undefined
      try {
        p ??= await patientPlan(ctx, index, exclude, options)
      } catch (err) {
        if (options.signal?.aborted === true) throw err
        logger.debug({ err: (err as Error).message, digest: task.digest }, 'no plan from the scheduler; using the origin')
        m?.fallbacks.inc({ reason: 'no-scheduler' })
        return { kind: 'origin', upTo: ctx.lastWanted }
      }
      if (p.assigned.has(index)) {
        let upTo = index
        while (p.assigned.has(upTo + 1)) upTo++
        return { kind: 'origin', upTo }
      }
      const usable = (x: Parent): boolean => !barred.has(x.info.peerId) && !failing.has(x.info.peerId) && !exclude.has(x.info.peerId)
      // A range takes a piece whose entry is not confirmed only from a confirmer.
      const confirmedEntry = ctx.whole || (p.digests.has(index) && !p.provisional.has(index))
      const holders = confirmedEntry ? p.parents.filter(x => usable(x) && (x.info.complete || x.held?.has(index) === true)) : []
      const fetchers = p.parents.filter(x => usable(x) && !holders.includes(x) && (confirmedEntry ? x.fetching : x.confirming)?.has(index) === true)
      /** Whether its first fetchers were still landing pieces when patience ran out: they are not passed over. */
      let coming = false
      if (holders.length + fetchers.length > 0) {
        // A hinted peer's bytes come from whoever sent them: fine for a whole read (or a confirmed entry), not for a range that needs a confirmer.
        const piece = await fromParents(ctx, index, p, holders, fetchers, confirmedEntry && components.http !== undefined, options)
        if (piece === 'later') {
          const delay = Math.min(2_000, 100 * 2 ** pauses++)
          const pause = delay / 2 + Math.random() * delay
          const left = patienceEnds() - Date.now()
          if (left > 0) await sleep(Math.min(pause, left), undefined, options)
          options.signal?.throwIfAborted()
          // A piece of the blob that came in meanwhile moves the end of patience on.
          if (pause <= left || patienceEnds() > Date.now()) {
            m?.parentsBusy.inc()
            plans.delete(p.key)
            round--
            continue
          }
          // Past patience, a first fetcher still landing pieces of the blob is waited for again: it is taking
          // this piece from the origin too, and a second reader there only splits the origin's uplink. With a
          // slow origin and a large blob the pieces far ahead came after the patience ran out, every child
          // went to the origin for them, and the swarm fell apart (fleet simulation: origin 7.5× a 256 MiB
          // layer behind 4 MiB/s, nobody done in 8× T*; waiting, all done and no origin fallbacks). One that
          // stopped landing pieces is left as before; the scheduler drops it in any case once its lease lapses.
          // Bounded all the same: a member appointed first fetcher could trickle out other pieces to keep the crowd waiting.
          coming = fetchers.length > 0 && Date.now() - began < FIRST_FETCHER_WAIT_MS && stillComing(progress, fetchers, Date.now(), inProgressWaitMs)
          if (coming && holders.length === 0) {
            m?.stillComing.inc()
            await sleep(delay / 2 + Math.random() * delay, undefined, options)
            plans.delete(p.key)
            round--
            continue
          }
        } else if (piece !== undefined) {
          lastFromParents.set(task.digest, Date.now())
          return piece
        }
        options.signal?.throwIfAborted()
      }
      for (const x of p.parents) if (!usable(x)) exclude.add(x.info.peerId)
      // Busy holders are passed over in the next round; a first fetcher still landing pieces is not.
      for (const x of coming ? holders : [...holders, ...fetchers]) exclude.add(x.info.peerId)
      plans.delete(p.key)
    }
    m?.fallbacks.inc({ reason: 'no-parent' })
    return { kind: 'origin', upTo: index }
  }

  return {
    isFirstFetcher (digest, index) {
      return assigned.get(digest)?.has(index) ?? false
    },
    parentRates () {
      return [...rates.entries()]
    },
    forget (digest) {
      assigned.delete(digest)
      settled.delete(digest)
      forgetPlans(digest)
    },
    originFailed (task) {
      assigned.delete(task.digest)
      forgetPlans(task.digest)
      client.report({ kind: 'origin-failed', digest: task.digest, code: 'origin' })
    },
    mismatch (task, evidence) {
      assigned.delete(task.digest)
      forgetPlans(task.digest)
      client.report({ kind: 'blob-mismatch', digest: task.digest, ...evidence })
    },
    expected (digest, index) {
      return tables.get(digest)?.get(index)
    },
    settled (digest) {
      return settled.get(digest) === true
    },
    async fetch (ctx, index, options): Promise<RemotePiece | OriginDirective> {
      // A session that just dropped while other replicas are listed is back in about a second:
      // waiting for it beats sending the rest of the blob to the origin.
      if (!client.connected && !(await client.awaitSession({ maxMs: failoverWaitMs, signal: options.signal }))) {
        m?.fallbacks.inc({ reason: 'no-scheduler' })
        return { kind: 'origin', upTo: ctx.lastWanted }
      }
      // Parents that were busy or not ready yet are asked again, after a pause, before the origin is.
      return fetchPatiently(ctx, index, options)
    }
  }
}

/** How much of a blob a first fetcher held at a look, and when that last grew (or was first seen). */
export interface Progress {
  held: number
  since: number
}

/**
 * Whether any of these first fetchers has landed a piece of the blob within
 * `stallMs`, as far as the looks so far show (a first look counts as one).
 * `progress` keeps what each held, by peer id.
 */
export function stillComing (progress: Map<string, Progress>, fetchers: ReadonlyArray<{ info: { peerId: string }, held: { size: number } | undefined }>, now: number, stallMs: number): boolean {
  let more = false
  for (const x of fetchers) {
    const held = x.held?.size ?? 0
    let seen = progress.get(x.info.peerId)
    if (seen === undefined || held > seen.held) {
      seen = { held, since: now }
      progress.set(x.info.peerId, seen)
    }
    if (now - seen.since < stallMs) more = true
  }
  return more
}

/**
 * When patience with busy parents runs out for a piece first looked at
 * `began`: `patienceMs` after the later of that and the last piece of the
 * blob a parent sent (`lastFromParents`, if any), and never past
 * `FIRST_FETCHER_WAIT_MS` after `began`.
 */
export function patienceEnd (began: number, lastFromParents: number | undefined, patienceMs: number): number {
  return Math.min(Math.max(began, lastFromParents ?? -Infinity) + patienceMs, began + FIRST_FETCHER_WAIT_MS)
}

/** Longest a piece waits past the patience with busy parents: for a first fetcher still landing pieces (a 1 GiB layer at 6 MiB/s), or while parents keep sending others. */
export const FIRST_FETCHER_WAIT_MS = 180_000

/** A piece response that goes quiet this long fails. */
const STALL_MS = 10_000
/** However slowly it comes, a piece over HTTP takes no longer than this. */
const PIECE_LIMIT_MS = 120_000

/**
 * Pieces one request to a parent that holds them may bring (`MAX_PIECE_RUN`
 * at most). Each is still its own verification unit; the run saves the
 * request, its round trip and the work each answer costs both ends.
 */
const PIECE_RUN = 4
/**
 * Runs are asked for only while pieces take less than this: there a request
 * costs about as much as its bytes (one hop on loopback: the parent's CPU
 * per MiB 0.85–1.02 ms with runs of 4, 1.03–1.30 without). Behind slow links
 * a run would only hold back the pieces it brought until the last is in, and
 * other children wait for them.
 */
const RUN_BELOW_MS = 100

/** Peers named by busy parents that one piece's race may add to its parents. */
const MAX_HINTED = 16

/** Holders other than seeds tried before seeds; consecutive pieces spread over them. */
const SPREAD = 8

/**
 * The order a piece is asked of its parents: peers holding it, consecutive
 * pieces spread over the best few of them; then seeds; then parents still
 * fetching it. A seed's upload is what every new piece passes through once:
 * a piece some peer already holds is worth taking from that peer (a fleet
 * simulation of 200 peers sent about half of all requests to the seed and
 * left three quarters of the peers' uploads idle, p50 3.8× the lower bound;
 * with seeds last, 3.65×, and 2.95× with the scheduler's ranking by the
 * piece asked for).
 */
export function holderOrder<P> (index: number, holders: P[], fetchers: P[], isSeed: (parent: P) => boolean): P[] {
  const peers = holders.filter(x => !isSeed(x))
  const seeds = holders.filter(isSeed)
  const rot = index % Math.max(1, Math.min(peers.length, SPREAD))
  return [...peers.slice(rot), ...peers.slice(0, rot), ...seeds, ...fetchers]
}

/** The scheduler could not answer (gone, or it lost this peer's session), as opposed to the parent failing. */
function schedulerGone (err: unknown): boolean {
  if (err instanceof SchedulerUnavailableError) return true
  const code = (err as { code?: unknown }).code
  return code === 'DF_ERR_NOT_REGISTERED' || code === 'DF_ERR_STATE_UNAVAILABLE'
}
