import { createReadStream } from 'node:fs'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'

/**
 * The baseline the data plane is measured against: a plain Node HTTP server,
 * in a process of its own as a peer is, sending one file with
 * `createReadStream(file).pipe(res)` for any path. Prints its port.
 * Usage: node bench/plain-server.ts <file>
 */
const file = process.argv[2]
if (file === undefined) throw new Error('usage: plain-server.ts <file>')
const server = createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'application/octet-stream' })
  createReadStream(file).pipe(res)
})
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`)
})
process.once('SIGTERM', () => {
  server.closeAllConnections()
  server.close()
})
