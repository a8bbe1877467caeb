import { LRUCache } from 'lru-cache'
import { MAX_PIECE_HINTS, type PieceHint } from '../../src/protocol/messages.ts'

/** Children remembered per piece: a few more than a busy answer names, so the asker can be left out. */
const PER_PIECE = MAX_PIECE_HINTS + 2

/**
 * Who this peer recently began sending each piece to, most recent first, so
 * that a busy answer can name them: each holds the piece or is receiving it,
 * and a child told to ask one of them has its piece one hop later instead of
 * after a pause. In the fleet simulation (N = 200) this alone took p50 from
 * 1.77× to 1.51× T* with the upload queue off; the pieces of a crowd fan out
 * from whoever got them first, as in a tree, without the scheduler having to
 * hear of every landing first.
 */
export class Recipients {
  readonly #byPiece: LRUCache<string, PieceHint[]>

  /** `max` pieces remembered, each for `ttlMs` after its last send began. */
  constructor (max = 4096, ttlMs = 30_000) {
    this.#byPiece = new LRUCache({ max, ttl: ttlMs })
  }

  record (digest: string, index: number, child: PieceHint): void {
    const key = `${digest}#${index}`
    const list = (this.#byPiece.get(key) ?? []).filter(h => h.peerId !== child.peerId)
    list.unshift(child)
    if (list.length > PER_PIECE) list.length = PER_PIECE
    this.#byPiece.set(key, list)
  }

  /** Up to `MAX_PIECE_HINTS` of them, the asker left out. */
  hints (digest: string, index: number, asker: string): PieceHint[] {
    const list = this.#byPiece.get(`${digest}#${index}`)
    if (list === undefined) return []
    return list.filter(h => h.peerId !== asker).slice(0, MAX_PIECE_HINTS)
  }
}
