import { Registry, collectDefaultMetrics } from 'prom-client'

export { Counter, Gauge, Histogram, Registry } from 'prom-client'

/** Every metric damselfly exports starts with this. */
export const METRIC_PREFIX = 'damselfly_'

/**
 * How often the event loop's delay is sampled. prom-client's default, 10 ms,
 * woke every idle process 100 times a second: an idle peer spent 5–8 ms of
 * CPU per second on it, and the 32 peers of the emulated cluster a tenth of
 * the machine before any pull. A stall shorter than this may go unseen; a
 * loop that is slow for longer shows in the lag quantiles as before.
 */
const EVENT_LOOP_RESOLUTION_MS = 100

/**
 * One registry per process (never prom-client's global one), so tests can run
 * several components side by side without their counters colliding.
 */
export function createMetricsRegistry (labels: Record<string, string> = {}, init: { processMetrics?: boolean } = {}): Registry {
  const registry = new Registry()
  registry.setDefaultLabels(labels)
  if (init.processMetrics === true) collectDefaultMetrics({ register: registry, prefix: METRIC_PREFIX, eventLoopMonitoringPrecision: EVENT_LOOP_RESOLUTION_MS })
  return registry
}
