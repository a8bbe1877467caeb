import { createHash } from 'node:crypto'
import { LRUCache } from 'lru-cache'
import type { Logger } from '../../src/logger.ts'
import { isCertified, type HostRecord, type SwarmState, type TaskRecord } from '../state/index.ts'

export interface TrustInit {
  /** How long a barred host stays out of parent lists and appointments. Default 10 min. */
  barMs?: number
  /** Distinct reporters it takes to bar a parent for bad pieces. Default 2. */
  badPieceReporters?: number
  now?: () => number
}

/**
 * A table reset on someone's word. Its entries are kept aside until new
 * ones for the same pieces, written by hosts that are neither the reporter
 * nor the entries' authors, show who was lying.
 */
interface Dispute {
  /** Entry → its SHA-256 and author (peer id) in the table that was reset. */
  entries: Map<number, { hex: string, author: string }>
  reporter: string
  /** Entries a new, independent fetch has matched so far. */
  matched: Set<number>
}

export type MismatchOutcome =
  | { action: 'ignored', why: string }
  /** `holders`: every host that holds or lately asked for pieces of it, to be told to drop them. */
  | { action: 'reset', task: TaskRecord, holders: HostRecord[], authors: string[] }

export interface Verdict {
  digest: string
  /** `author`: an entry differed from an independent fetch; `reporter`: every entry matched one. */
  lied: 'author' | 'reporter'
  liar: string
  cleared: string[]
}

export interface TrustKeeper {
  /**
   * A child says `parent` sent bytes that failed the table. One member's word
   * must not take an honest parent out of the swarm, so the parent is barred
   * when `badPieceReporters` different hosts have said so (the reporting
   * child stops using it at once either way).
   */
  badPiece: (reporter: HostRecord, parent: HostRecord) => boolean
  /**
   * A member says a task's table is wrong (its whole digest failed, or its
   * origin bytes for a piece differ). A certified table, or a confirmed entry,
   * stands whatever is said; so does a table the report was not about. A
   * provisional one is reset — holders evict and its authors are barred —
   * and the dispute is kept until independent fetches settle it.
   */
  mismatch: (reporter: HostRecord, report: { digest: string, piece?: number | undefined, sha256?: string | undefined, table?: string | undefined }) => MismatchOutcome
  /**
   * `host` vouched for pieces of a task (took them from the origin, or
   * verified the whole blob). Where it is neither the reporter nor the author
   * of a disputed entry, each match speaks for that author, and one
   * difference convicts it; once every old entry is matched, the reporter
   * lied. Returns the verdicts reached.
   */
  observed: (task: TaskRecord, host: HostRecord, pieces: ReadonlyArray<readonly [number, string]>) => Verdict[]
  isBarred: (host: HostRecord) => boolean
  clear: () => void
  /** Reports and open disputes as plain data, for a replica that joins later. */
  snapshot: () => TrustSnapshot
  load: (snapshot: TrustSnapshot) => void
}

export interface TrustSnapshot {
  badReports: Array<[string, Array<[string, number]>]>
  disputes: Array<[string, Array<{ entries: Array<[number, { hex: string, author: string }]>, reporter: string, matched: number[] }>]>
}

