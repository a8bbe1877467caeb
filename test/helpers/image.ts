import { createCipheriv, createHash, randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises'
import path from 'node:path'
import { run } from './process.ts'
import { skopeoSandbox } from './skopeo.ts'

export interface BuiltBlob { digest: string, size: number, mediaType: string, path: string }

export interface BuiltImage {
  /** OCI image layout directory. */
  layoutDir: string
  tag: string
  /** The image manifest, or for a multi-platform image the index. */
  manifest: BuiltBlob
  /** The config (of the first platform, for an index). */
  config: BuiltBlob
  /** The layers (shared by every platform of an index). */
  layers: BuiltBlob[]
  /** For an index, the per-platform manifests (in `platforms` order); [] for a single-platform image. */
  platformManifests: BuiltBlob[]
  /** For an index, the per-platform configs (in `platforms` order); [config] for a single-platform image. */
  platformConfigs: BuiltBlob[]
  /** Every distinct blob: configs, layers, manifests and the index. */
  blobs: BuiltBlob[]
  /** Sum of the sizes of all distinct blobs, manifests included. */
  totalBytes: number
}

export interface BuildOptions {
  /** Layer sizes: each layer is a tar holding one file of this many random bytes. */
  layers: number[]
  /** Content is derived from it; the same seed gives the same blobs. Default: random. */
  seed?: string
  /** More than one makes an OCI index; the platforms share the layers and differ in their configs. Default linux/amd64. */
  platforms?: Array<{ os: string, architecture: string }>
  /** Default 'latest'. */
  tag?: string
}

export const MEDIA_TYPES = {
  layer: 'application/vnd.oci.image.layer.v1.tar',
  config: 'application/vnd.oci.image.config.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  index: 'application/vnd.oci.image.index.v1+json'
} as const

const REF_NAME = 'org.opencontainers.image.ref.name'
const CREATED = '2024-01-01T00:00:00Z'
const CHUNK = 1024 * 1024

function sha256 (data: Buffer | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`
}

function blobPath (layoutDir: string, digest: string): string {
  const m = /^sha256:([a-f0-9]{64})$/.exec(digest)
  if (m === null) throw new Error(`not a sha256 digest: ${digest}`)
  return path.join(layoutDir, 'blobs', 'sha256', m[1] as string)
}

function octal (value: number, width: number): string {
  // width - 1 digits, then a NUL
  return value.toString(8).padStart(width - 1, '0') + '\0'
}

/** A ustar header for one regular file. */
function tarHeader (name: string, size: number): Buffer {
  const h = Buffer.alloc(512)
  h.write(name, 0, 100, 'utf8')
  h.write(octal(0o644, 8), 100, 'ascii') // mode
  h.write(octal(0, 8), 108, 'ascii') // uid
  h.write(octal(0, 8), 116, 'ascii') // gid
  h.write(octal(size, 12), 124, 'ascii') // size
  h.write(octal(Date.parse(CREATED) / 1000, 12), 136, 'ascii') // mtime
  h.write('        ', 148, 'ascii') // checksum placeholder
  h.write('0', 156, 'ascii') // regular file
  h.write('ustar\0', 257, 'ascii')
  h.write('00', 263, 'ascii')
  let sum = 0
  for (const byte of h) sum += byte
  h.write(octal(sum, 7) + ' ', 148, 'ascii')
  return h
}

async function writeBlob (layoutDir: string, data: Buffer | string, mediaType: string): Promise<BuiltBlob> {
  const bytes = typeof data === 'string' ? Buffer.from(data) : data
  const digest = sha256(bytes)
  const file = blobPath(layoutDir, digest)
  await writeFile(file, bytes)
  return { digest, size: bytes.length, mediaType, path: file }
}

/**
 * Streams an uncompressed tar with one file `data.bin` of `size` pseudo-random
 * bytes (AES-256-CTR keystream keyed by the seed) to the layout, hashing as it goes.
 */
async function writeLayer (layoutDir: string, seed: string, index: number, size: number): Promise<BuiltBlob> {
  const key = createHash('sha256').update(`damselfly-test-layer\0${seed}\0${index}`).digest()
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16))
  const zeros = Buffer.alloc(CHUNK)
  const hash = createHash('sha256')
  const tmp = path.join(layoutDir, 'blobs', `.layer-${process.pid}-${randomBytes(6).toString('hex')}`)
  const fh = await open(tmp, 'w')
  let total = 0
  const put = async (chunk: Buffer): Promise<void> => {
    hash.update(chunk)
    total += chunk.length
    let off = 0
    while (off < chunk.length) off += (await fh.write(chunk, off)).bytesWritten
  }
  try {
    await put(tarHeader('data.bin', size))
    for (let left = size; left > 0; left -= CHUNK) {
      await put(cipher.update(left >= CHUNK ? zeros : zeros.subarray(0, left)))
    }
    const pad = (512 - (size % 512)) % 512
    await put(Buffer.alloc(pad + 1024)) // padding, then the two zero blocks that end the archive
  } catch (e) {
    await fh.close()
    await rm(tmp, { force: true })
    throw e
  }
  await fh.close()
  const digest = `sha256:${hash.digest('hex')}`
  const file = blobPath(layoutDir, digest)
  await rename(tmp, file)
  return { digest, size: total, mediaType: MEDIA_TYPES.layer, path: file }
}

function imageConfig (platform: { os: string, architecture: string }, layers: BuiltBlob[], seed: string): string {
  return JSON.stringify({
    created: CREATED,
    architecture: platform.architecture,
    os: platform.os,
    config: {
      Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'],
      Cmd: ['/bin/true'],
      Labels: { 'damselfly.test.seed': seed }
    },
    rootfs: { type: 'layers', diff_ids: layers.map((l) => l.digest) },
    history: layers.map((l, i) => ({ created: CREATED, created_by: `damselfly test layer ${i} (${l.size} bytes)` }))
  })
}

function descriptor (blob: BuiltBlob): { mediaType: string, digest: string, size: number } {
  return { mediaType: blob.mediaType, digest: blob.digest, size: blob.size }
}

/**
 * Builds an image into the OCI layout `dir` (created if needed; other tags already
 * in it are kept). Layers are uncompressed tars, so diff_ids equal layer digests.
 */
export async function buildImage (dir: string, opts: BuildOptions): Promise<BuiltImage> {
  const layoutDir = path.resolve(dir)
  const seed = opts.seed ?? randomBytes(8).toString('hex')
  const tag = opts.tag ?? 'latest'
  const platforms = opts.platforms ?? [{ os: 'linux', architecture: 'amd64' }]
  if (platforms.length === 0) throw new Error('buildImage: platforms must not be empty')
  await mkdir(path.join(layoutDir, 'blobs', 'sha256'), { recursive: true })
  await writeFile(path.join(layoutDir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }))

  const layers: BuiltBlob[] = []
  for (const [i, size] of opts.layers.entries()) layers.push(await writeLayer(layoutDir, seed, i, size))

  const configs: BuiltBlob[] = []
  const manifests: BuiltBlob[] = []
  for (const platform of platforms) {
    const config = await writeBlob(layoutDir, imageConfig(platform, layers, seed), MEDIA_TYPES.config)
    configs.push(config)
    manifests.push(await writeBlob(layoutDir, JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.manifest,
      config: descriptor(config),
      layers: layers.map(descriptor)
    }), MEDIA_TYPES.manifest))
  }

  let top: BuiltBlob
  if (platforms.length === 1) {
    top = manifests[0] as BuiltBlob
  } else {
    top = await writeBlob(layoutDir, JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.index,
      manifests: manifests.map((m, i) => ({ ...descriptor(m), platform: platforms[i] }))
    }), MEDIA_TYPES.index)
  }

  // index.json: keep other tags, point `tag` at the new top-level manifest.
  const indexFile = path.join(layoutDir, 'index.json')
  let existing: Array<{ annotations?: Record<string, string> }> = []
  try {
    const parsed = JSON.parse(await readFile(indexFile, 'utf8')) as { manifests?: typeof existing }
    existing = parsed.manifests ?? []
  } catch {}
  await writeFile(indexFile, JSON.stringify({
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.index,
    manifests: [
      ...existing.filter((m) => m.annotations?.[REF_NAME] !== tag),
      { ...descriptor(top), annotations: { [REF_NAME]: tag } }
    ]
  }))

  const distinct = new Map<string, BuiltBlob>()
  for (const blob of [...configs, ...layers, ...manifests, top]) distinct.set(blob.digest, blob)
  const blobs = [...distinct.values()]
  return {
    layoutDir,
    tag,
    manifest: top,
    config: configs[0] as BuiltBlob,
    layers,
    platformManifests: platforms.length === 1 ? [] : manifests,
    platformConfigs: configs,
    blobs,
    totalBytes: blobs.reduce((sum, b) => sum + b.size, 0)
  }
}

/** A blob of the image, read from its layout. */
export function readBlob (image: BuiltImage, digest: string): Buffer {
  return readFileSync(blobPath(image.layoutDir, digest))
}

/**
 * Pushes a built image with `skopeo copy --preserve-digests`, so that the
 * pushed digests are the built ones (skopeo would otherwise gzip the layers),
 * and checks the manifest digest the registry then serves.
 */
export async function pushImage (image: BuiltImage, target: string, opts: { creds?: string, tlsVerify?: boolean, all?: boolean } = {}): Promise<void> {
  const sandbox = await skopeoSandbox()
  try {
    const tls = `--dest-tls-verify=${opts.tlsVerify ?? false}`
    const creds = opts.creds !== undefined ? ['--dest-creds', opts.creds] : []
    const all = (opts.all ?? image.platformManifests.length > 0) ? ['--all'] : []
    await run('skopeo', [
      ...sandbox.globalArgs, 'copy', '--quiet', '--preserve-digests', '--authfile', sandbox.authFile,
      tls, ...creds, ...all,
      `oci:${image.layoutDir}:${image.tag}`, `docker://${target}`
    ], { env: sandbox.env })
    const { stdout } = await run('skopeo', [
      ...sandbox.globalArgs, 'inspect', '--raw', '--authfile', sandbox.authFile,
      `--tls-verify=${opts.tlsVerify ?? false}`, ...(opts.creds !== undefined ? ['--creds', opts.creds] : []),
      `docker://${target}`
    ], { env: sandbox.env, timeoutMs: 30_000 })
    // skopeo prints the raw manifest bytes; a trailing newline is its own.
    const raw = Buffer.from(stdout.endsWith('\n') ? stdout.slice(0, -1) : stdout)
    const got = sha256(raw)
    if (got !== image.manifest.digest && sha256(stdout) !== image.manifest.digest) {
      throw new Error(`pushed ${target} but the registry serves manifest ${got}, not ${image.manifest.digest}`)
    }
  } finally {
    await sandbox.cleanup()
  }
}
