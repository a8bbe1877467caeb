import type { Socket } from 'node:net'

export interface ConnectionGuardInit {
  /** Connections one remote address may hold. */
  perAddress: number
  /** Connections in all. */
  total: number
  /** Called for each connection turned away or dropped to make room. */
  onRefused?: () => void
}

export interface ConnectionGuard {
  /** Takes a new connection in, or closes it (or an idle stranger's) to stay within the limits. */
  admit: (socket: Socket) => void
  /** The connection carried a request that proved membership: it is dropped last. */
  vouch: (socket: Socket) => void
  /** Whether a request is being answered on it; busy connections are never dropped to make room. */
  busy: (socket: Socket, busy: boolean) => void
  readonly size: number
}

interface Tracked {
  address: string
  vouched: boolean
  busy: boolean
}

/**
 * Keeps the upload port open to the swarm when someone opens connections
 * and sends nothing: one address holds at most `perAddress` of them, and when
 * all `total` are taken the oldest idle connection that never proved
 * membership makes room, then the oldest idle one of any kind; a new
 * connection is refused only when every other one is busy.
 */
export function createConnectionGuard (init: ConnectionGuardInit): ConnectionGuard {
  // Insertion order is age order.
  const tracked = new Map<Socket, Tracked>()
  const perAddress = new Map<string, number>()

  const drop = (socket: Socket): void => {
    init.onRefused?.()
    socket.destroy()
  }

  const victim = (): Socket | undefined => {
    let idle: Socket | undefined
    for (const [socket, t] of tracked) {
      if (t.busy) continue
      if (!t.vouched) return socket
      idle ??= socket
    }
    return idle
  }

  return {
    get size () { return tracked.size },
    admit (socket) {
      const address = socket.remoteAddress ?? ''
      const mine = perAddress.get(address) ?? 0
      if (mine >= init.perAddress) return drop(socket)
      if (tracked.size >= init.total) {
        const old = victim()
        if (old === undefined) return drop(socket)
        drop(old)
        forget(old)
      }
      tracked.set(socket, { address, vouched: false, busy: false })
      perAddress.set(address, mine + 1)
      socket.once('close', () => { forget(socket) })
    },
    vouch (socket) {
      const t = tracked.get(socket)
      if (t !== undefined) t.vouched = true
    },
    busy (socket, busy) {
      const t = tracked.get(socket)
      if (t !== undefined) t.busy = busy
    }
  }

  function forget (socket: Socket): void {
    const t = tracked.get(socket)
    if (t === undefined) return
    tracked.delete(socket)
    const left = (perAddress.get(t.address) ?? 1) - 1
    if (left <= 0) perAddress.delete(t.address)
    else perAddress.set(t.address, left)
  }
}
