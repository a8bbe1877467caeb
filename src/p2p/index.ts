import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { generateKeyPair, privateKeyFromProtobuf, privateKeyToProtobuf } from '@libp2p/crypto/keys'
import type { Connection, Libp2p, PeerId, PrivateKey, Stream } from '@libp2p/interface'
import { peerIdFromString } from '@libp2p/peer-id'
import { tcp } from '@libp2p/tcp'
import { lpStream, type LengthPrefixedStream } from '@libp2p/utils'
import { multiaddr, type Multiaddr } from '@multiformats/multiaddr'
import type { TSchema, Static } from '@sinclair/typebox'
import { createLibp2p } from 'libp2p'
import { withDeadline, type AbortOptions } from '../abort.ts'
import { NotAuthorizedPeerError, PeerUnavailableError, ProtocolError } from '../errors.ts'
import type { Logger } from '../logger.ts'
import { JOIN_PROTOCOL, MAX_MESSAGE_BYTES, decode, encode } from '../protocol/messages.ts'
import { coalescingTransport } from './tcp-writes.ts'
import { deferWindowUpdates } from './yamux-window.ts'

/**
 * The one adapter for libp2p, shared by the peer and the scheduler: TCP,
 * Noise and yamux, a key kept in the data dir, and the cluster-secret
 * handshake. Nothing outside this folder imports libp2p.
 */

export type { Stream, Connection }

export interface P2PNodeInit {
  dataDir: string
  /** Name of the key file under `dataDir` (`peer.key`, `scheduler.key`). */
  keyName: string
  /** Multiaddrs to listen on; none for a dial-only node. */
  listen: string[]
  /** Multiaddrs to announce instead of the listen addresses. */
  announce?: string[] | undefined
  /**
   * Shared cluster secret. When set, every connection must prove it holds
   * the same secret before any other protocol runs on it.
   */
  clusterSecret?: string | undefined
  /** Connections kept open at once. Default 512. */
  maxConnections?: number
  /**
   * New inbound connections accepted per second from one IP. libp2p's default
   * (5) suits a public node; a scheduler is dialled by a whole cluster at
   * once after a restart, and nodes behind one NAT share an IP. Default 100.
   */
  inboundConnectionThreshold?: number
  /** Inbound connections mid-handshake at once. Default 256. */
  maxIncomingPendingConnections?: number
  /**
   * How often libp2p's connection monitor pings every connection (a new
   * stream each, negotiated), closing those whose ping fails; 0: never.
   * With thousands of sessions its bursts were most of a scheduler's idle
   * CPU and its slowest answers. Nothing needs it: a scheduler session has
   * its own heartbeat (src/p2p/channel.ts), and TCP keepalive finds a host
   * that vanished. Default 0.
   */
  pingIntervalMs?: number
  /**
   * TCP keepalive on every connection: after this long without traffic the
   * kernel probes the other end (every second, ten times: libuv's settings)
   * and the connection fails when nothing answers — a host that vanished is
   * noticed within about this + 10 s, at no cost to this process. Default 15 s.
   */
  tcpKeepAliveMs?: number
  /**
   * A connection with no traffic either way this long is closed. It must
   * outlast a scheduler session's heartbeat (peer/swarm/scheduler-client.ts,
   * 120 s): libp2p's own default of 2 min closed idle sessions as their
   * heartbeat fell due, and thousands reconnecting at once cost a scheduler
   * most of a core. Default 5 min.
   */
  socketIdleMs?: number
  /**
   * Encryption this node accepts, in order of preference (a dialler proposes
   * them in this order, a listener takes the first it is offered that it
   * accepts). Default TLS, then Noise: TLS's record layer runs in OpenSSL,
   * and a piece over a libp2p stream through Noise's ChaCha20 framing cost a
   * peer more CPU than hashing it did.
   */
  encrypters?: ReadonlyArray<'tls' | 'noise'>
}

export interface P2PNodeComponents {
  logger: Logger
}

export interface HandleOptions {
  maxInboundStreams?: number
  maxOutboundStreams?: number
}

export interface P2PNode {
  readonly peerId: string
  /** Multiaddrs other nodes should dial, with the /p2p/ suffix. */
  addrs: () => string[]
  handle: (protocol: string, handler: (stream: Stream, remotePeer: string) => Promise<void>, options?: HandleOptions) => Promise<void>
  /**
   * Opens a stream to a peer, dialling it if needed and proving membership on
   * a new connection first. `target` is a peer (id plus addresses to try) or
   * a bare address such as `/ip4/10.0.0.1/tcp/8002` (the scheduler's).
   */
  openStream: (target: DialTarget, protocol: string, options?: AbortOptions) => Promise<Stream>
  /** Connects (if needed) and returns the remote peer's id. */
  connect: (target: DialTarget, options?: AbortOptions) => Promise<string>
  isConnected: (peerId: string) => boolean
  onDisconnect: (listener: (peerId: string) => void) => void
  hangUp: (peerId: string) => Promise<void>
  stop: () => Promise<void>
}

