import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { sleep, withDeadline, type AbortOptions } from '../../src/abort.ts'
import { StateUnavailableError } from '../../src/errors.ts'
import type { Logger } from '../../src/logger.ts'
import type { Envelope } from './events.ts'
import type { Apply, SwarmLog } from './log.ts'
import type { Outcome } from './machine.ts'

export interface RedisLogComponents {
  logger: Logger
  apply: Apply
  /** This replica's copy of the swarm as plain data, and loading one back (empty: forget everything). */
  snapshot: () => unknown
  load: (snapshot: unknown) => void
  clear: () => void
}

export interface RedisLogInit {
  /** `redis://[user@]host:port[/db]` or `rediss://…` (TLS). */
  url: string
  password?: string | undefined
  /** PEM CA bundle for `rediss://`. */
  ca?: string | undefined
  /** Key prefix, so several swarms can share one Redis. Default `damselfly:`. */
  prefix?: string | undefined
  /** How long an append waits for Redis and for this replica to apply it. Default 2 s. */
  appendTimeoutMs?: number
  /** How often a snapshot is written (by one replica at a time) and the log trimmed behind it. Default 30 s. */
  snapshotEveryMs?: number
  /** A replica not renewing its liveness this long is gone, and so are the hosts connected through it. Default 10 s. */
  replicaTtlMs?: number
}

/**
 * Appends an event: refused unless the epoch is still the one the appender
 * reads (a Redis that lost its data starts a new history, and a replica
 * still on the old one must not write into it); numbered so readers notice
 * a gap (trimmed before they read it) and catch up from a snapshot instead.
 */
const APPEND = `
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return redis.error_reply('EPOCH the shared state changed') end
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], '*', 's', seq, 'e', ARGV[2])
return seq
`

/**
 * Writes a snapshot unless it belongs to another epoch than the one Redis
 * holds, or claims more events than that epoch has had (0: not written). A
 * replica that has just read a new epoch still holds the old history until
 * its reader reloads; a snapshot of that copy under the new epoch would send
 * every reader that loads it looking for events that never come.
 */
const SNAPSHOT = `
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
return 1
`

interface Snapshot {
  epoch: string
  seq: number
  id: string
  /** The id of the snapshot before: the log is trimmed to it, so a reader a little behind still finds its next event. */
  previousId: string
  replicas: string[]
  swarm: unknown
}

/**
 * The swarm's log in a Redis stream. Each replica reads the whole stream
 * with a blocking XREAD and applies every event to its own copy of the state;
 * plans are answered from that copy, so they cost Redis nothing. A replica
 * joining late loads the newest snapshot and reads on from where it was
 * taken.
 */
