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

/** A table dropped on someone's word, kept until a new table for the digest settles who lied. */
interface Dispute {
  digests: Buffer
  known: Uint8Array
  pieceCount: number
  authors: string[]
  reporter: string
  at: number
}

export type MismatchOutcome =
  | { action: 'ignored', why: string }
  | { action: 'dropped', task: TaskRecord, holders: HostRecord[], authors: string[] }

export interface TrustKeeper {
  /**
   * A child says `parent` sent bytes that failed the table. One member's word
   * must not take an honest parent out of the swarm, so the parent is barred
   * when `badPieceReporters` different hosts have said so (the reporting
   * child stops using it at once either way).
   */
  badPiece: (reporter: HostRecord, parent: HostRecord) => boolean
  /**
   * A member says a task's table is wrong. A certified table (every entry
   * vouched for by someone other than its author) stands whatever is said.
   * A provisional one is dropped — holders evict, its authors are barred —
   * and kept aside: once a new table for the digest is certified, equal
   * tables mean the report was false, and the reporter is barred instead.
   */
  mismatch: (reporter: HostRecord, digest: string, piece: number | undefined) => MismatchOutcome
  /** A task's table was just certified: settle the disputes about its digest. */
  certified: (task: TaskRecord) => void
  isBarred: (host: HostRecord) => boolean
}

export function createTrustKeeper (components: { state: SwarmState, logger: Logger }, init: TrustInit = {}): TrustKeeper {
  const { state, logger } = components
  const barMs = init.barMs ?? 600_000
  const needed = init.badPieceReporters ?? 2
  const now = init.now ?? Date.now
  /** parent peer id → reporter peer id → when. */
  const badReports = new LRUCache<string, Map<string, number>>({ max: 16_384 })
  const disputes = new LRUCache<string, Dispute[]>({ max: 4096, ttl: 6 * 3_600_000 })

  const bar = (peerId: string, until: number): void => {
    const host = state.hostByPeer(peerId)
    if (host !== undefined) host.barredUntil = Math.max(host.barredUntil, until)
  }

  return {
    isBarred: (host) => host.barredUntil > now(),

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

    mismatch (reporter, digest, piece) {
      const task = state.task(digest)
      if (task === undefined) return { action: 'ignored', why: 'no such task' }
      if (isCertified(task)) return { action: 'ignored', why: 'the table is certified' }
      if (piece !== undefined && task.confirmed.has(piece)) return { action: 'ignored', why: `piece ${piece} is confirmed` }
      const authors = [...new Set(task.author)].filter(a => a !== 0).map(a => state.hostBySlot(a - 1)?.info.peerId)
        .filter((p): p is string => p !== undefined && p !== reporter.info.peerId)
      // A host doubting a table it wrote alone has nobody to accuse: the table just goes.
      if (authors.length > 0) {
        const list = disputes.get(digest) ?? []
        list.push({ digests: Buffer.from(task.digests), known: Buffer.from(task.known.toBase64(), 'base64'), pieceCount: task.pieceCount, authors, reporter: reporter.info.peerId, at: now() })
        disputes.set(digest, list.slice(-8))
      }
      const holders = [...task.complete, ...task.partial.keys()].map(s => state.hostBySlot(s)).filter((h): h is HostRecord => h !== undefined)
      for (const author of authors) bar(author, now() + barMs)
      state.dropTask(digest)
      return { action: 'dropped', task, holders, authors }
    },

    certified (task) {
      const list = disputes.get(task.digest)
      if (list === undefined) return
      disputes.delete(task.digest)
      for (const d of list) {
        let equal = d.pieceCount === task.pieceCount
        for (let i = 0; equal && i < d.pieceCount; i++) {
          if (!bitSet(d.known, i)) continue
          if (!d.digests.subarray(i * 32, i * 32 + 32).equals(task.digests.subarray(i * 32, i * 32 + 32))) equal = false
        }
        if (equal) {
          logger.warn({ digest: task.digest, reporter: d.reporter, authors: d.authors }, 'a reported table turned out right: the reporter is barred, its authors cleared')
          bar(d.reporter, now() + barMs)
          for (const a of d.authors) {
            const host = state.hostByPeer(a)
            if (host !== undefined && host.info.peerId !== d.reporter) host.barredUntil = 0
          }
        } else {
          logger.warn({ digest: task.digest, authors: d.authors }, 'a reported table turned out wrong: its authors stay barred')
          for (const a of d.authors) bar(a, now() + barMs)
        }
      }
    }
  }
}

/** PieceSet's serialised layout: bit i of byte i >> 3. */
function bitSet (bits: Uint8Array, i: number): boolean {
  return (((bits[i >> 3] ?? 0) >> (i & 7)) & 1) === 1
}