export type DialTarget = { peerId: string, addrs: string[] } | { addr: string }

const JOIN_DEADLINE_MS = 5_000
/**
 * With a cluster secret, a connection that has not joined this long after it
 * opened is closed. Ours join as soon as they are dialled (openStream,
 * connect); a stranger's would otherwise hold a connection slot until the
 * socket idle limit (5 min).
 */
const STRANGER_GRACE_MS = 2 * JOIN_DEADLINE_MS

export async function createP2PNode (components: P2PNodeComponents, init: P2PNodeInit): Promise<P2PNode> {
  const logger = components.logger.child({ component: 'p2p' })
  deferWindowUpdates()
  const privateKey = await loadOrCreateKey(init.dataDir, init.keyName)
  const secret = init.clusterSecret === undefined || init.clusterSecret === '' ? undefined : Buffer.from(init.clusterSecret, 'utf8')
  /** Connections that proved membership (or all, without a secret), by connection id. */
  const members = new Set<string>()
  const joining = new Map<string, Promise<void>>()
  const socketOptions = { keepAlive: true, keepAliveInitialDelay: init.tcpKeepAliveMs ?? 15_000 }
  const socketIdleMs = init.socketIdleMs ?? 300_000
  // TLS is loaded only when offered: with its X.509 and ASN.1 libraries it is 5 MiB of heap a Noise-only node never needs.
  const connectionEncrypters = await Promise.all((init.encrypters ?? ['tls', 'noise']).map(async e => e === 'tls' ? (await import('@libp2p/tls')).tls() : noise()))

  const node: Libp2p = await createLibp2p({
    privateKey,
    addresses: { listen: init.listen, ...(init.announce !== undefined && init.announce.length > 0 ? { announce: init.announce } : {}) },
    transports: [coalescingTransport(tcp({ dialOpts: socketOptions, listenOpts: socketOptions, inboundSocketInactivityTimeout: socketIdleMs, outboundSocketInactivityTimeout: socketIdleMs }))],
    connectionEncrypters,
    // A new stream carries one 1 MiB piece; a window that holds a whole piece
    // lets it flow without waiting on window updates.
    // No muxer pings: what needs liveness has it (sessions' heartbeats, TCP keepalive), and each
    // ping was a frame through TLS both ways on every connection.
    streamMuxers: [yamux({ enableKeepAlive: false, streamOptions: { initialStreamWindowSize: 2 * 1024 * 1024, maxStreamWindowSize: 16 * 1024 * 1024 } })],
    connectionManager: {
      maxConnections: init.maxConnections ?? 512,
      inboundConnectionThreshold: init.inboundConnectionThreshold ?? 100,
      maxIncomingPendingConnections: init.maxIncomingPendingConnections ?? 256
    },
    connectionMonitor: init.pingIntervalMs === undefined || init.pingIntervalMs <= 0 ? { enabled: false } : { pingInterval: init.pingIntervalMs },
    nodeInfo: { userAgent: `damselfly/${hostname()}` },
    // Without a secret nothing tells a member from a stranger: only this machine may connect.
    ...(secret === undefined ? { connectionGater: { denyInboundConnection: async (conn: { remoteAddr: Multiaddr }) => !isLoopbackMultiaddr(conn.remoteAddr) } } : {})
  })

  /** Connections not yet members, each with the timer that closes it if it never joins. */
  const strangers = new Map<string, NodeJS.Timeout>()
  node.addEventListener('connection:open', (evt) => {
    const connection = evt.detail
    if (secret === undefined || members.has(connection.id)) return
    const timer = setTimeout(() => {
      strangers.delete(connection.id)
      if (members.has(connection.id) || connection.status !== 'open') return
      logger.warn({ peer: connection.remotePeer.toString() }, `closed a connection that did not join the cluster within ${STRANGER_GRACE_MS} ms`)
      void connection.close().catch(() => {})
    }, STRANGER_GRACE_MS)
    timer.unref()
    strangers.set(connection.id, timer)
  })
  node.addEventListener('connection:close', (evt) => {
    members.delete(evt.detail.id)
    joining.delete(evt.detail.id)
    clearTimeout(strangers.get(evt.detail.id))
    strangers.delete(evt.detail.id)
  })

  // The listening side of the handshake.
  await node.handle(JOIN_PROTOCOL, async (stream, connection) => {
    const signal = AbortSignal.timeout(JOIN_DEADLINE_MS)
    try {
      if (secret === undefined) throw new NotAuthorizedPeerError('this node has no cluster secret')
      const lp = lpStream(stream, { maxDataLength: 64 })
      const nonceDialer = (await lp.read({ signal })).subarray()
      if (nonceDialer.length !== 32) throw new ProtocolError('bad join nonce')
      const nonceListener = randomBytes(32)
      const ids = [connection.remotePeer.toString(), node.peerId.toString()] as const
      await lp.write(Buffer.concat([nonceListener, mac(secret, 'listener', nonceDialer, nonceListener, ids)]), { signal })
      const proof = (await lp.read({ signal })).subarray()
      if (!safeEqual(proof, mac(secret, 'dialer', nonceDialer, nonceListener, ids))) throw new NotAuthorizedPeerError('wrong cluster secret')
      members.add(connection.id)
      await lp.write(Uint8Array.of(1), { signal })
      await stream.close({ signal })
    } catch (err) {
      logger.warn({ peer: connection.remotePeer.toString(), err: (err as Error).message }, 'refused a node that could not prove cluster membership')
      stream.abort(err as Error)
      await connection.close().catch(() => {})
    }
  }, { maxInboundStreams: 4 })

  /** The dialling side: prove we hold the secret and that the listener does too. */
  async function join (connection: Connection, options: AbortOptions): Promise<void> {
    if (secret === undefined || members.has(connection.id)) return
    let pending = joining.get(connection.id)
    if (pending === undefined) {
      pending = (async () => {
        const signal = withDeadline(undefined, JOIN_DEADLINE_MS, 'cluster join')
        const stream = await connection.newStream(JOIN_PROTOCOL, { signal })
        try {
          const lp = lpStream(stream, { maxDataLength: 64 })
          const nonceDialer = randomBytes(32)
          await lp.write(nonceDialer, { signal })
          const reply = (await lp.read({ signal })).subarray()
          const ids = [node.peerId.toString(), connection.remotePeer.toString()] as const
          if (reply.length !== 64 || !safeEqual(reply.subarray(32), mac(secret, 'listener', nonceDialer, reply.subarray(0, 32), ids))) {
            throw new NotAuthorizedPeerError(`${connection.remotePeer.toString()} does not hold the cluster secret`)
          }
          await lp.write(mac(secret, 'dialer', nonceDialer, reply.subarray(0, 32), ids), { signal })
          await lp.read({ signal })
          members.add(connection.id)
          await stream.close({ signal }).catch(() => {})
        } catch (err) {
          stream.abort(err as Error)
          await connection.close().catch(() => {})
          throw err
        }
      })()
      joining.set(connection.id, pending)
      pending.catch(() => { joining.delete(connection.id) })
    }
    await pending
    options.signal?.throwIfAborted()
  }

  async function dial (target: DialTarget, options: AbortOptions): Promise<Connection> {
    const signal = withDeadline(options.signal, 10_000, 'dial')
    try {
      if ('addr' in target) {
        const ma = toMultiaddr(target.addr)
        const existing = node.getConnections().find(c => c.remoteAddr.equals(ma) && c.status === 'open')
        return existing ?? await node.dial(ma, { signal })
      }
      const peer = peerIdFromString(target.peerId)
      const open = node.getConnections(peer).find(c => c.status === 'open')
      if (open !== undefined) return open
      const addrs = target.addrs.map(a => toMultiaddr(a.includes('/p2p/') ? a : `${a}/p2p/${target.peerId}`))
      return await node.dial(addrs.length > 0 ? addrs : peer, { signal })
    } catch (err) {
      if (options.signal?.aborted === true) throw err
      throw new PeerUnavailableError(`cannot reach ${'addr' in target ? target.addr : target.peerId}: ${(err as Error).message}`, { cause: err })
    }
  }

  return {
    peerId: node.peerId.toString(),
    addrs: () => node.getMultiaddrs().map(a => a.toString()),
    async handle (protocol, handler, options = {}) {
      await node.handle(protocol, async (stream, connection) => {
        if (secret !== undefined && !members.has(connection.id)) {
          stream.abort(new NotAuthorizedPeerError('join the cluster first'))
          return
        }
        try {
          await handler(stream, connection.remotePeer.toString())
        } catch (err) {
          stream.abort(err as Error)
        }
      }, { maxInboundStreams: options.maxInboundStreams ?? 256, maxOutboundStreams: options.maxOutboundStreams ?? 256 })
    },
    async openStream (target, protocol, options = {}) {
      const connection = await dial(target, options)
      await join(connection, options)
      try {
        return await connection.newStream(protocol, { signal: withDeadline(options.signal, 10_000, 'open stream') })
      } catch (err) {
        if (options.signal?.aborted === true) throw err
        throw new PeerUnavailableError(`cannot open ${protocol} to ${connection.remotePeer.toString()}: ${(err as Error).message}`, { cause: err })
      }
    },
    async connect (target, options = {}) {
      const connection = await dial(target, options)
      await join(connection, options)
      return connection.remotePeer.toString()
    },
    isConnected (peerId) {
      return node.getConnections(peerIdFromString(peerId)).some(c => c.status === 'open')
    },
    onDisconnect (listener) {
      node.addEventListener('peer:disconnect', (evt: CustomEvent<PeerId>) => { listener(evt.detail.toString()) })
    },
    async hangUp (peerId) {
      await node.hangUp(peerIdFromString(peerId)).catch(() => {})
    },
    async stop () {
      await node.stop()
    }
  }
}

