import { createHash } from 'node:crypto'
import { closeSync, createReadStream, mkdtempSync, openSync, rmSync, writevSync } from 'node:fs'
import { get, createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'

/**
 * The least a relaying child must do with each MiB, and nothing else: take
 * the blob from an HTTP parent, hash every 1 MiB piece against a table and
 * the whole blob against its digest, write each verified piece to a file,
 * and send it on to the reader. No scheduler, no pools, no framework, no
 * metrics. Its CPU per MiB, measured in the same run as the peer's, is the
 * floor the relaying child's figure is read against on the machine at hand.
 * Usage: node bench/relay-floor.ts <file> <parent-url>
 * The file is the blob itself, read once at start for the piece table and
 * the digest (what a child gets from the scheduler and the manifest).
 */
const PIECE = 1024 * 1024
const [file, parentUrl] = process.argv.slice(2)
if (file === undefined || parentUrl === undefined) throw new Error('usage: relay-floor.ts <file> <parent-url>')

const table: Buffer[] = []
const whole = createHash('sha256')
for await (const piece of createReadStream(file, { highWaterMark: PIECE })) {
  table.push(createHash('sha256').update(piece as Buffer).digest())
  whole.update(piece as Buffer)
}
const digest = whole.digest()
const dir = mkdtempSync(path.join(tmpdir(), 'df-relay-floor-'))

const server = createServer((_req, res) => {
  const fd = openSync(path.join(dir, 'blob'), 'w')
  const blob = createHash('sha256')
  let piece = createHash('sha256')
  let chunks: Buffer[] = []
  let have = 0
  let index = 0
  const fail = (err: Error): void => {
    closeSync(fd)
    res.destroy(err)
  }
  get(parentUrl, up => {
    res.writeHead(200, { 'content-type': 'application/octet-stream' })
    const land = (): boolean => {
      if (!piece.digest().equals(table[index] as Buffer)) throw new Error(`piece ${index} does not match its digest`)
      writevSync(fd, chunks, index * PIECE)
      // Not corked: a corked ServerResponse answers false to a write and never emits 'drain' (Node 24).
      let ok = true
      for (const c of chunks) ok = res.write(c)
      index++
      have = 0
      chunks = []
      piece = createHash('sha256')
      return ok
    }
    up.on('data', (data: Buffer) => {
      try {
        let ok = true
        for (let off = 0; off < data.length;) {
          const part = data.subarray(off, off + PIECE - have)
          off += part.length
          piece.update(part)
          blob.update(part)
          chunks.push(part)
          have += part.length
          if (have === PIECE) ok = land() && ok
        }
        if (!ok) {
          up.pause()
          res.once('drain', () => up.resume())
        }
      } catch (err) {
        up.destroy()
        fail(err as Error)
      }
    })
    up.on('end', () => {
      try {
        if (have > 0) land()
        if (!blob.digest().equals(digest)) throw new Error('the blob does not match its digest')
        closeSync(fd)
        res.end()
      } catch (err) {
        fail(err as Error)
      }
    })
    up.on('error', fail)
  }).on('error', fail)
})
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`)
})
process.once('SIGTERM', () => {
  server.closeAllConnections()
  server.close()
  rmSync(dir, { recursive: true, force: true })
})
