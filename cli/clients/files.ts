import { randomBytes } from 'node:crypto'
import { constants } from 'node:fs'
import { copyFile, mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises'
import path from 'node:path'
import { ConfigError, StorageError } from '../../src/errors.ts'

export interface WriteResult {
  file: string
  action: 'created' | 'updated' | 'unchanged'
  /** The copy of the previous content, when there was a different one. */
  backup?: string
}

/** Reads a file, or undefined when it does not exist. */
export async function readOptional (file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw new StorageError(`cannot read ${file}: ${(err as Error).message}`, { cause: err })
  }
}

/**
 * Writes a client's configuration file the way an operator would want it done
 * by a tool: nothing happens when the content is already right (so a second
 * run changes nothing and leaves no second backup); different existing content
 * is first copied to `FILE.bak-<UTC timestamp>` (never over an earlier backup);
 * the new content lands with a rename, so a daemon reading the file sees the
 * old or the new version and never half of one.
 */
export async function writeConfigFile (file: string, text: string, options: { now?: Date } = {}): Promise<WriteResult> {
  const existing = await readOptional(file)
  if (existing === text) return { file, action: 'unchanged' }
  const dir = path.dirname(file)
  let backup: string | undefined
  let mode = 0o644
  try {
    await mkdir(dir, { recursive: true })
    if (existing !== undefined) {
      mode = (await stat(file)).mode & 0o7777
      backup = await backupFile(file, options.now ?? new Date())
    }
  } catch (err) {
    throw new StorageError(`cannot prepare ${file}: ${(err as Error).message}`, { cause: err })
  }
  const temp = path.join(dir, `.${path.basename(file)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`)
  try {
    const fh = await open(temp, 'wx', mode)
    try {
      await fh.writeFile(text)
      await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(temp, file)
  } catch (err) {
    await rm(temp, { force: true })
    throw new StorageError(`cannot write ${file}: ${(err as Error).message}`, { cause: err })
  }
  return backup === undefined ? { file, action: 'created' } : { file, action: 'updated', backup }
}

async function backupFile (file: string, now: Date): Promise<string> {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')
  for (let n = 1; n <= 100; n++) {
    const candidate = `${file}.bak-${stamp}${n === 1 ? '' : `-${n}`}`
    try {
      await copyFile(file, candidate, constants.COPYFILE_EXCL)
      return candidate
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
  }
  throw new StorageError(`too many backups of ${file} at ${stamp}`)
}

/**
 * `dir/name`, refusing any name that would leave `dir`. Names come out of
 * parseClientRegistry already clean; this is the second lock on the door.
 */
export function childPath (dir: string, name: string, flag: string): string {
  const root = path.resolve(dir)
  const child = path.resolve(root, name)
  if (name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\\') || name.includes('\0') || path.dirname(child) !== root) {
    throw new ConfigError(flag, `${JSON.stringify(name)} would be written outside ${root}`)
  }
  return child
}