function isLoopbackMultiaddr (ma: Multiaddr): boolean {
  const [first] = ma.getComponents()
  if (first === undefined) return false
  if (first.name === 'ip4') return first.value?.startsWith('127.') === true
  if (first.name === 'ip6') return first.value === '::1' || first.value?.startsWith('::ffff:127.') === true
  return false
}

/** `host:port` (what users type for --scheduler) or a multiaddr. */
export function toMultiaddr (value: string): Multiaddr {
  if (value.startsWith('/')) return multiaddr(value)
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(value.trim())
  if (m === null) throw new ProtocolError(`not an address: ${JSON.stringify(value)} (expected host:port or a multiaddr)`)
  const host = m[1] as string
  const proto = /^\d+\.\d+\.\d+\.\d+$/.test(host) ? 'ip4' : host.includes(':') ? 'ip6' : 'dns'
  return multiaddr(`/${proto}/${host}/tcp/${m[2] as string}`)
}

async function loadOrCreateKey (dataDir: string, name: string): Promise<PrivateKey> {
  const file = join(dataDir, name)
  try {
    return privateKeyFromProtobuf(await readFile(file))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new ProtocolError(`cannot read the node key ${file}: ${(err as Error).message}`)
  }
  const key = await generateKeyPair('Ed25519')
  await mkdir(dataDir, { recursive: true })
  await writeFile(file, privateKeyToProtobuf(key), { mode: 0o600 })
  return key
}

