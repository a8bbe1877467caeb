import { readFile, writeFile } from 'node:fs/promises'
import { run } from './process.ts'

/**
 * An emulated network of Linux network namespaces: a bridge in a namespace
 * of its own (the "hub"), one namespace per node joined to it by a veth pair,
 * and `tc` shaping on both ends of each pair, so that a node's upload (its
 * end's egress) and its download (the hub end's egress) are each limited.
 * The test process reaches every node over an unshaped control veth from the
 * root namespace into the hub (for health checks and metrics, never for the
 * bytes being measured).
 *
 * Everything is named `dfnet-<pid>-<k>-…` (and the control link `dfc<pid>x<k>`),
 * so that `sweepStaleNetworks()` can remove what a crashed run left behind
 * without touching a live run's namespaces. Needs root.
 */

/** A node's link, in bytes per second each way; 0 or absent is not limited. */
export interface LinkShape {
  /** The node's egress (what it sends). */
  up?: number
  /** The node's ingress (what it receives), shaped as the hub's egress towards it. */
  down?: number
  /**
   * Added one-way delay on each end's egress, in milliseconds (so a round
   * trip between two nodes crosses it four times). Needs sch_netem; on a
   * kernel without it the delay is left out and `network.latency` says so.
   */
  delayMs?: number
}

export interface NetnsNode {
  readonly name: string
  /** The namespace's name, for `ip netns exec`. */
  readonly netns: string
  /** The node's address on the bridge. */
  readonly address: string
  readonly shape: LinkShape
  /** A command line that runs `cmd` inside this node's namespace. */
  command: (cmd: string, args: string[]) => { cmd: string, args: string[] }
  /** Replaces the node's shaping (both ends). */
  reshape: (shape: LinkShape) => Promise<void>
}

export interface EmulatedNetwork {
  /** Every name this network created starts with it. */
  readonly prefix: string
  /** The /16 the nodes live in, e.g. 10.213.0.0/16. */
  readonly subnet: string
  /** Whether the kernel could add latency (sch_netem) or shaping is rate only. */
  readonly latency: 'netem' | 'unavailable'
  readonly nodes: readonly NetnsNode[]
  addNode: (name: string, shape?: LinkShape) => Promise<NetnsNode>
  /** Removes every namespace and link this network created. Idempotent; never throws. */
  close: () => Promise<void>
}

/** Kernel qdisc queue per shaped link: about 60 ms at the link's rate, at least 128 KiB. */
const QUEUE_SECONDS = 0.06
const QUEUE_MIN_BYTES = 128 * 1024
/** TCP segments handed to a shaped veth at once: small enough that a burst does not overrun its queue. */
const GSO_MAX_BYTES = 16 * 1024
/** The addresses' /16 is chosen from 10.FIRST.0.0 … 10.LAST.0.0, the first not routed here. */
const SUBNET_FIRST = 200
const SUBNET_LAST = 250
const CONGESTION_CONTROL = 'cubic'
const NAME = /^dfnet-(\d+)-(\d+)-/
const NEIGH = '/proc/sys/net/ipv4/neigh/default'

/**
 * Makes room in the kernel's ARP table for `entries` at once. The table is
 * shared by every namespace, and each node learns the address of each other
 * node it talks to: 35 namespaces of a 32-node cluster need about 35 × 34,
 * past Linux's default hard limit of 1,024. Over it the kernel drops entries
 * ("neighbor table overflow!") and connections fail with EHOSTUNREACH (the
 * cluster bench's 32-node warm-up, twice in a row). Limits are only raised.
 */
async function neighbourRoom (entries: number): Promise<void> {
  const want = [Math.ceil(entries / 4), Math.ceil(entries / 2), entries]
  for (const [k, value] of want.entries()) {
    const file = `${NEIGH}/gc_thresh${k + 1}`
    const now = Number((await readFile(file, 'utf8')).trim())
    if (Number.isFinite(now) && now < value) await writeFile(file, String(value))
  }
}

let networks = 0

/**
 * Why this machine cannot build an emulated network (not root, no `ip`, a
 * namespace cannot be added), or undefined when it can. Tests skip with it;
 * the bench throws it.
 */
export async function netnsUnavailable (): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return 'emulated networks need root (ip netns, veth, tc)'
  const probe = `dfnet-${process.pid}-probe-${Date.now()}`
  try {
    await run('ip', ['netns', 'add', probe], { timeoutMs: 10_000 })
  } catch (err) {
    return `cannot create a network namespace (\`ip netns add\` failed): ${(err as Error).message.split('\n')[0] ?? ''}`
  }
  try {
    await run('tc', ['-n', probe, 'qdisc', 'add', 'dev', 'lo', 'root', 'handle', '1:', 'htb', 'default', '1'], { timeoutMs: 10_000 })
  } catch (err) {
    return `cannot shape links with tc htb: ${(err as Error).message.split('\n')[0] ?? ''}`
  } finally {
    await run('ip', ['netns', 'del', probe], { timeoutMs: 10_000 }).catch(() => {})
  }
  return undefined
}