export function createRedisLog (components: RedisLogComponents, init: RedisLogInit): SwarmLog {
  const logger = components.logger.child({ component: 'scheduler:redis-log' })
  const prefix = init.prefix ?? 'damselfly:'
  const keys = { events: `${prefix}events`, seq: `${prefix}seq`, epoch: `${prefix}epoch`, snapshot: `${prefix}snapshot`, snapshotLock: `${prefix}snapshot-lock`, replica: (id: string) => `${prefix}replica:${id}` }
  const appendTimeoutMs = init.appendTimeoutMs ?? 2_000
  const snapshotEveryMs = init.snapshotEveryMs ?? 30_000
  const replicaTtlMs = init.replicaTtlMs ?? 10_000
  const replica = randomUUID()
  const options = {
    // Fail fast while Redis is away: a plan that waits on it is a pull that waits.
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    connectTimeout: 2_000,
    lazyConnect: true,
    // Retries stay frequent: until a replica is back on Redis and has read its epoch, its plans send peers to the origin.
    retryStrategy: (times: number) => Math.min(100 * times, 500),
    ...(init.password === undefined ? {} : { password: init.password }),
    ...(init.ca === undefined ? {} : { tls: { ca: init.ca } })
  }
  const cmd = new Redis(init.url, { ...options, commandTimeout: appendTimeoutMs })
  // XREAD BLOCK holds its connection: reads get their own.
  const reader = new Redis(init.url, options)
  for (const [name, conn] of [['commands', cmd], ['reader', reader]] as const) {
    conn.on('error', (err: Error) => { logger.debug({ err: err.message, connection: name }, 'redis connection error') })
  }
  cmd.defineCommand('dfAppend', { numberOfKeys: 3, lua: APPEND })
  cmd.defineCommand('dfSnapshot', { numberOfKeys: 3, lua: SNAPSHOT })

  const stopping = new AbortController()
  let epoch: string | undefined
  /** The epoch of the history this replica's copy holds: behind `epoch` from the moment a new one is read until the reader has reloaded. */
  let copyEpoch: string | undefined
  let lastId = '0-0'
  let lastSeq = 0
  let snapshotId = '0-0'
  let n = 0
  const pending = new Map<number, { resolve: (o: Outcome) => void, reject: (e: Error) => void }>()
  /** Replicas seen appending, watched for liveness. */
  const replicas = new Set<string>()
  const resyncListeners: Array<() => void> = []
  const appliedListeners: Array<(envelope: Envelope, outcome: Outcome) => void> = []
  /**
   * Redis was unreachable since it was last seen healthy: what this replica's
   * peers told it meanwhile was refused, and they should tell it again. (An
   * append that was only slow is not a reason: hanging up every peer of a
   * busy replica would make it busier.)
   */
  let missed = false
  let healthy = false
  const loops: Array<Promise<void>> = []

  const resync = (why: string): void => {
    logger.warn({ why }, 'the shared swarm state may lack what this replica\'s peers hold; asking them to announce again')
    for (const l of resyncListeners) l()
  }

  /** The epoch changed (or was first read): the reader reloads before it reads on. */
  let reload = false
  let reloadedAt = 0
  /** No replica is declared gone before this (ms epoch). */
  let sweepAfter = 0

  /** Reads (or starts) the epoch; a new one means the history this replica holds is gone. */
  async function checkEpoch (): Promise<boolean> {
    let current = await cmd.get(keys.epoch)
    let created = false
    if (current === null) {
      created = await cmd.set(keys.epoch, randomUUID(), 'NX') === 'OK'
      current = await cmd.get(keys.epoch)
    }
    if (current === null) throw new StateUnavailableError('the shared state has no epoch')
    if (current === epoch) return false
    const first = epoch === undefined
    epoch = current
    reload = true
    // Liveness keys went with the old history: every replica gets one period to write its own again.
    if (!first || created) sweepAfter = Date.now() + replicaTtlMs
    if (!first) resync('the shared state was lost (a new epoch)')
    return true
  }

  /** Loads the newest snapshot of this epoch (or nothing) and reads on from it. */
  async function catchUp (): Promise<void> {
    const raw = await cmd.get(keys.snapshot)
    const snap = raw === null ? undefined : JSON.parse(raw) as Snapshot
    components.clear()
    replicas.clear()
    copyEpoch = epoch
    if (snap !== undefined && snap.epoch === epoch) {
      components.load(snap.swarm)
      lastId = snap.id
      lastSeq = snap.seq
      snapshotId = snap.id
      for (const r of snap.replicas) replicas.add(r)
    } else {
      lastId = '0-0'
      lastSeq = 0
      snapshotId = '0-0'
    }
    logger.info({ epoch, seq: lastSeq, snapshot: snap !== undefined && snap.epoch === epoch }, 'swarm state loaded from the shared store')
  }

  function applyBatch (entries: Array<[string, string[]]>): void {
    for (const [id, fields] of entries) {
      let seq = 0
      let raw = ''
      for (let i = 0; i + 1 < fields.length; i += 2) {
        if (fields[i] === 's') seq = Number(fields[i + 1])
        else if (fields[i] === 'e') raw = fields[i + 1] as string
      }
      if (seq !== lastSeq + 1) throw new GapError(`expected event ${lastSeq + 1}, read ${seq}`)
      lastSeq = seq
      lastId = id
      let envelope: Envelope
      try {
        envelope = JSON.parse(raw) as Envelope
      } catch {
        logger.error({ id }, 'an unreadable event in the shared log was skipped')
        continue
      }
      replicas.add(envelope.by)
      const local = envelope.by === replica
      let outcome: Outcome
      try {
        outcome = components.apply(envelope, local)
      } catch (err) {
        logger.error({ err, type: envelope.e.type }, 'applying an event failed')
        if (local) pending.get(envelope.n)?.reject(err as Error)
        pending.delete(envelope.n)
        continue
      }
      for (const listener of appliedListeners) {
        try {
          listener(envelope, outcome)
        } catch (err) {
          logger.error({ err, type: envelope.e.type }, 'a listener of applied events failed')
        }
      }
      if (local) {
        pending.get(envelope.n)?.resolve(outcome)
        pending.delete(envelope.n)
      }
    }
  }

  async function readLoop (): Promise<void> {
    while (!stopping.signal.aborted) {
      try {
        if (epoch === undefined) await checkEpoch()
        if (reload) {
          // A gap may be a new history (Redis came back empty) seen before the epoch check saw it:
          // the epoch first, so this replica's peers are asked to come back before its copy is cleared.
          await checkEpoch()
          reload = false
          await catchUp()
          reloadedAt = Date.now()
        }
        const res = await reader.xread('COUNT', 1000, 'BLOCK', 1000, 'STREAMS', keys.events, lastId) as Array<[string, Array<[string, string[]]>]> | null
        // Read before a reload: of the old history, or from before the snapshot.
        if (res === null || reload) continue
        for (const [, entries] of res) applyBatch(entries)
      } catch (err) {
        if (stopping.signal.aborted) break
        if (err instanceof GapError) {
          logger.warn({ err: err.message }, 'this replica fell behind the trimmed log; loading a snapshot')
          // A gap right after a reload will not close by reloading at once: not a busy loop against Redis.
          if (Date.now() - reloadedAt < 1_000) await sleep(250, { signal: stopping.signal }).catch(() => {})
          reload = true
          continue
        }
        logger.debug({ err: (err as Error).message }, 'reading the shared log failed')
        await sleep(250, { signal: stopping.signal }).catch(() => {})
      }
    }
  }

  /** Ends the house loop's wait at once: Redis is back, or an append met an epoch this replica has not read. */
  let wakeHouse = (): void => {}
  cmd.on('ready', () => { wakeHouse() })

  /** Liveness, the epoch, dead replicas, snapshots: every second, and at once when woken. */
  async function houseLoop (): Promise<void> {
    let lastSnapshot = Date.now()
    let lastRound = 0
    while (!stopping.signal.aborted) {
      const woken = new AbortController()
      wakeHouse = () => { woken.abort() }
      await sleep(1_000, { signal: AbortSignal.any([stopping.signal, woken.signal]) }).catch(() => {})
      // Woken by a burst of refused appends: one round for them, not one each.
      await sleep(Math.max(0, lastRound + 100 - Date.now()), { signal: stopping.signal }).catch(() => {})
      lastRound = Date.now()
      if (stopping.signal.aborted) break
      try {
        await cmd.set(keys.replica(replica), '1', 'PX', replicaTtlMs)
        const changed = await checkEpoch()
        healthy = true
        if (missed && !changed) {
          missed = false
          resync('appends were refused while the shared store was away')
        }
        missed = false
        for (const r of Date.now() < sweepAfter ? [] : [...replicas]) {
          if (r === replica) continue
          if (await cmd.exists(keys.replica(r)) === 1) continue
          replicas.delete(r)
          logger.warn({ replica: r }, 'a scheduler replica stopped renewing its liveness: the hosts connected through it are gone')
          await append({ type: 'replica-gone', replica: r }).catch(() => {})
        }
        if (Date.now() - lastSnapshot >= snapshotEveryMs) {
          lastSnapshot = Date.now()
          await writeSnapshot()
        }
      } catch (err) {
        healthy = false
        missed = true
        logger.debug({ err: (err as Error).message }, 'the shared store is unreachable')
      }
    }
  }

  async function writeSnapshot (): Promise<void> {
    // A copy not yet reloaded into the current epoch is not this epoch's to write; nor is the lock then this replica's to take.
    if (epoch === undefined || copyEpoch !== epoch || reload) return
    // One replica at a time; the others' turn comes with the next interval.
    if (await cmd.set(keys.snapshotLock, replica, 'PX', snapshotEveryMs, 'NX') !== 'OK') return
    const snap: Snapshot = { epoch, seq: lastSeq, id: lastId, previousId: snapshotId, replicas: [...replicas], swarm: components.snapshot() }
    const written = await (cmd as unknown as { dfSnapshot: (...args: Array<string | number>) => Promise<number> }).dfSnapshot(keys.snapshot, keys.epoch, keys.seq, epoch, lastSeq, JSON.stringify(snap))
    // Refused (the epoch changed since it was read): Redis itself answered, so this is no reason to have the peers announce again.
    if (written !== 1) {
      logger.warn({ epoch, seq: lastSeq }, 'a snapshot of this replica\'s copy was refused: it is not of the current history')
      return
    }
    // Trimmed only to the snapshot before: a reader up to one interval behind still finds its next event.
    if (snapshotId !== '0-0') await cmd.xtrim(keys.events, 'MINID', snapshotId)
    snapshotId = lastId
  }

  async function append (e: Envelope['e'], opts: AbortOptions = {}): Promise<Outcome> {
    if (epoch === undefined || stopping.signal.aborted) throw new StateUnavailableError('the shared swarm state is not reachable')
    const envelope: Envelope = { e, at: Date.now(), by: replica, n: ++n }
    const applied = Promise.withResolvers<Outcome>()
    // Rejected at the deadline, at stop, or by a failed apply that the reader met before Redis answered the append: maybe while nobody awaits it yet.
    applied.promise.catch(() => {})
    pending.set(envelope.n, applied)
    const signal = withDeadline(opts.signal, appendTimeoutMs, `append ${e.type}`)
    const onAbort = (): void => { applied.reject(new StateUnavailableError(`the shared swarm state did not take a ${e.type} in time`)) }
    signal.addEventListener('abort', onAbort, { once: true })
    try {
      await (cmd as unknown as { dfAppend: (...args: string[]) => Promise<number> }).dfAppend(keys.events, keys.seq, keys.epoch, epoch, JSON.stringify(envelope))
      return await applied.promise
    } catch (err) {
      if (cmd.status !== 'ready') missed = true
      else if (/^EPOCH/.test((err as Error).message)) wakeHouse()
      if (err instanceof StateUnavailableError) throw err
      throw new StateUnavailableError(`the shared swarm state refused a ${e.type}: ${(err as Error).message}`, { cause: err })
    } finally {
      signal.removeEventListener('abort', onAbort)
      pending.delete(envelope.n)
    }
  }

  return {
    replica,
    get healthy () { return healthy && epoch !== undefined },
    append,
    onResync (listener) { resyncListeners.push(listener) },
    onApplied (listener) { appliedListeners.push(listener) },
    async start () {
      await Promise.all([cmd.connect(), reader.connect()]).catch((err: unknown) => {
        // Not fatal: the replica answers "go to the origin" until Redis is back.
        logger.warn({ err: (err as Error).message, url: redact(init.url) }, 'redis is unreachable; peers go to the origin until it answers')
      })
      await checkEpoch().then(() => { healthy = true }, () => {})
      await cmd.set(keys.replica(replica), '1', 'PX', replicaTtlMs).catch(() => {})
      loops.push(readLoop(), houseLoop())
    },
    async stop () {
      stopping.abort()
      for (const p of pending.values()) p.reject(new StateUnavailableError('the scheduler is stopping'))
      pending.clear()
      // Gone at once rather than when the liveness key runs out: the hosts here move elsewhere.
      await cmd.del(keys.replica(replica)).catch(() => {})
      reader.disconnect()
      await Promise.allSettled(loops)
      await cmd.quit().catch(() => { cmd.disconnect() })
    }
  }
}

class GapError extends Error {}

/** The URL without its password, for logs. */
function redact (url: string): string {
  try {
    const u = new URL(url)
    if (u.password !== '') u.password = '***'
    return u.toString()
  } catch {
    return '(unparsable url)'
  }
}
