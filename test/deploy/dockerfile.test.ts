import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { readFile, readdir } from 'node:fs/promises'
import { builtinModules } from 'node:module'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { test } from 'node:test'
import pkg from '../../package.json' with { type: 'json' }
import { PeerConfig, SchedulerConfig } from '../../src/config/index.ts'

// There is no container engine on the test machines, so deploy/Dockerfile is
// checked by reading it: its stages, base image, user, what it copies, and
// that what it copies is all the program needs at run time.

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')

interface Instruction { op: string, args: string, line: number }
interface Stage { from: string, name?: string | undefined, instructions: Instruction[] }

/** Instructions of a Dockerfile, with continuation lines joined and comments dropped. */
function parseDockerfile (text: string): Instruction[] {
  const out: Instruction[] = []
  let pending = ''
  let start = 0
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim()
    if (pending === '' && (line === '' || line.startsWith('#'))) return
    if (pending === '') start = i + 1
    if (line.startsWith('#')) return
    if (line.endsWith('\\')) {
      pending += line.slice(0, -1) + ' '
      return
    }
    const whole = (pending + line).trim()
    pending = ''
    const m = /^(\w+)\s+(.*)$/.exec(whole)
    assert.ok(m !== null, `line ${start}: not an instruction: ${whole}`)
    out.push({ op: (m[1] as string).toUpperCase(), args: m[2] as string, line: start })
  })
  assert.equal(pending, '', 'no dangling continuation')
  return out
}

function stages (instructions: Instruction[]): Stage[] {
  const out: Stage[] = []
  for (const ins of instructions) {
    if (ins.op === 'FROM') {
      const m = /^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args)
      assert.ok(m !== null, `line ${ins.line}: FROM ${ins.args}`)
      out.push({ from: m[1] as string, name: m[2], instructions: [] })
    } else {
      assert.ok(out.length > 0 || ins.op === 'ARG', `line ${ins.line}: ${ins.op} before the first FROM`)
      out.at(-1)?.instructions.push(ins)
    }
  }
  return out
}

/** COPY's sources and its --from, if any. */
function copyArgs (args: string): { from?: string | undefined, sources: string[], dest: string } {
  const words = args.startsWith('[') ? JSON.parse(args) as string[] : args.split(/\s+/)
  const flags = words.filter(w => w.startsWith('--'))
  const paths = words.filter(w => !w.startsWith('--'))
  const from = flags.find(f => f.startsWith('--from='))?.slice('--from='.length)
  return { from, sources: paths.slice(0, -1), dest: paths.at(-1) as string }
}

const dockerfile = await readFile(path.join(ROOT, 'deploy', 'Dockerfile'), 'utf8')
const all = stages(parseDockerfile(dockerfile))
const final = all.at(-1) as Stage
const ops = (stage: Stage, op: string): Instruction[] => stage.instructions.filter(i => i.op === op)

test('a multi-stage build on Node 24 slim', () => {
  assert.ok(all.length >= 2, `${all.length} stages`)
  for (const s of all) {
    if (all.some(other => other.name === s.from)) continue // FROM an earlier stage
    assert.match(s.from, /^(docker\.io\/(library\/)?)?node:24(\.\d+){0,2}-(bookworm-|trixie-)?slim(@sha256:[0-9a-f]{64})?$/, `base image ${s.from}`)
  }
})

/** The stage a `COPY --from=NAME` in the final stage takes `source` from. */
function stageOf (name: string): Stage {
  const s = all.find(x => x.name === name)
  assert.ok(s !== undefined, `a stage named ${name}`)
  return s
}

test('the final stage installs nothing: its node_modules come from a stage that installs without devDependencies', () => {
  assert.ok(!ops(final, 'RUN').some(r => /\bnpm (ci|install|i)\b/.test(r.args)), 'the final stage installs nothing')
  const fromBuild = ops(final, 'COPY').map(c => copyArgs(c.args)).filter(c => c.from !== undefined)
  const modules = fromBuild.filter(c => c.sources.some(s => /node_modules\/?$/.test(s)))
  assert.equal(modules.length, 1, 'node_modules comes from one build stage')
  const installs = ops(stageOf((modules[0] as { from: string }).from), 'RUN').filter(r => /\bnpm ci\b/.test(r.args))
  assert.ok(installs.length > 0, 'that stage runs npm ci')
  for (const r of installs) assert.match(r.args, /--omit=dev\b/)
})

test('the final stage runs as a numeric non-root user', () => {
  const users = ops(final, 'USER')
  assert.ok(users.length > 0, 'the final stage sets USER')
  const m = /^(\d+)(?::(\d+))?$/.exec((users.at(-1) as Instruction).args.trim())
  assert.ok(m !== null, `USER ${(users.at(-1) as Instruction).args} is numeric (uid[:gid]), so runAsNonRoot can check it`)
  assert.notEqual(Number(m[1]), 0)
  if (m[2] !== undefined) assert.notEqual(Number(m[2]), 0)
})

