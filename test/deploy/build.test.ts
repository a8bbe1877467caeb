import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { readFile, readdir } from 'node:fs/promises'
import path from 'node:path'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { request } from 'undici'
import { build } from '../../deploy/build.ts'
import pkg from '../../package.json' with { type: 'json' }
import { compiledTree } from '../helpers/compiled.ts'
import { startPeer } from '../helpers/peer.ts'
import { tmpDir } from '../helpers/tmp.ts'

// The image runs the program compiled to JavaScript (deploy/build.ts). The
// compiled tree must be whole: no import left pointing at a .ts file, the
// launcher and the swarm page's files beside it, and a peer that starts.

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')

test('deploy/build.ts: a compiled tree that runs the CLI and a peer, importing no TypeScript', async (t) => {
  const work = await tmpDir('df-build-')
  t.after(async () => { await work.cleanup() })
  const out = path.join(work.path, 'dist')
  const cli = await compiledTree(out)

  let modules = 0
  for (const entry of await readdir(out, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile()) continue
    assert.ok(!entry.name.endsWith('.ts'), `${entry.name}: no TypeScript in the compiled tree`)
    if (!entry.name.endsWith('.js') || entry.parentPath.includes(`${path.sep}ui`)) continue
    modules++
    const text = await readFile(path.join(entry.parentPath, entry.name), 'utf8')
    for (const m of text.matchAll(/\bfrom\s+['"](\.[^'"]*)['"]|\bimport\s*\(\s*['"](\.[^'"]*)['"]\s*\)/g)) {
      const spec = (m[1] ?? m[2]) as string
      assert.ok(!spec.endsWith('.ts'), `${path.relative(out, path.join(entry.parentPath, entry.name))} imports ${spec}`)
    }
  }
  assert.ok(modules > 50, `${modules} modules compiled`)
  for (const f of ['index.html', 'app.js', 'style.css']) await readFile(path.join(out, 'scheduler', 'ui', f))

  const { stdout } = await promisify(execFile)(process.execPath, [cli, '--version'])
  assert.equal(stdout.trim(), `damselfly ${pkg.version}`)

  // An all-in-one peer (its scheduler embedded) from the compiled tree.
  const peer = await startPeer({ cli, registry: 'http://127.0.0.1:9', args: ['--log-level', 'warn'] })
  t.after(async () => { await peer.close() })
  const res = await request(`${peer.url}/healthy`)
  assert.equal(res.statusCode, 200)
  await res.body.dump()
})

test('deploy/build.ts refuses to empty the checkout or one of its sources', async () => {
  await assert.rejects(build(ROOT), /refusing to empty/)
  await assert.rejects(build(path.join(ROOT, 'src')), /refusing to empty/)
  await assert.rejects(build(path.dirname(ROOT)), /refusing to empty/)
})
