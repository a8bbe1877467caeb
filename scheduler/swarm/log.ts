import { randomUUID } from 'node:crypto'
import type { AbortOptions } from '../../src/abort.ts'
import type { Envelope, SwarmEvent } from './events.ts'
import type { Outcome } from './machine.ts'

/**
 * The order every replica applies the swarm's events in. Appending resolves
 * with the event's outcome once this replica has applied it, so a request
 * answered after an append sees its own change (and every change logged
 * before it).
 */
export interface SwarmLog {
  /** This replica's id: hosts registered through it are `via` it. */
  readonly replica: string
  /** Whether appends can succeed now. */
  readonly healthy: boolean
  /** Throws StateUnavailableError when the shared store cannot take the event. */
  append: (event: SwarmEvent, options?: AbortOptions) => Promise<Outcome>
  /**
   * Called when this replica's copy of the swarm may have missed events the
   * peers connected to it sent (the store lost its data, or refused appends
   * for a while): those peers should start new sessions and announce again.
   */
  onResync: (listener: () => void) => void
  /**
   * Called for every event applied, whoever appended it, with what applying
   * it decided (the effects a peer must carry out, for the replica that peer
   * is connected through).
   */
  onApplied: (listener: (envelope: Envelope, outcome: Outcome) => void) => void
  start: () => Promise<void>
  stop: () => Promise<void>
}

export type Apply = (envelope: Envelope, local: boolean) => Outcome

/** One scheduler: the log is a function call. */
export function createMemoryLog (apply: Apply): SwarmLog {
  const replica = randomUUID()
  let n = 0
  const applied: Array<(envelope: Envelope, outcome: Outcome) => void> = []
  return {
    replica,
    healthy: true,
    async append (e) {
      const envelope = { e, at: Date.now(), by: replica, n: ++n }
      const outcome = apply(envelope, true)
      for (const listener of applied) listener(envelope, outcome)
      return outcome
    },
    onResync () {},
    onApplied (listener) { applied.push(listener) },
    async start () {},
    async stop () {}
  }
}