/**
 * Removes namespaces (and control links) whose creating process is gone:
 * what a run killed before its cleanup left behind. Processes still inside
 * them were started by that run; they are killed by pid first.
 */
export async function sweepStaleNetworks (): Promise<string[]> {
  const swept: string[] = []
  const { stdout } = await run('ip', ['netns', 'list'], { timeoutMs: 10_000 })
  const names = stdout.split('\n').map(line => line.split(' ')[0] ?? '').filter(name => NAME.test(name))
  for (const name of names) {
    if (alive(Number(NAME.exec(name)?.[1]))) continue
    const pids = await run('ip', ['netns', 'pids', name], { timeoutMs: 10_000 }).then(r => r.stdout.split('\n').filter(Boolean).map(Number), () => [])
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // Gone already.
      }
    }
    await run('ip', ['netns', 'del', name], { timeoutMs: 10_000 }).catch(() => {})
    swept.push(name)
  }
  const links = await run('ip', ['-o', 'link', 'show'], { timeoutMs: 10_000 })
  for (const m of links.stdout.matchAll(/^\d+: (dfc(\d+)x\d+)[@:]/gm)) {
    if (alive(Number(m[2]))) continue
    await run('ip', ['link', 'del', m[1] as string], { timeoutMs: 10_000 }).catch(() => {})
    swept.push(m[1] as string)
  }
  return swept
}

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/**
 * Builds the hub and the control link; nodes are added with `addNode`. On a
 * failure half-way, what was built is removed before the error is thrown.
 */
export async function createNetwork (): Promise<EmulatedNetwork> {
  const k = networks++
  const prefix = `dfnet-${process.pid}-${k}-`
  const hub = `${prefix}hub`
  const control = `dfc${process.pid}x${k}`
  const created: string[] = []
  const nodes: NetnsNode[] = []
  let closed = false
  const ip = async (...args: string[]): Promise<void> => { await run('ip', args, { timeoutMs: 10_000 }) }
  const tc = async (...args: string[]): Promise<void> => { await run('tc', args, { timeoutMs: 10_000 }) }

  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    // Deleting a namespace deletes the veth ends in it, and with them their peers.
    for (const name of created.reverse()) await ip('netns', 'del', name).catch(() => {})
    await ip('link', 'del', control).catch(() => {})
  }

  try {
    await sweepStaleNetworks()
    const octet = await freeSubnet()
    const base = `10.${octet}`
    await ip('netns', 'add', hub)
    created.push(hub)
    await ip('-n', hub, 'link', 'set', 'lo', 'up')
    await ip('-n', hub, 'link', 'add', 'br0', 'type', 'bridge')
    await ip('-n', hub, 'link', 'set', 'br0', 'up')
    await ip('link', 'add', 'name', control, 'type', 'veth', 'peer', 'name', 'control', 'netns', hub)
    await ip('-n', hub, 'link', 'set', 'control', 'master', 'br0', 'up')
    await ip('addr', 'add', `${base}.255.254/16`, 'dev', control)
    await ip('link', 'set', control, 'up')
    const latency = await netemWorks(hub)

    const shapeEnd = async (netns: string, dev: string, rate: number | undefined, delayMs: number | undefined): Promise<void> => {
      await tc('-n', netns, 'qdisc', 'del', 'dev', dev, 'root').catch(() => {}) // none yet
      const delay = latency === 'netem' && delayMs !== undefined && delayMs > 0 ? delayMs : undefined
      if (rate === undefined || rate <= 0) {
        if (delay !== undefined) await tc('-n', netns, 'qdisc', 'add', 'dev', dev, 'root', 'netem', 'delay', `${delay}ms`, 'limit', '10000')
        return
      }
      const bits = `${Math.round(rate * 8)}bit`
      const burst = String(Math.max(32 * 1024, Math.round(rate * 0.01)))
      await tc('-n', netns, 'qdisc', 'add', 'dev', dev, 'root', 'handle', '1:', 'htb', 'default', '1')
      await tc('-n', netns, 'class', 'add', 'dev', dev, 'parent', '1:', 'classid', '1:1', 'htb', 'rate', bits, 'ceil', bits, 'burst', burst, 'cburst', burst, 'quantum', '65536')
      const queue = String(Math.max(QUEUE_MIN_BYTES, Math.round(rate * QUEUE_SECONDS)))
      if (delay !== undefined) {
        await tc('-n', netns, 'qdisc', 'add', 'dev', dev, 'parent', '1:1', 'handle', '10:', 'netem', 'delay', `${delay}ms`, 'limit', '10000')
      } else {
        await tc('-n', netns, 'qdisc', 'add', 'dev', dev, 'parent', '1:1', 'handle', '10:', 'bfifo', 'limit', queue)
      }
    }

    const network: EmulatedNetwork = {
      prefix,
      subnet: `${base}.0.0/16`,
      latency,
      nodes,
      async addNode (name, shape = {}) {
        if (closed) throw new Error('the emulated network is closed')
        if (!/^[a-z0-9]{1,12}$/.test(name)) throw new Error(`node name ${JSON.stringify(name)}: 1–12 lower-case letters and digits`)
        if (nodes.some(n => n.name === name)) throw new Error(`node ${name} exists already`)
        const i = nodes.length + 1
        if (i > 250 * 256) throw new Error('too many nodes')
        // Every namespace may come to know every other (the hub and the root's control end among them), with room to spare.
        await neighbourRoom(2 * (i + 2) * (i + 2))
        const netns = `${prefix}${name}`
        const address = `${base}.${Math.floor(i / 250)}.${(i % 250) + 1}`
        const hubEnd = `v${i}`
        await ip('netns', 'add', netns)
        created.push(netns)
        await ip('link', 'add', 'name', 'eth0', 'netns', netns, 'type', 'veth', 'peer', 'name', hubEnd, 'netns', hub)
        for (const [where, dev] of [[netns, 'eth0'], [hub, hubEnd]] as const) {
          await ip('-n', where, 'link', 'set', dev, 'gso_max_size', String(GSO_MAX_BYTES))
        }
        await ip('-n', hub, 'link', 'set', hubEnd, 'master', 'br0', 'up')
        await ip('-n', netns, 'addr', 'add', `${address}/16`, 'dev', 'eth0')
        await ip('-n', netns, 'link', 'set', 'eth0', 'up')
        await ip('-n', netns, 'link', 'set', 'lo', 'up')
        // Linux's default congestion control (what most nodes run), whatever this host was set to (BBR
        // here). Set on the route: a namespace may not pick one the host has not allowed.
        await ip('-n', netns, 'route', 'replace', `${base}.0.0/16`, 'dev', 'eth0', 'proto', 'kernel', 'scope', 'link', 'src', address, 'congctl', CONGESTION_CONTROL)
        let current: LinkShape = {}
        const reshape = async (next: LinkShape): Promise<void> => {
          await shapeEnd(netns, 'eth0', next.up, next.delayMs)
          await shapeEnd(hub, hubEnd, next.down, next.delayMs)
          current = { ...next }
        }
        await reshape(shape)
        const node: NetnsNode = {
          name,
          netns,
          address,
          get shape () { return current },
          command: (cmd, args) => ({ cmd: 'ip', args: ['netns', 'exec', netns, cmd, ...args] }),
          reshape
        }
        nodes.push(node)
        return node
      },
      close
    }
    return network
  } catch (err) {
    await close()
    throw err
  }
}

