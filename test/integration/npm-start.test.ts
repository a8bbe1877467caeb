import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import path from 'node:path'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { freePorts } from '../helpers/ports.ts'
import { spawnProcess, waitFor } from '../helpers/process.ts'
import { tmpDir } from '../helpers/tmp.ts'

// The README's first command, as a service manager would run it: `npm start`
// listens on loopback only, and a SIGTERM to npm stops the peer (the shell
// between them used to keep it alive, still answering /healthy).

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')

/** TCP ports a process listens on, with their addresses, from `ss`. */
function listening (pid: number): string[] {
  const out = execFileSync('ss', ['-Hltnp'], { encoding: 'utf8' })
  return out.split('\n').filter(l => l.includes(`pid=${pid},`)).map(l => l.trim().split(/\s+/)[3] as string)
}

function childrenOf (pid: number): number[] {
  try {
    return execFileSync('pgrep', ['-P', String(pid)], { encoding: 'utf8' }).split('\n').filter(Boolean).map(Number)
  } catch {
    return []
  }
}

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

test('npm start listens on loopback only, and SIGTERM to npm stops the peer', async (t) => {
  const dir = await tmpDir('df-npm-start-')
  t.after(async () => dir.cleanup())
  const [port, p2pPort, uploadPort] = await freePorts(3) as [number, number, number]
  const npm = spawnProcess('npm', ['start'], {
    cwd: ROOT,
    env: { ...process.env, DAMSELFLY_DATA_DIR: dir.path, DAMSELFLY_PORT: String(port), DAMSELFLY_P2P_PORT: String(p2pPort), DAMSELFLY_UPLOAD_PORT: String(uploadPort) }
  })
  t.after(async () => npm.stop('SIGKILL'))
  const healthy = async (): Promise<boolean> => (await fetch(`http://127.0.0.1:${port}/healthy`, { signal: AbortSignal.timeout(2000) })).ok
  await waitFor(healthy, { timeoutMs: 30_000, what: 'npm start to answer /healthy', giveUpIf: () => npm.child.exitCode !== null ? npm.output() : undefined })

  // npm runs the script through a shell; with `exec` the peer is npm's direct child.
  const [peer] = childrenOf(npm.child.pid as number)
  assert.ok(peer !== undefined, 'npm has a child process')
  t.after(() => { if (alive(peer)) process.kill(peer, 'SIGKILL') })
  const addresses = listening(peer)
  assert.ok(addresses.length >= 3, `the peer listens on its ports: ${addresses.join(' ')}`)
  for (const a of addresses) assert.match(a, /^127\.0\.0\.1:\d+$/, `${a} is not loopback (all: ${addresses.join(' ')})`)
  for (const p of [port, p2pPort, uploadPort]) assert.ok(addresses.includes(`127.0.0.1:${p}`), `listens on ${p}: ${addresses.join(' ')}`)

  npm.child.kill('SIGTERM')
  await waitFor(async () => !alive(peer), { timeoutMs: 15_000, what: 'the peer to exit after SIGTERM to npm' })
  await assert.rejects(healthy(), 'nothing answers /healthy after the stop')
})
