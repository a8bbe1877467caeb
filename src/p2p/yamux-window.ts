/**
 * Yamux window updates sent when half the receive window is used, not
 * after every data frame.
 *
 * The published muxer (@chainsafe/libp2p-yamux 8) answers every data frame
 * it reads with a window-update frame: its own encryption and its own socket
 * write. A scheduler session's request and answer are one small frame each
 * way, so half of what a scheduler wrote was window updates; a heartbeat
 * cost it two writes instead of one. go-yamux and hashicorp/yamux wait until
 * the unused part of the window has dropped below half of it, and so do we:
 * the sender still has at least half a window (1 MiB here) in flight, which
 * does not slow a piece stream, and small request-answer streams almost
 * never need an update at all.
 *
 * Only an established stream's plain update is deferred. A frame that
 * carries flags (SYN, ACK) goes at once, a paused stream keeps its pause,
 * and the growth of the window with round-trip time is left to the
 * original, which runs whenever an update does go out.
 */
import { StreamState, YamuxStream } from '@chainsafe/libp2p-yamux/stream'

/** The parts of a stream the rule reads (the class declares the window fields private; they are plain fields at run time). */
interface WindowState {
  state: StreamState
  recvWindow: number
  recvWindowCapacity: number
}

let installed = false

/** True when the other side still has more than half the window to send into. */
export function updateCanWait (s: WindowState): boolean {
  return s.state === StreamState.Established && s.recvWindowCapacity * 2 > s.recvWindow
}

/** Once per process; later calls do nothing. */
export function deferWindowUpdates (): void {
  if (installed) return
  const prototype = YamuxStream.prototype as unknown as { sendWindowUpdate: (this: YamuxStream) => void }
  const original = prototype.sendWindowUpdate
  // Thrown at every node's creation, not only the first, until the library is matched again.
  if (typeof original !== 'function') throw new Error('@chainsafe/libp2p-yamux: YamuxStream.sendWindowUpdate is gone; src/p2p/yamux-window.ts needs updating')
  installed = true
  prototype.sendWindowUpdate = function (this: YamuxStream) {
    if (updateCanWait(this as unknown as WindowState)) return
    original.call(this)
  }
}
