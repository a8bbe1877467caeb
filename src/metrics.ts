import { Registry, collectDefaultMetrics } from 'prom-client'

export { Counter, Gauge, Histogram, Registry } from 'prom-client'

/** Every metric damselfly exports starts with this. */
export const METRIC_PREFIX = 'damselfly_'

/**
 * One registry per process (never prom-client's global one), so tests can run
 * several components side by side without their counters colliding.
 */
export function createMetricsRegistry (labels: Record<string, string> = {}, init: { processMetrics?: boolean } = {}): Registry {
  const registry = new Registry()
  registry.setDefaultLabels(labels)
  if (init.processMetrics === true) collectDefaultMetrics({ register: registry, prefix: METRIC_PREFIX })
  return registry
}