/** Whether netem can be added here (it is a module many small kernels leave out). */
async function netemWorks (netns: string): Promise<'netem' | 'unavailable'> {
  try {
    await run('tc', ['-n', netns, 'qdisc', 'add', 'dev', 'lo', 'root', 'netem', 'delay', '1ms'], { timeoutMs: 10_000 })
    await run('tc', ['-n', netns, 'qdisc', 'del', 'dev', 'lo', 'root'], { timeoutMs: 10_000 })
    return 'netem'
  } catch {
    return 'unavailable'
  }
}

/** The second octet of a 10.x.0.0/16 that no route of this namespace covers yet. */
async function freeSubnet (): Promise<number> {
  const { stdout } = await run('ip', ['-4', 'route', 'show'], { timeoutMs: 10_000 })
  const used = new Set([...stdout.matchAll(/^10\.(\d+)\./gm)].map(m => Number(m[1])))
  const span = SUBNET_LAST - SUBNET_FIRST + 1
  for (let j = 0; j < span; j++) {
    const octet = SUBNET_FIRST + ((process.pid + networks + j) % span)
    if (!used.has(octet)) return octet
  }
  throw new Error(`no free 10.x.0.0/16 between 10.${SUBNET_FIRST} and 10.${SUBNET_LAST}`)
}

/** CPU time of the whole machine, from /proc/stat: idle and total jiffies. */
export async function cpuTimes (): Promise<{ idle: number, total: number }> {
  const line = (await readFile('/proc/stat', 'utf8')).split('\n')[0] ?? ''
  const fields = line.trim().split(/\s+/).slice(1).map(Number)
  // user nice system idle iowait irq softirq steal (guest is inside user already)
  const total = fields.slice(0, 8).reduce((a, b) => a + b, 0)
  return { idle: (fields[3] ?? 0) + (fields[4] ?? 0), total }
}
