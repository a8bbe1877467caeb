/**
 * Compiles the peer, scheduler and CLI to JavaScript in one directory
 * (default `dist/`), the form the image runs: `node <out>/bin/damselfly.js`.
 *
 * Node 24 runs the TypeScript sources directly, and development and the
 * tests do. A process that strips types keeps the stripper (amaro, in
 * WebAssembly) and the TypeScript sources resident: an idle peer took
 * 147 MiB of RSS from the sources and 129 MiB compiled (bench/: memory).
 * Types are only stripped (tsconfig.build.json): the emitted code is the
 * source without its annotations, imports rewritten from `.ts` to `.js`.
 *
 * Usage: node deploy/build.ts [out-dir]   (out-dir is emptied first)
 */
import { spawnSync } from 'node:child_process'
import { cp, mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const SOURCES = ['src', 'peer', 'scheduler', 'cli', 'bin', 'test', 'bench', 'deploy', 'docs', 'node_modules']

export async function build (out: string): Promise<void> {
  const dir = path.resolve(out)
  // It is emptied first: never the checkout, a folder above it, or one of its sources.
  if (dir === root || root.startsWith(dir + path.sep) || SOURCES.some(d => dir === path.join(root, d))) throw new Error(`build: refusing to empty ${dir}`)
  await rm(dir, { recursive: true, force: true })
  const tsc = spawnSync(process.execPath, [path.join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', path.join(root, 'tsconfig.build.json'), '--outDir', dir], { cwd: root, encoding: 'utf8' })
  if (tsc.status !== 0) throw new Error(`build: tsc failed (exit ${tsc.status ?? tsc.signal}):\n${tsc.stdout}${tsc.stderr}`)
  // The launcher, importing the compiled CLI instead of its source.
  const launcher = await readFile(path.join(root, 'bin', 'damselfly.js'), 'utf8')
  const compiled = launcher.replace("import('../cli/main.ts')", "import('../cli/main.js')")
  if (compiled === launcher) throw new Error("build: bin/damselfly.js no longer imports '../cli/main.ts'; update deploy/build.ts")
  await mkdir(path.join(dir, 'bin'), { recursive: true })
  await writeFile(path.join(dir, 'bin', 'damselfly.js'), compiled, { mode: 0o755 })
  // The swarm page's static files, read beside the compiled module that serves them.
  await cp(path.join(root, 'scheduler', 'ui'), path.join(dir, 'scheduler', 'ui'), { recursive: true, filter: (f) => !f.endsWith('.ts') })
}

if (import.meta.main) {
  await build(process.argv[2] ?? path.join(root, 'dist'))
}
