import type { Logger } from '../../src/logger.ts'
import type { Registry } from '../../src/metrics.ts'
import { createScheduling, type Scheduling, type SchedulingInit } from '../scheduling/index.ts'
import { createMemoryState, type StateInit, type SwarmState } from '../state/index.ts'
import { createEventClock } from './clock.ts'
import { createMemoryLog, type SwarmLog } from './log.ts'
import { createMachineCounters, createSwarmMachine, type SwarmMachine } from './machine.ts'
import { createRedisLog, type RedisLogInit } from './redis-log.ts'
import { createTrustKeeper, type TrustInit, type TrustKeeper } from './trust.ts'

export interface Swarm {
  state: SwarmState
  trust: TrustKeeper
  scheduling: Scheduling
  machine: SwarmMachine
  log: SwarmLog
}

export interface SwarmInit {
  /** `memory` (one scheduler) or a Redis URL shared by replicas. */
  state: string
  redis?: Omit<RedisLogInit, 'url'> | undefined
  scheduling?: Omit<SchedulingInit, 'now'> | undefined
  trust?: Omit<TrustInit, 'now'> | undefined
  stateInit?: Omit<StateInit, 'now'> | undefined
}

/**
 * The swarm in dependency order: a state, the rules that change it (trust,
 * appointments, the machine applying events), and the log that orders the
 * changes — a function call for one scheduler, a Redis stream for replicas.
 */
export function createSwarm (components: { logger: Logger, metrics?: Registry | undefined }, init: SwarmInit): Swarm {
  const { logger } = components
  const clock = createEventClock()
  const state = createMemoryState({ ...init.stateInit, now: clock.now })
  const trust = createTrustKeeper({ state, logger }, { ...init.trust, now: clock.now })
  const scheduling = createScheduling(state, { ...init.scheduling, now: clock.now })
  const machine = createSwarmMachine({ logger, state, trust, at: clock.at, counters: components.metrics === undefined ? undefined : createMachineCounters([components.metrics]) })
  const log = init.state === 'memory'
    ? createMemoryLog(machine.apply)
    : createRedisLog({ logger, apply: machine.apply, snapshot: machine.snapshot, load: machine.load, clear: machine.clear }, { ...init.redis, url: init.state })
  return { state, trust, scheduling, machine, log }
}
