import { mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'

export interface TmpDir {
  path: string
  cleanup(): Promise<void>
}

/** A fresh directory under os.tmpdir(); `cleanup()` removes it and everything in it. */
export async function tmpDir (prefix: string): Promise<TmpDir> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix.endsWith('-') ? prefix : `${prefix}-`))
  return {
    path: dir,
    async cleanup () {
      await rm(dir, { recursive: true, force: true, maxRetries: 3 })
    }
  }
}
