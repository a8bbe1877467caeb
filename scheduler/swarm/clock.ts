/**
 * The time the swarm's state sees. While an event is applied it is the
 * event's own time, so every replica applying the log computes the same
 * leases and bars; otherwise it is the wall clock.
 */
export interface EventClock {
  now: () => number
  at: <T>(at: number, fn: () => T) => T
}

export function createEventClock (wall: () => number = Date.now): EventClock {
  let current: number | undefined
  return {
    now: () => current ?? wall(),
    at (at, fn) {
      const outer = current
      current = at
      try {
        return fn()
      } finally {
        current = outer
      }
    }
  }
}
