import type { ControlCommand, Fact, HostInfo, Load, OriginRef, Report, TaskUpdate } from '../../src/protocol/messages.ts'
import type { Appointment } from '../scheduling/index.ts'
import type { JobRecord } from '../state/index.ts'

/**
 * Every change to the swarm's state, as one event. Replicas share a log of
 * these and each applies all of them, in log order, to its own copy of the
 * state: what one replica learns, every replica knows, without any of them
 * asking a store on the hot path. Events name hosts by peer id, never by the
 * slots a replica numbers them with.
 */
export type SwarmEvent =
  | { type: 'register', host: HostInfo }
  /** `via`: only if the host is still connected through that replica (a dropped session, not a peer that moved). */
  | { type: 'leave', peer: string, via?: string | undefined }
  | { type: 'announce', peer: string, tasks: TaskUpdate[], facts?: Fact[] | undefined, load?: Load | undefined }
  | { type: 'report', peer: string, report: Report }
  /** A host asked where to get pieces of a task: the task exists, and the host is told if its table goes. */
  | { type: 'interest', peer: string, digest: string, size: number, origin?: OriginRef | undefined }
  | { type: 'appoint', peer: string, digest: string, appointment: Appointment }
  | { type: 'seed-failed', digest: string, seed: string }
  | { type: 'verifier-failed', digest: string }
  /** A preheat job started or changed (the replica running it appends these). */
  | { type: 'job', job: JobRecord }
  /** A replica stopped renewing its liveness: the hosts still connected through it are gone. */
  | { type: 'replica-gone', replica: string }

/** An event as the log carries it: who appended it, when, and a number the appender waits on. */
export interface Envelope {
  e: SwarmEvent
  /** Milliseconds since the epoch on the appending replica: every replica applies the event at this time. */
  at: number
  /** The appending replica's id. */
  by: string
  /** Per appender, increasing: lets the appender find the result of its own event. */
  n: number
}

/** Something only the replica that appended an event does: talk to a peer. */
export interface Effect {
  peer: string
  command: ControlCommand
  /** Appended when the peer does not do it, so every replica learns that. */
  onFail?: SwarmEvent | undefined
  /** Why, for the log when it fails. */
  what: string
}
