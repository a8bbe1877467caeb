import { randomBytes } from 'node:crypto'
import { constants } from 'node:fs'
import { copyFile, mkdir, open, readFile, readdir, rename, rm, rmdir, stat } from 'node:fs/promises'
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
  await replaceFile(file, text, mode)
  return backup === undefined ? { file, action: 'created' } : { file, action: 'updated', backup }
}

/**
 * Puts `data` at `file` by writing a temporary file beside it, syncing it and
 * renaming it over: a reader sees the old or the new content, never half.
 */
export async function replaceFile (file: string, data: string | Buffer, mode = 0o644): Promise<void> {
  const temp = path.join(path.dirname(file), `.${path.basename(file)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`)
  try {
    const fh = await open(temp, 'wx', mode)
    try {
      await fh.writeFile(data)
      await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(temp, file)
  } catch (err) {
    await rm(temp, { force: true })
    throw new StorageError(`cannot write ${file}: ${(err as Error).message}`, { cause: err })
  }
}

export interface RestoreResult {
  file: string
  /** restored: the latest backup that is not ours is back; removed: ours, with nothing to restore; kept: not ours. */
  action: 'restored' | 'removed' | 'kept' | 'absent'
  backup?: string
}

/**
 * Undoes writeConfigFile for a file `ours` recognises: the newest backup
 * that is not ours (what was there before this tool) goes back in place, by
 * rename; with none, the file goes (and its directory, when that leaves it
 * empty). Backups of our own earlier versions go too. A file that is not
 * ours is left as it is: someone changed it since.
 */
export async function restoreConfigFile (file: string, ours: (text: string) => boolean, options: { dryRun?: boolean } = {}): Promise<RestoreResult> {
  const current = await readOptional(file)
  if (current === undefined) return { file, action: 'absent' }
  if (!ours(current)) return { file, action: 'kept' }
  const dir = path.dirname(file)
  const prefix = `${path.basename(file)}.bak-`
  let names: string[]
  try {
    names = (await readdir(dir)).filter(n => n.startsWith(prefix))
  } catch (err) {
    throw new StorageError(`cannot list ${dir}: ${(err as Error).message}`, { cause: err })
  }
  // UTC stamps sort as text; a same-second "-2" copy sorts after its first.
  names.sort()
  let original: string | undefined
  // Backups of our own earlier versions go with the file.
  const oursToo: string[] = []
  for (const name of names.reverse()) {
    const text = await readOptional(path.join(dir, name))
    if (text === undefined) continue
    if (ours(text)) oursToo.push(path.join(dir, name))
    else original ??= path.join(dir, name)
  }
  if (options.dryRun === true) return original === undefined ? { file, action: 'removed' } : { file, action: 'restored', backup: original }
  try {
    for (const backup of oursToo) await rm(backup, { force: true })
    if (original === undefined) {
      await rm(file)
      await rmdir(dir).catch(() => {})
      return { file, action: 'removed' }
    }
    await rename(original, file)
  } catch (err) {
    throw new StorageError(`cannot restore ${file}: ${(err as Error).message}`, { cause: err })
  }
  return { file, action: 'restored', backup: original }
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
