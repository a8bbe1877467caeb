import assert from 'node:assert/strict'
import { Readable } from 'node:stream'
import { test } from 'node:test'
import { silentLogger } from '../../src/logger.ts'
import type { BlobService } from '../../peer/blobs/index.ts'
import { fetchImage } from '../../peer/jobs/preheat.ts'
import { parseRegistryUrl } from '../../peer/upstream/index.ts'
import { FakeOrigin } from '../fakes/origin.ts'

const REPO = 'team/app'
const INDEX = 'application/vnd.oci.image.index.v1+json'

/** An index of three platforms, each a manifest with one config and one layer. */
function image (): { origin: FakeOrigin, byPlatform: Map<string, string[]> } {
  const origin = new FakeOrigin()
  const byPlatform = new Map<string, string[]>()
  const entries = []
  for (const [os, architecture, variant] of [['linux', 'amd64'], ['linux', 'arm', 'v7'], ['linux', 'arm64', 'v8']] as const) {
    const name = [os, architecture, ...(variant === undefined ? [] : [variant])].join('/')
    const config = origin.addBlob(REPO, Buffer.from(`config ${name}`))
    const layer = origin.addBlob(REPO, Buffer.from(`layer ${name}`))
    const manifest = origin.addManifest(REPO, name.replaceAll('/', '-'), { schemaVersion: 2, config: { digest: config, size: 1 }, layers: [{ digest: layer, size: 1 }] })
    byPlatform.set(name, [manifest, config, layer])
    entries.push({ digest: manifest, size: 1, platform: { os, architecture, ...(variant === undefined ? {} : { variant }) } })
  }
  origin.addManifest(REPO, 'v1', { schemaVersion: 2, mediaType: INDEX, manifests: entries }, INDEX)
  return { origin, byPlatform }
}

/** Blobs as the data path would hand them out: manifests read whole, everything else completed. */
function blobsOver (origin: FakeOrigin): BlobService {
  return {
    async open (request: { digest: string, kind: string }) {
      const body = request.kind === 'manifest' ? origin.manifests.get(request.digest)?.data : origin.blobs.get(request.digest)?.data
      return { task: { size: body?.length ?? 0 }, read: async () => Readable.from([body ?? Buffer.alloc(0)]) }
    },
    async complete () {}
  } as unknown as BlobService
}

test('a preheat takes the index, then the platforms asked for: any variant without one, that variant with one', async () => {
  const { origin, byPlatform } = image()
  const upstream = { ...parseRegistryUrl('http://registry.test:5000'), trusted: true }
  const run = async (platform: string | undefined): Promise<string[]> => {
    const results = await fetchImage({ logger: silentLogger(), origin, blobs: blobsOver(origin) }, { upstream, repo: REPO, reference: 'v1', platform }, {})
    assert.ok(results.every(r => r.status === 'SUCCESS'))
    return results.slice(1).map(r => r.digest).sort()
  }
  const of = (...names: string[]): string[] => names.flatMap(n => byPlatform.get(n) ?? []).sort()
  assert.deepEqual(await run(undefined), of('linux/amd64', 'linux/arm/v7', 'linux/arm64/v8'))
  assert.deepEqual(await run('linux/arm64'), of('linux/arm64/v8'))
  assert.deepEqual(await run('linux/arm/v7'), of('linux/arm/v7'))
  assert.deepEqual(await run('linux/amd64'), of('linux/amd64'))
  assert.deepEqual(await run('linux/arm/v6'), [])
  assert.deepEqual(await run('windows/amd64'), [])
})