function mac (secret: Buffer, role: 'dialer' | 'listener', nonceDialer: Uint8Array, nonceListener: Uint8Array, ids: readonly [dialer: string, listener: string]): Buffer {
  return createHmac('sha256', secret).update(`damselfly-join/1 ${role} ${ids[0]} ${ids[1]} `).update(nonceDialer).update(nonceListener).digest()
}

function safeEqual (a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b)
}

/* Framed JSON messages */

export interface MessageStream {
  read: <T extends TSchema>(schema: T, what: string, options?: AbortOptions) => Promise<Static<T>>
  write: (value: unknown, options?: AbortOptions) => Promise<void>
  /** The byte stream after the last message, for protocols that continue with raw bytes. */
  unwrap: () => Stream
}

/**
 * `bufferBytes` bounds what may arrive ahead of the reader: protocols whose
 * messages are followed by raw bytes (a piece) need room for those too.
 */
export function messages (stream: Stream, maxBytes = MAX_MESSAGE_BYTES, bufferBytes = maxBytes + 16): MessageStream {
  const lp: LengthPrefixedStream<Stream> = lpStream(stream, { maxDataLength: maxBytes, maxBufferSize: Math.max(bufferBytes, maxBytes + 16) })
  return {
    async read (schema, what, options = {}) {
      const bytes = await lp.read(sig(options))
      return decode(schema, bytes.subarray(), what)
    },
    async write (value, options = {}) {
      await lp.write(encode(value), sig(options))
    },
    unwrap: () => lp.unwrap()
  }
}

/** libp2p's AbortOptions take no explicit `undefined`. */
export function sig (options: AbortOptions): { signal?: AbortSignal } {
  return options.signal === undefined ? {} : { signal: options.signal }
}

/** One request, one response, then close: the shape of every RPC here. */
export async function call<T extends TSchema> (stream: Stream, request: unknown, schema: T, what: string, options: AbortOptions = {}): Promise<Static<T>> {
  try {
    const m = messages(stream)
    await m.write(request, options)
    const response = await m.read(schema, what, options)
    await stream.close(sig(options)).catch(() => {})
    return response
  } catch (err) {
    stream.abort(err as Error)
    throw err
  }
}
