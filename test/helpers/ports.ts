import net from 'node:net'

/** A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it). */
export async function freePort (): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.unref()
    server.once('error', reject)
    server.listen({ host: '127.0.0.1', port: 0 }, () => {
      const address = server.address()
      const port = typeof address === 'object' && address !== null ? address.port : 0
      server.close((err) => {
        if (err !== undefined) reject(err)
        else if (port === 0) reject(new Error('could not read the port of the bound server'))
        else resolve(port)
      })
    })
  })
}

/** `n` distinct free ports. */
export async function freePorts (n: number): Promise<number[]> {
  const ports = new Set<number>()
  let attempts = 0
  while (ports.size < n) {
    if (++attempts > n * 20) throw new Error(`could not find ${n} distinct free ports`)
    ports.add(await freePort())
  }
  return [...ports]
}