test('every COPY source exists and is not excluded by .dockerignore', async () => {
  const ignored = (await readFile(path.join(ROOT, '.dockerignore'), 'utf8')).split('\n').map(l => l.trim()).filter(l => l !== '' && !l.startsWith('#'))
  for (const s of all) {
    for (const c of ops(s, 'COPY').map(c => copyArgs(c.args)).filter(c => c.from === undefined)) {
      for (const source of c.sources) {
        const clean = source.replace(/\/$/, '')
        assert.ok(existsSync(path.join(ROOT, clean)), `COPY ${source}: exists in the repository`)
        const excepted = ignored.includes(`!${clean}`)
        assert.ok(excepted || (!ignored.includes(clean) && !ignored.includes(clean.split('/')[0] as string)), `COPY ${source}: not in .dockerignore`)
      }
    }
  }
  // The build context must not carry what the image has no use for.
  for (const heavy of ['.git', 'node_modules', 'test', 'bench']) assert.ok(ignored.includes(heavy), `.dockerignore lists ${heavy}`)
})

/** The stage that compiles the program (runs deploy/build.ts), and the directory it writes. */
function compileStage (): { stage: Stage, out: string } {
  for (const stage of all.slice(0, -1)) {
    for (const r of ops(stage, 'RUN')) {
      const m = /\bnode deploy\/build\.ts\s+(\S+)/.exec(r.args)
      if (m !== null) return { stage, out: m[1] as string }
    }
  }
  assert.fail('a build stage runs node deploy/build.ts OUT')
}

test('the entrypoint is the compiled damselfly CLI, and the ports are the defaults', () => {
  const entry = ops(final, 'ENTRYPOINT').at(-1)
  assert.ok(entry !== undefined)
  assert.deepEqual(JSON.parse(entry.args), ['node', 'bin/damselfly.js'], 'exec form, so signals reach node')
  const workdir = ops(final, 'WORKDIR').at(-1)?.args ?? '/'
  const { stage, out } = compileStage()
  const copied = ops(final, 'COPY').map(c => copyArgs(c.args)).filter(c => c.from === stage.name)
  assert.ok(copied.some(c => c.sources.some(s => path.posix.normalize(s) === path.posix.normalize(out)) && path.posix.resolve(workdir, c.dest) === path.posix.normalize(workdir)), `the compiled tree (${out} of stage ${stage.name ?? '?'}) lands in the working directory, bin/ with it`)
  const exposed = ops(final, 'EXPOSE').flatMap(e => e.args.split(/\s+/)).map(Number).sort()
  const defaults = [PeerConfig.properties.p2pPort.default, PeerConfig.properties.port.default, PeerConfig.properties.uploadPort.default, SchedulerConfig.properties.port.default, SchedulerConfig.properties.httpPort.default] as number[]
  assert.deepEqual(exposed, [...defaults].sort())
})

test('what the image compiles is all the program imports at run time, and no devDependency', async () => {
  const { stage } = compileStage()
  const copied = ops(stage, 'COPY').map(c => copyArgs(c.args)).filter(c => c.from === undefined).flatMap(c => c.sources.map(s => s.replace(/\/$/, '')))
  const dirs = copied.filter(s => !s.includes('.'))
  assert.deepEqual([...dirs].sort(), ['bin', 'cli', 'peer', 'scheduler', 'src'])
  const runtime = new Set(Object.keys(pkg.dependencies))
  const builtins = new Set(builtinModules)
  let files = 0
  for (const dir of dirs) {
    for (const entry of await readdir(path.join(ROOT, dir), { recursive: true, withFileTypes: true })) {
      if (!entry.isFile() || !/\.(ts|js)$/.test(entry.name)) continue
      files++
      const file = path.join(entry.parentPath, entry.name)
      const text = await readFile(file, 'utf8')
      for (const m of text.matchAll(/(?:^|\n)\s*(?:import|export)\b[^'"]*?\bfrom\s+['"]([^'"]+)['"]|\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)|^import\s+['"]([^'"]+)['"]/gm)) {
        const spec = (m[1] ?? m[2] ?? m[3]) as string
        const where = `${path.relative(ROOT, file)} imports ${spec}`
        if (spec.startsWith('.')) {
          const target = path.relative(ROOT, path.resolve(path.dirname(file), spec))
          assert.ok(copied.some(c => target === c || target.startsWith(`${c}/`)), `${where}, which the image does not copy`)
        } else if (!spec.startsWith('node:') && !builtins.has(spec)) {
          const name = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0] as string
          assert.ok(runtime.has(name), `${where}, which is not a production dependency`)
        }
      }
    }
  }
  assert.ok(files > 50, `scanned ${files} files`)
})
