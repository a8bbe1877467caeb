/**
 * Nodes finished over time, as an SVG a README can show: one step line per
 * run, a vertical line at T* (the lower bound no schedule can beat) and
 * lighter ones at 1.1×, 1.5× and 2× T* (the targets).
 */
export interface Curve {
  label: string
  /** Seconds since the start at which each node finished, ascending. */
  finished: number[]
  /** Nodes pulling, finished or not (the top of the axis). */
  nodes: number
  color?: string
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd']

export interface PlotOptions {
  /** Under the time axis. Default 'seconds since the pull started'. */
  xLabel?: string
}

export function finishPlot (title: string, tStarSeconds: number, curves: Curve[], options: PlotOptions = {}): string {
  const W = 720
  const H = 420
  const left = 64
  const right = 24
  const top = 40
  const bottom = 56
  const pw = W - left - right
  const ph = H - top - bottom
  const lastFinish = Math.max(0, ...curves.map(c => c.finished[c.finished.length - 1] ?? 0))
  const xMax = niceCeil(Math.max(2.2 * tStarSeconds, lastFinish * 1.05))
  const yMax = Math.max(1, ...curves.map(c => c.nodes))
  const x = (s: number): number => left + (s / xMax) * pw
  const y = (n: number): number => top + ph - (n / yMax) * ph
  const out: string[] = []
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`)
  out.push(`<rect width="${W}" height="${H}" fill="white"/>`)
  out.push(`<text x="${W / 2}" y="22" text-anchor="middle" font-size="14">${escape(title)}</text>`)
  // Axes and ticks.
  out.push(`<line x1="${left}" y1="${top + ph}" x2="${left + pw}" y2="${top + ph}" stroke="black"/>`)
  out.push(`<line x1="${left}" y1="${top}" x2="${left}" y2="${top + ph}" stroke="black"/>`)
  const xStep = niceStep(xMax / 8)
  for (let s = 0; s <= xMax + 1e-9; s += xStep) {
    out.push(`<line x1="${x(s).toFixed(1)}" y1="${top + ph}" x2="${x(s).toFixed(1)}" y2="${top + ph + 4}" stroke="black"/>`)
    out.push(`<text x="${x(s).toFixed(1)}" y="${top + ph + 18}" text-anchor="middle">${fmt(s)}</text>`)
  }
  out.push(`<text x="${left + pw / 2}" y="${H - 16}" text-anchor="middle">${escape(options.xLabel ?? 'seconds since the pull started')}</text>`)
  const yStep = niceStep(yMax / 5)
  for (let n = 0; n <= yMax + 1e-9; n += yStep) {
    out.push(`<line x1="${left - 4}" y1="${y(n).toFixed(1)}" x2="${left}" y2="${y(n).toFixed(1)}" stroke="black"/>`)
    out.push(`<text x="${left - 8}" y="${(y(n) + 4).toFixed(1)}" text-anchor="end">${fmt(n)}</text>`)
  }
  out.push(`<text x="16" y="${top + ph / 2}" text-anchor="middle" transform="rotate(-90 16 ${top + ph / 2})">nodes finished</text>`)
  // T* and the targets.
  for (const [k, dash, label] of [[1, '', 'T*'], [1.1, '4 4', '1.1×'], [1.5, '4 4', '1.5×'], [2, '4 4', '2×']] as Array<[number, string, string]>) {
    const sx = x(k * tStarSeconds)
    if (sx > left + pw) continue
    out.push(`<line x1="${sx.toFixed(1)}" y1="${top}" x2="${sx.toFixed(1)}" y2="${top + ph}" stroke="${k === 1 ? 'black' : '#999'}" stroke-width="${k === 1 ? 1.5 : 1}"${dash === '' ? '' : ` stroke-dasharray="${dash}"`}/>`)
    out.push(`<text x="${(sx + 3).toFixed(1)}" y="${top + 12}" fill="${k === 1 ? 'black' : '#777'}">${label}</text>`)
  }
  // One step line per run.
  curves.forEach((c, k) => {
    const color = c.color ?? COLORS[k % COLORS.length] as string
    const points: string[] = [`${x(0).toFixed(1)},${y(0).toFixed(1)}`]
    let n = 0
    for (const s of c.finished) {
      points.push(`${x(s).toFixed(1)},${y(n).toFixed(1)}`)
      n++
      points.push(`${x(s).toFixed(1)},${y(n).toFixed(1)}`)
    }
    points.push(`${x(xMax).toFixed(1)},${y(n).toFixed(1)}`)
    out.push(`<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${thin(points).join(' ')}"/>`)
    out.push(`<line x1="${left + 12}" y1="${top + 24 + 16 * k}" x2="${left + 36}" y2="${top + 24 + 16 * k}" stroke="${color}" stroke-width="2"/>`)
    out.push(`<text x="${left + 42}" y="${top + 28 + 16 * k}">${escape(c.label)}</text>`)
  })
  out.push('</svg>')
  return out.join('\n') + '\n'
}

/** Drops points that sit on the same pixel as both neighbours (10,000 steps make a large file otherwise). */
function thin (points: string[]): string[] {
  const out: string[] = []
  for (let i = 0; i < points.length; i++) {
    if (i > 0 && i < points.length - 1 && points[i] === points[i - 1] && points[i] === points[i + 1]) continue
    if (out[out.length - 1] === points[i]) continue
    out.push(points[i] as string)
  }
  return out
}

function niceStep (raw: number): number {
  const p = 10 ** Math.floor(Math.log10(raw))
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p
  return 10 * p
}

function niceCeil (v: number): number {
  const step = niceStep(v / 8)
  return Math.ceil(v / step) * step
}

function fmt (v: number): string {
  return Number.isInteger(v) ? String(v) : v.toFixed(1)
}

function escape (s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
}
