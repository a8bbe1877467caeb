import { AbortError, TimeoutError } from './errors.ts'

export interface AbortOptions {
  signal?: AbortSignal | undefined
}

/**
 * Combines the caller's signal with a deadline. The returned signal aborts
 * with a `TimeoutError` naming `what` when the deadline passes, or with the
 * caller's reason when the caller gives up.
 */
export function withDeadline (signal: AbortSignal | undefined, ms: number, what: string): AbortSignal {
  return deadline([signal], ms, what).signal
}

/** Resolves after `ms`, or rejects with the signal's reason. */
export async function sleep (ms: number, options: AbortOptions = {}): Promise<void> {
  const { signal } = options
  signal?.throwIfAborted()
  await new Promise<void>((resolve, reject) => {
    const onAbort = (): void => {
      clearTimeout(timer)
      reject(signal?.reason ?? new AbortError('sleep'))
    }
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    signal?.addEventListener('abort', onAbort, { once: true })
  })
}

/** Waits for a promise or the signal, whichever settles first; removes its listener either way. */
export async function raceSignal<T> (promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (signal === undefined) return promise
  signal.throwIfAborted()
  let onAbort: (() => void) | undefined
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_resolve, reject) => {
        onAbort = () => { reject(signal.reason ?? new AbortError()) }
        signal.addEventListener('abort', onAbort, { once: true })
      })
    ])
  } finally {
    if (onAbort !== undefined) signal.removeEventListener('abort', onAbort)
  }
}

/** Full-jitter exponential backoff: a random delay in [0, min(cap, base·2^attempt)]. */
export function backoff (attempt: number, baseMs: number, capMs: number): number {
  return Math.random() * Math.min(capMs, baseMs * 2 ** attempt)
}

/**
 * A deadline over several signals (any may be undefined), with `clear` to
 * drop its timer and listeners once the work is done: for work done often,
 * where timers left to run out would pile up.
 */
export function deadline (signals: Array<AbortSignal | undefined>, ms: number, what: string): { signal: AbortSignal, clear: () => void } {
  const controller = new AbortController()
  const sources = signals.filter((s): s is AbortSignal => s !== undefined)
  const clear = (): void => {
    clearTimeout(timer)
    for (const s of sources) s.removeEventListener('abort', onAbort)
  }
  const onAbort = function (this: AbortSignal): void {
    clear()
    controller.abort(this.reason ?? new AbortError(what))
  }
  const timer = setTimeout(() => {
    clear()
    controller.abort(new TimeoutError(what))
  }, ms)
  timer.unref()
  for (const s of sources) {
    if (s.aborted) {
      clear()
      controller.abort(s.reason ?? new AbortError(what))
      break
    }
    s.addEventListener('abort', onAbort, { once: true })
  }
  return { signal: controller.signal, clear }
}
