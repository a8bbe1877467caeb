import { pino } from 'pino'
import type { Logger as PinoLogger, DestinationStream } from 'pino'

export type Logger = PinoLogger

/**
 * Header and field paths that may carry credentials. They are censored in
 * every log line, whatever component writes it (DESIGN.md: credentials are
 * never logged).
 */
export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers["proxy-authorization"]',
  'req.headers.cookie',
  'headers.authorization',
  'authorization',
  'credentials',
  'password',
  'token',
  'clusterSecret',
  '*.authorization',
  '*.password',
  '*.token'
]

export interface LoggerInit {
  /** pino level name; default `info`. */
  level?: string
  /** Where lines go; default stdout. Tests pass a stream to capture them. */
  destination?: DestinationStream
  /** Fields on every line, e.g. `{ component: 'peer', node: 'node-1' }`. */
  base?: Record<string, unknown>
}

export function createLogger (init: LoggerInit = {}): Logger {
  const options = {
    level: init.level ?? 'info',
    base: init.base ?? {},
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime
  }
  return init.destination === undefined ? pino(options) : pino(options, init.destination)
}

/** A logger that drops everything; for unit tests that do not look at logs. */
export function silentLogger (): Logger {
  return pino({ level: 'silent' })
}
