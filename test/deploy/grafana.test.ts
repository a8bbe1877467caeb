import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { before, describe, test } from 'node:test'
import { request } from 'undici'
import { startPeer, startScheduler } from '../helpers/peer.ts'

// deploy/grafana/damselfly.json may name only metrics that a real peer or
// scheduler exports: both are started and scraped, and every metric name in
// every panel query is looked up in what they print.

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')

interface Target { expr: string, refId: string, datasource?: { uid?: string } }
interface Panel { id: number, type: string, title: string, datasource?: { uid?: string }, gridPos: { x: number, y: number, w: number, h: number }, targets?: Target[], fieldConfig?: { defaults?: { unit?: string } } }
interface Dashboard {
  schemaVersion: number
  uid: string
  title: string
  panels: Panel[]
  templating: { list: Array<{ name: string, type: string, query: unknown }> }
}

// PromQL words that are not metric names: functions are recognised by the
// "(" after them; these are the aggregations' modifiers and operators.
const KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'and', 'or', 'unless', 'bool', 'offset', 'inf', 'nan'])

/**
 * Metric names in a PromQL expression: identifiers that are not functions,
 * keywords, label names (in `{…}` or `by (…)`) or dashboard variables.
 */
function metricNames (expr: string): string[] {
  const stripped = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'/g, '""') // string literals
    .replace(/\{[^}]*\}/g, ' ') // label matchers
    .replace(/\[[^\]]*\]/g, ' ') // range selectors
    .replace(/\$\{?\w+\}?/g, ' ') // dashboard variables such as $__rate_interval
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ') // label lists
  const names = new Set<string>()
  for (const m of stripped.matchAll(/(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?/g)) {
    const word = m[1] as string
    if (m[2] !== undefined || KEYWORDS.has(word.toLowerCase())) continue
    names.add(word)
  }
  return [...names]
}

/** Names of every metric a /metrics page declares (# HELP), with their types. */
async function exported (url: string): Promise<Map<string, string>> {
  const res = await request(url, { signal: AbortSignal.timeout(10_000) })
  assert.equal(res.statusCode, 200)
  const text = await res.body.text()
  const types = new Map<string, string>()
  for (const line of text.split('\n')) {
    const help = /^# HELP (\S+) /.exec(line)
    if (help !== null && !types.has(help[1] as string)) types.set(help[1] as string, 'untyped')
    const type = /^# TYPE (\S+) (\S+)/.exec(line)
    if (type !== null) types.set(type[1] as string, type[2] as string)
  }
  return types
}

const dashboard = JSON.parse(await readFile(path.join(ROOT, 'deploy', 'grafana', 'damselfly.json'), 'utf8')) as Dashboard
const queryPanels = dashboard.panels.filter(p => p.type !== 'row')
const exprs = queryPanels.flatMap(p => (p.targets ?? []).map(t => ({ panel: p.title, expr: t.expr })))

describe('the PromQL name extraction', () => {
  test('finds metric names and nothing else', () => {
    assert.deepEqual(metricNames('histogram_quantile(0.99, sum by (le, route) (rate(a_seconds_bucket{instance=~"$instance",x="y{z}"}[$__rate_interval])))'), ['a_seconds_bucket'])
    assert.deepEqual(metricNames('sum(rate(a_total{s="peer"}[5m])) / sum without (pod) (rate(b_total[5m])) > bool 0'), ['a_total', 'b_total'])
    assert.deepEqual(metricNames('up'), ['up'])
    assert.deepEqual(metricNames('$cache_quota'), [])
    assert.deepEqual(metricNames('rate(damselfly_made_up_total[5m]) * on (instance) group_left c_info'), ['damselfly_made_up_total', 'c_info'])
  })
})

describe('deploy/grafana/damselfly.json', () => {
  let metrics = new Map<string, string>()

  before(async () => {
    const scheduler = await startScheduler()
    try {
      const peer = await startPeer({ registry: 'http://127.0.0.1:1', scheduler: scheduler.address })
      try {
        // A request, so that labelled mirror counters have samples too (the names are in # HELP regardless).
        const res = await request(`${peer.url}/v2/`, { signal: AbortSignal.timeout(10_000) })
        await res.body.dump()
        metrics = new Map([...await exported(`${peer.url}/metrics`), ...await exported(`${scheduler.httpUrl}/metrics`)])
      } finally {
        await peer.close()
      }
    } finally {
      await scheduler.close()
    }
  })

  test('is a dashboard Grafana imports: schema version, unique ids, a Prometheus data source variable', () => {
    assert.ok(dashboard.schemaVersion >= 36 && dashboard.schemaVersion <= 41, `schemaVersion ${dashboard.schemaVersion}`)
    assert.equal(dashboard.uid, 'damselfly')
    const ids = dashboard.panels.map(p => p.id)
    assert.equal(new Set(ids).size, ids.length, 'panel ids are unique')
    const ds = dashboard.templating.list.find(v => v.type === 'datasource')
    assert.ok(ds !== undefined && ds.query === 'prometheus', 'a Prometheus data source variable')
    for (const p of queryPanels) {
      assert.equal(p.datasource?.uid, `\${${ds.name}}`, `${p.title}: uses the data source variable`)
      assert.ok(p.gridPos.x >= 0 && p.gridPos.x + p.gridPos.w <= 24, `${p.title}: fits the 24-column grid`)
      assert.ok((p.targets ?? []).length > 0, `${p.title}: has a query`)
      for (const t of p.targets ?? []) assert.equal(t.datasource?.uid, p.datasource.uid)
    }
  })

  test('every metric a query names is exported by a running peer or scheduler', () => {
    assert.ok(metrics.has('damselfly_fetched_bytes_total') && metrics.has('damselfly_scheduler_hosts'), 'both processes were scraped')
    const unknown: string[] = []
    for (const { panel, expr } of exprs) {
      const names = metricNames(expr)
      assert.ok(names.length > 0 || /^\$\w+$/.test(expr.trim()), `${panel}: ${expr} names a metric`)
      for (const name of names) {
        const base = name.replace(/_(bucket|sum|count)$/, '')
        const known = metrics.has(name) || (base !== name && ['histogram', 'summary'].includes(metrics.get(base) ?? ''))
        if (!known) unknown.push(`${panel}: ${name}`)
      }
    }
    assert.deepEqual(unknown, [])
  })

  test('has the panels an operator needs', () => {
    const used = new Set(exprs.flatMap(e => metricNames(e.expr)))
    for (const name of [
      'damselfly_fetched_bytes_total', 'damselfly_served_bytes_total', 'damselfly_uploaded_bytes_total',
      'damselfly_piece_verification_failures_total', 'damselfly_parents_barred_total',
      'damselfly_mirror_requests_total', 'damselfly_mirror_request_duration_seconds_bucket', 'damselfly_store_bytes',
      'damselfly_scheduler_hosts', 'damselfly_scheduler_tasks', 'damselfly_scheduler_parent_selection_seconds_bucket',
      'damselfly_process_resident_memory_bytes'
    ]) assert.ok(used.has(name), `a panel shows ${name}`)
    assert.ok(exprs.some(e => /damselfly_fetched_bytes_total\{[^}]*source="origin"/.test(e.expr)), 'a panel shows origin egress')
    assert.ok(exprs.some(e => /histogram_quantile\(0\.99,.*damselfly_mirror_request_duration_seconds_bucket/.test(e.expr)), 'a panel shows mirror p99 latency')
  })
})
