/**
 * One socket write per message, not one per piece of it.
 *
 * The published TCP transport (@libp2p/tcp 11) writes every chunk of what
 * the layer above hands it with its own `socket.write`, and Noise hands it
 * each message as its 2-byte length and its ciphertext: two writes, two
 * TCP segments, two wake-ups of the reader for a 200-byte answer. A
 * scheduler answering plans spent 39% of its CPU inside those writes. Here
 * the socket is corked around one hand-over, so what it was given leaves in
 * one `writev`: the same bytes in the same order, fewer system calls.
 *
 * The transport is wrapped, not patched: each connection it makes is
 * adjusted on its way to the upgrader (the one place a transport hands its
 * connections over), and everything else passes through untouched.
 */
import { Socket } from 'node:net'
import type { Transport, Upgrader } from '@libp2p/interface'

/** The part of the transport's connection this reads: its socket and the method that writes to it. */
interface SocketConnection {
  socket?: unknown
  sendData?: (data: Iterable<Uint8Array> & { byteLength: number }) => unknown
}

/**
 * Corks the connection's socket around each hand-over of more than one
 * chunk. Throws when the connection is not what this was written against,
 * so a changed library fails loudly at the first connection instead of
 * writing silently as before.
 */
export function coalesceWrites (maConn: unknown): void {
  const conn = maConn as SocketConnection
  const socket = conn.socket
  const sendData = conn.sendData
  if (!(socket instanceof Socket) || typeof sendData !== 'function') {
    throw new Error('@libp2p/tcp: a connection without its socket or sendData; src/p2p/tcp-writes.ts needs updating')
  }
  conn.sendData = function (data) {
    const chunks = data[Symbol.iterator]()
    chunks.next()
    if (chunks.next().done === true) return sendData.call(this, data)
    socket.cork()
    try {
      return sendData.call(this, data)
    } finally {
      socket.uncork()
    }
  }
}

/** What a proxy passes through untouched: the target's own property, its methods bound to it. */
function passThrough (target: object, prop: string | symbol): unknown {
  const value: unknown = Reflect.get(target, prop, target)
  return typeof value === 'function' ? value.bind(target) : value
}

function wrapUpgrader (upgrader: Upgrader): Upgrader {
  return new Proxy(upgrader, {
    get (target, prop) {
      if (prop === 'upgradeInbound' || prop === 'upgradeOutbound') {
        const upgrade = target[prop].bind(target) as (maConn: unknown, options: unknown) => Promise<unknown>
        return async (maConn: unknown, options: unknown) => {
          coalesceWrites(maConn)
          return upgrade(maConn, options)
        }
      }
      return passThrough(target, prop)
    }
  })
}

/** The transport `make` builds, with every connection it dials or accepts writing a message at a time. */
export function coalescingTransport<C> (make: (components: C) => Transport): (components: C) => Transport {
  return (components) => {
    const transport = make(components)
    return new Proxy(transport, {
      get (target, prop) {
        if (prop === 'dial') {
          return async (ma: Parameters<Transport['dial']>[0], options: Parameters<Transport['dial']>[1]) =>
            target.dial(ma, { ...options, upgrader: wrapUpgrader(options.upgrader) })
        }
        if (prop === 'createListener') {
          return (options: Parameters<Transport['createListener']>[0]) =>
            target.createListener({ ...options, upgrader: wrapUpgrader(options.upgrader) })
        }
        return passThrough(target, prop)
      }
    })
  }
}
