import path from 'node:path'
import { parseArgs } from 'node:util'
import { parseEndpoint } from './clients/registry.ts'
import { AbortError, ConfigError, isDamselflyError } from '../src/errors.ts'
import { createImageGetter, parseImageRef, platformFlag } from './get/index.ts'
import { parseDigest } from '../src/oci/digest.ts'
import { hostPlatform, type Platform } from '../src/oci/platform.ts'
import { createProgressRenderer, formatBytes } from './progress.ts'

const HELP = `Fetch a blob, or a whole image into an OCI layout, through the peer, verified

Usage:
  damselfly get REGISTRY/REPO@sha256:DIGEST [-o FILE]
  damselfly get REGISTRY/REPO[:TAG|@DIGEST] --oci DIR [--platform os/arch[/variant]]

  -o, --output FILE   where the blob goes [default: its hex digest, here]
  --oci DIR           write the image into the OCI image layout DIR (kept blobs are re-verified, not re-fetched)
  --platform P        the platform to take from a multi-platform image [default: ${hostPlatform().os}/${hostPlatform().architecture}]
  --peer URL          the peer's mirror [env DAMSELFLY_PEER, default http://127.0.0.1:4001]
  --username U        registry user; the password is read from stdin with --password-stdin

REGISTRY may carry http:// for a plain-http registry; without a registry the reference is Docker Hub's.
Nothing is written under its final name until its digest matched.
`

export async function runGet (argv: string[]): Promise<number> {
  let values: Record<string, string | boolean | undefined>
  let positionals: string[]
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        output: { type: 'string', short: 'o' },
        oci: { type: 'string' },
        platform: { type: 'string' },
        peer: { type: 'string' },
        username: { type: 'string' },
        'password-stdin': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' }
      }
    }))
  } catch (err) {
    return usageError((err as Error).message)
  }
  if (values.help === true) {
    process.stdout.write(HELP)
    return 0
  }

  let parsed: ReturnType<typeof parseRequest>
  try {
    parsed = parseRequest(values, positionals)
  } catch (err) {
    if (err instanceof ConfigError) return usageError(err.message)
    throw err
  }
  const { ref, peer, oci, output, platform } = parsed

  let password: string | undefined
  if (values['password-stdin'] === true) {
    const chunks: Buffer[] = []
    for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
    password = Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '')
  }

  const controller = new AbortController()
  const onSignal = (): void => {
    if (controller.signal.aborted) process.exit(130)
    controller.abort(new AbortError('damselfly get'))
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  const render = createProgressRenderer(process.stderr)
  const getter = createImageGetter({}, { peer, username: values.username as string | undefined, password })
  try {
    if (oci !== undefined) {
      const result = await getter.image(ref, oci, { signal: controller.signal, onProgress: render, platform })
      process.stdout.write(`${oci}: manifest ${result.manifest}, ${result.blobs} blobs (${result.fetched} fetched, ${result.skipped} already there)\n`)
    } else {
      const result = await getter.blob(ref, output as string, { signal: controller.signal, onProgress: render })
      process.stdout.write(`${output as string}: ${result.digest}, ${formatBytes(result.size)}, verified\n`)
    }
    return 0
  } catch (err) {
    if (process.stderr.isTTY) process.stderr.write('\r\x1b[2K')
    if (controller.signal.aborted) {
      process.stderr.write('damselfly get: interrupted; partial files removed\n')
      return 130
    }
    if (!isDamselflyError(err)) throw err
    let hint = ''
    if (err.code === 'DF_ERR_UNAUTHORIZED' && values.username === undefined) hint = '; give --username and --password-stdin'
    if (err.code === 'DF_ERR_BLOB_DIGEST_MISMATCH') hint = '; nothing was kept'
    if (err.code === 'DF_ERR_PEER_UNAVAILABLE') hint = ` (is a peer running at ${peer}? set --peer or DAMSELFLY_PEER)`
    process.stderr.write(`damselfly get: ${err.message}${hint} (${err.code})\n`)
    return 1
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
    await getter.close()
  }
}

function parseRequest (values: Record<string, string | boolean | undefined>, positionals: string[]): {
  ref: ReturnType<typeof parseImageRef>
  peer: string
  oci: string | undefined
  output: string | undefined
  platform: Platform | undefined
} {
  if (positionals.length !== 1) throw new ConfigError('reference', 'give exactly one reference, e.g. harbor.example/team/app@sha256:…')
  const ref = parseImageRef(positionals[0] as string)
  const peer = parseEndpoint((values.peer as string | undefined) ?? nonEmpty(process.env.DAMSELFLY_PEER) ?? 'http://127.0.0.1:4001', '--peer').url
  const oci = values.oci as string | undefined
  let output = values.output as string | undefined
  if (oci !== undefined && output !== undefined) throw new ConfigError('--output', 'give --output for a blob or --oci for an image, not both')
  if (oci === undefined) {
    if (ref.digest === undefined) throw new ConfigError('reference', 'a tag names an image: add --oci DIR, or name a blob by digest (REPO@sha256:…)')
    if (values.platform !== undefined) throw new ConfigError('--platform', 'only applies with --oci')
    output ??= parseDigest(ref.digest).hex
    if (output === '' || output.endsWith(path.sep)) throw new ConfigError('--output', 'name a file')
  }
  if (values['password-stdin'] === true && values.username === undefined) throw new ConfigError('--password-stdin', 'needs --username')
  const platform = values.platform === undefined ? undefined : platformFlag(values.platform as string)
  return { ref, peer, oci, output, platform }
}

function nonEmpty (value: string | undefined): string | undefined {
  return value === undefined || value.trim() === '' ? undefined : value
}

function usageError (message: string): number {
  process.stderr.write(`damselfly get: ${message}\nRun damselfly get --help for usage.\n`)
  return 2
}
