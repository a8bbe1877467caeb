import type { GetEvent } from './get/index.ts'

export interface ProgressOutput {
  write: (text: string) => unknown
  isTTY?: boolean | undefined
  columns?: number | undefined
}

interface Transfer {
  label: string
  total: number | undefined
  started: number
  bytes: number
  /** Next tenth (non-TTY) at which a line is printed. */
  nextStep: number
  lastDraw: number
}

const REDRAW_MS = 100
const STEP_UNKNOWN = 64 * 1024 * 1024

/**
 * Renders `damselfly get` events. On a terminal: one line per blob, redrawn in
 * place (at most ten times a second). Anywhere else (a log, a pipe): plain
 * lines at the start, at every tenth and at the end, with no escape codes.
 */
export function createProgressRenderer (out: ProgressOutput, now: () => number = Date.now): (event: GetEvent) => void {
  const transfers = new Map<string, Transfer>()
  const tty = out.isTTY === true

  const line = (t: Transfer, at: number): string => {
    const rate = t.bytes / Math.max(0.001, (at - t.started) / 1000)
    const pct = t.total === undefined || t.total === 0 ? undefined : Math.min(100, Math.floor(t.bytes * 100 / t.total))
    const amount = t.total === undefined ? formatBytes(t.bytes) : `${formatBytes(t.bytes)} / ${formatBytes(t.total)}`
    if (!tty) return `${t.label} ${pct === undefined ? '' : `${pct}% `}(${amount}, ${formatBytes(rate)}/s)`
    const width = 24
    const filled = pct === undefined ? 0 : Math.round(pct * width / 100)
    const bar = pct === undefined ? ''.padEnd(width, '?') : `${'='.repeat(filled)}${filled < width ? '>' : ''}`.padEnd(width, ' ').slice(0, width)
    const text = `${t.label} [${bar}] ${pct === undefined ? '  ?' : String(pct).padStart(3)}% ${amount} ${formatBytes(rate)}/s`
    const columns = out.columns ?? 0
    return columns > 10 && text.length >= columns ? text.slice(0, columns - 1) : text
  }
  const draw = (t: Transfer, at: number): void => {
    t.lastDraw = at
    out.write(`\r\x1b[2K${line(t, at)}`)
  }

  return (event) => {
    const at = now()
    switch (event.type) {
      case 'manifest':
        out.write(`manifest ${event.digest} (${event.mediaType}${event.platform === undefined ? '' : `, ${event.platform}`})\n`)
        return
      case 'start': {
        const t: Transfer = { label: `${event.kind} ${short(event.digest)}`, total: event.total, started: at, bytes: 0, nextStep: 1, lastDraw: 0 }
        transfers.set(event.digest, t)
        if (tty) draw(t, at)
        else out.write(`${t.label} start${event.total === undefined ? '' : ` (${formatBytes(event.total)})`}\n`)
        return
      }
      case 'progress': {
        const t = transfers.get(event.digest)
        if (t === undefined) return
        t.bytes = event.bytes
        if (tty) {
          if (at - t.lastDraw >= REDRAW_MS) draw(t, at)
          return
        }
        const step = t.total === undefined || t.total === 0 ? Math.floor(t.bytes / STEP_UNKNOWN) : Math.floor(t.bytes * 10 / t.total)
        if (step >= t.nextStep && (t.total === undefined || t.bytes < t.total)) {
          t.nextStep = step + 1
          out.write(`${line(t, at)}\n`)
        }
        return
      }
      case 'done': {
        const t = transfers.get(event.digest)
        transfers.delete(event.digest)
        if (event.skipped) {
          out.write(`${short(event.digest)} already present, verified\n`)
          return
        }
        if (t === undefined) return
        t.bytes = event.bytes
        if (tty) {
          draw(t, at)
          out.write('\n')
        } else {
          out.write(`${t.label} done, ${formatBytes(event.bytes)} verified\n`)
        }
      }
    }
  }
}

function short (digest: string): string {
  const colon = digest.indexOf(':')
  return `${digest.slice(0, colon + 1)}${digest.slice(colon + 1, colon + 13)}`
}

export function formatBytes (n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let value = n
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit++
  }
  return unit === 0 ? `${Math.round(value)} B` : `${value.toFixed(1)} ${units[unit] as string}`
}