export function createTrustKeeper (components: { state: SwarmState, logger: Logger }, init: TrustInit = {}): TrustKeeper {
  const { state, logger } = components
  const barMs = init.barMs ?? 600_000
  const needed = init.badPieceReporters ?? 2
  const now = init.now ?? Date.now
  /** parent peer id → reporter peer id → when. */
  const badReports = new LRUCache<string, Map<string, number>>({ max: 16_384 })
  const disputes = new LRUCache<string, Dispute[]>({ max: 4096, ttl: 6 * 3_600_000 })

  const bar = (peerId: string): void => {
    const host = state.hostByPeer(peerId)
    if (host !== undefined) host.barredUntil = Math.max(host.barredUntil, now() + barMs)
  }
  const unbar = (peerId: string): void => {
    const host = state.hostByPeer(peerId)
    if (host !== undefined) host.barredUntil = 0
  }
  const entry = (task: TaskRecord, i: number): string => task.digests.toString('hex', i * 32, i * 32 + 32)

  return {
    isBarred: (host) => host.barredUntil > now(),

    clear () {
      badReports.clear()
      disputes.clear()
    },

    snapshot: () => ({
      badReports: [...badReports.entries()].reverse().map(([parent, by]) => [parent, [...by]]),
      disputes: [...disputes.entries()].reverse().map(([digest, list]) => [digest, list.map(d => ({ entries: [...d.entries], reporter: d.reporter, matched: [...d.matched] }))])
    }),

    load (snapshot) {
      badReports.clear()
      disputes.clear()
      for (const [parent, by] of snapshot.badReports) badReports.set(parent, new Map(by))
      for (const [digest, list] of snapshot.disputes) disputes.set(digest, list.map(d => ({ entries: new Map(d.entries), reporter: d.reporter, matched: new Set(d.matched) })))
    },

    badPiece (reporter, parent) {
      const t = now()
      let reports = badReports.get(parent.info.peerId)
      if (reports === undefined) {
        reports = new Map()
        badReports.set(parent.info.peerId, reports)
      }
      for (const [who, at] of reports) if (t - at > barMs) reports.delete(who)
      reports.set(reporter.info.peerId, t)
      if (reports.size < needed) return false
      parent.barredUntil = t + barMs
      return true
    },

    mismatch (reporter, { digest, piece, sha256, table }) {
      const task = state.task(digest)
      if (task === undefined || task.known.size === 0) return { action: 'ignored', why: 'no table' }
      if (isCertified(task)) return { action: 'ignored', why: 'the table is certified' }
      if (piece !== undefined) {
        if (piece >= task.pieceCount || !task.known.has(piece)) return { action: 'ignored', why: `the table has no entry for piece ${piece}` }
        if (task.confirmed.has(piece)) return { action: 'ignored', why: `piece ${piece} is confirmed` }
        // A report about an entry since replaced: the table and the origin agree now.
        if (sha256 !== undefined && entry(task, piece) === sha256) return { action: 'ignored', why: `the entry for piece ${piece} agrees with the origin` }
      }
      if (table !== undefined && (!task.known.complete || createHash('sha256').update(task.digests).digest('hex') !== table)) {
        return { action: 'ignored', why: 'the report is about another table' }
      }
      const entries = new Map<number, { hex: string, author: string }>()
      for (const i of task.known) {
        const author = state.hostBySlot((task.author[i] ?? 0) - 1)?.info.peerId
        if (author !== undefined && author !== reporter.info.peerId) entries.set(i, { hex: entry(task, i), author })
      }
      const authors = [...new Set([...entries.values()].map(e => e.author))]
      // A host doubting only entries it wrote itself has nobody to accuse: the table just goes.
      if (entries.size > 0) {
        const list = disputes.get(digest) ?? []
        list.push({ entries, reporter: reporter.info.peerId, matched: new Set() })
        disputes.set(digest, list.slice(-8))
      }
      for (const author of authors) bar(author)
      const holders = [...new Set([...task.complete, ...task.partial.keys(), ...task.interested])]
        .map(s => state.hostBySlot(s)).filter((h): h is HostRecord => h !== undefined)
      state.resetTable(task)
      return { action: 'reset', task, holders, authors }
    },

    observed (task, host, pieces) {
      const list = disputes.get(task.digest)
      if (list === undefined) return []
      const who = host.info.peerId
      const verdicts: Verdict[] = []
      const open: Dispute[] = []
      for (const d of list) {
        let liar: string | undefined
        // Only a host outside the dispute settles anything.
        if (who !== d.reporter) {
          for (const [i, hex] of pieces) {
            const old = d.entries.get(i)
            if (old === undefined || old.author === who) continue
            if (old.hex === hex) d.matched.add(i)
            else liar = old.author
          }
        }
        const authors = [...new Set([...d.entries.values()].map(e => e.author))]
        if (liar !== undefined) {
          logger.warn({ digest: task.digest, liar, reporter: d.reporter, by: who }, 'an independent fetch differs from a reported table: its author lied')
          bar(liar)
          const cleared = [d.reporter, ...authors.filter(a => a !== liar)]
          for (const a of cleared) unbar(a)
          verdicts.push({ digest: task.digest, lied: 'author', liar, cleared })
        } else if (d.matched.size === d.entries.size) {
          logger.warn({ digest: task.digest, liar: d.reporter, authors, by: who }, 'independent fetches match a reported table: the report was false')
          bar(d.reporter)
          for (const a of authors) unbar(a)
          verdicts.push({ digest: task.digest, lied: 'reporter', liar: d.reporter, cleared: authors })
        } else {
          open.push(d)
        }
      }
      if (open.length === 0) disputes.delete(task.digest)
      else disputes.set(task.digest, open)
      return verdicts
    }
  }
}
