import { symlink } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { build } from '../../deploy/build.ts'

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')

/**
 * The program compiled into `out` as the image holds it (deploy/build.ts),
 * with the checkout's dependencies linked beside it as the image copies
 * them. Returns the compiled launcher, for startPeer's `cli`.
 */
export async function compiledTree (out: string): Promise<string> {
  await build(out)
  await symlink(path.join(ROOT, 'node_modules'), path.join(out, 'node_modules'))
  return path.join(out, 'bin', 'damselfly.js')
}
