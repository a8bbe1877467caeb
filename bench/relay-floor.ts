import { createHash } from 'node:crypto'
import { closeSync, createReadStream, mkdtempSync, openSync, rmSync, unlinkSync, writeSync } from 'node:fs'
import { createServer } from 'node:http'
import { connect, type AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'

/**
 * The least a relaying child must do with each MiB, and nothing else: take
 * the blob from a parent over HTTP, reading each 1 MiB piece straight into a
 * reused buffer, hash every piece against a table and the whole blob against
 * its digest, write each verified piece to a file and send it on to the
 * reader in one write. No scheduler, no pool of connections, no framework,
 * no metrics, one piece request for the whole blob. Its CPU per MiB,
 * measured in the same run as the peer's, is the floor the relaying child's
 * figure is read against on the machine at hand.
 * Usage: node bench/relay-floor.ts <file> <parent host:port>
 * The file is the blob itself, read once at start for the piece table and
 * the digest (what a child gets from the scheduler and the manifest); the
 * parent is `bench/plain-server.ts` sending it, asked in HTTP/1.0 so that
 * the body comes unframed and ends when the connection does.
 */
const PIECE = 1024 * 1024
/** Pieces in flight between the parent's socket and the reader's. */
const BUFFERS = 4
const [file, parent] = process.argv.slice(2)
const [parentHost, parentPort] = parent?.split(':') ?? []
if (file === undefined || parentHost === undefined || parentPort === undefined) throw new Error('usage: relay-floor.ts <file> <parent host:port>')

const table: Buffer[] = []
const whole = createHash('sha256')
let size = 0
for await (const piece of createReadStream(file, { highWaterMark: PIECE })) {
  table.push(createHash('sha256').update(piece as Buffer).digest())
  whole.update(piece as Buffer)
  size += (piece as Buffer).length
}
const digest = whole.digest()
const dir = mkdtempSync(path.join(tmpdir(), 'df-relay-floor-'))
const free: Buffer[] = Array.from({ length: BUFFERS }, () => Buffer.allocUnsafe(PIECE))

/**
 * Each pass writes a file of its own, and the one before it is removed only
 * once this one is written: a pass then takes fresh page-cache pages as a new
 * peer does, not the pages its own truncated file just freed (on a VM, a
 * first write to a page costs several times a rewrite).
 */
let passes = 0
const server = createServer((_req, res) => {
  const pass = passes++
  const fd = openSync(path.join(dir, `blob-${pass}`), 'w')
  const blob = createHash('sha256')
  const head = Buffer.allocUnsafe(16 * 1024)
  let headLength = 0
  let piece: Buffer | undefined
  let have = 0
  let index = 0
  const fail = (err: Error): void => {
    up.destroy()
    closeSync(fd)
    res.destroy(err)
  }
  const land = (): void => {
    const body = (piece as Buffer).subarray(0, have)
    if (index >= table.length || !createHash('sha256').update(body).digest().equals(table[index] as Buffer)) throw new Error(`piece ${index} does not match its digest`)
    blob.update(body)
    writeSync(fd, body, 0, body.length, index * PIECE)
    const lent = piece as Buffer
    res.write(body, () => {
      free.push(lent)
      if (up.isPaused()) up.resume()
    })
    index++
    have = 0
    piece = free.pop()
    if (piece === undefined) up.pause()
  }
  /** Body bytes now in `piece` from `have` on: a full piece is verified and passed on. */
  const took = (n: number): void => {
    have += n
    if (have === PIECE) land()
  }
  const up = connect({
    host: parentHost,
    port: Number(parentPort),
    onread: {
      buffer: () => {
        // A read may come before a pause takes hold: one more buffer then, kept with the others after.
        if (headLength < 0) piece ??= free.pop() ?? Buffer.allocUnsafe(PIECE)
        return headLength >= 0 ? head.subarray(headLength) : (piece as Buffer).subarray(have)
      },
      callback: (n: number): boolean => {
        try {
          if (headLength < 0) {
            took(n)
            return true
          }
          headLength += n
          const end = head.subarray(0, headLength).indexOf('\r\n\r\n')
          if (end < 0) {
            if (headLength === head.length) throw new Error('headers too long')
            return true
          }
          if (!head.subarray(0, 12).toString('latin1').startsWith('HTTP/1.1 200')) throw new Error(`parent answered ${head.subarray(0, 12).toString('latin1')}`)
          const rest = head.subarray(end + 4, headLength)
          headLength = -1
          piece ??= free.pop() ?? Buffer.allocUnsafe(PIECE)
          rest.copy(piece)
          took(rest.length)
        } catch (err) {
          fail(err as Error)
        }
        return true
      }
    }
  })
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': size })
  up.on('connect', () => { up.write(`GET /blob HTTP/1.0\r\nhost: ${parent}\r\n\r\n`) })
  up.on('end', () => {
    try {
      if (have > 0) land()
      if (index !== table.length || !blob.digest().equals(digest)) throw new Error('the blob does not match its digest')
      if (piece !== undefined) free.push(piece)
      closeSync(fd)
      if (pass > 0) unlinkSync(path.join(dir, `blob-${pass - 1}`))
      res.end()
    } catch (err) {
      fail(err as Error)
    }
  })
  up.on('error', fail)
})
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`)
})
process.once('SIGTERM', () => {
  server.closeAllConnections()
  server.close()
  rmSync(dir, { recursive: true, force: true })
})
