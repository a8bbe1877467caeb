import { parseClientRegistry, type ClientRegistry } from '../clients/registry.ts'
import { ConfigError, isDamselflyError } from '../../src/errors.ts'
import { parseDigest } from '../../src/oci/digest.ts'
import { isTag, validateName } from '../../src/oci/names.ts'
import { parsePlatform, type Platform } from '../../src/oci/platform.ts'

/** An image or blob reference as `damselfly get` takes it. */
export interface ImageRef {
  registry: ClientRegistry
  /**
   * Whether the reference wrote `http://` or `https://`. Without one the peer
   * decides, by its registries list (unlisted hosts are https), as it does for
   * containerd's `ns=` and for preheat jobs: one rule for every way in.
   */
  schemeGiven: boolean
  repository: string
  tag?: string | undefined
  digest?: string | undefined
}

/**
 * `[http(s)://]REGISTRY/REPO[:TAG][@DIGEST]`, or a Docker Hub short form
 * (`nginx:1.27` is `docker.io/library/nginx:1.27`). A first component is a
 * registry when it has a dot or a port, is `localhost`, or a scheme precedes it.
 */
export function parseImageRef (value: string): ImageRef {
  const fail = (why: string): never => { throw new ConfigError('reference', `${JSON.stringify(value.length > 200 ? `${value.slice(0, 200)}…` : value)}: ${why}`) }
  let rest = value.trim()
  const scheme = /^(https?):\/\//i.exec(rest)
  if (scheme !== null) rest = rest.slice(scheme[0].length)
  const slash = rest.indexOf('/')
  const first = slash === -1 ? '' : rest.slice(0, slash)
  let registryText: string
  let path: string
  if (scheme !== null || first.includes('.') || first.includes(':') || first === 'localhost') {
    if (slash === -1) fail('expected REGISTRY/REPOSITORY')
    registryText = `${scheme === null ? '' : `${(scheme[1] as string).toLowerCase()}://`}${first}`
    path = rest.slice(slash + 1)
  } else {
    registryText = 'docker.io'
    path = rest
  }
  let registry: ClientRegistry
  try {
    registry = parseClientRegistry(registryText, 'reference')
  } catch (err) {
    return fail(`bad registry: ${(err as Error).message.replace(/^reference: /, '')}`)
  }
  let digest: string | undefined
  const at = path.indexOf('@')
  if (at !== -1) {
    digest = path.slice(at + 1)
    path = path.slice(0, at)
    try {
      parseDigest(digest)
    } catch (err) {
      fail(isDamselflyError(err) ? err.message : 'bad digest')
    }
  }
  let tag: string | undefined
  const colon = path.lastIndexOf(':')
  if (colon > path.lastIndexOf('/')) {
    tag = path.slice(colon + 1)
    path = path.slice(0, colon)
    if (!isTag(tag)) fail(`bad tag ${JSON.stringify(tag)}`)
  }
  if (registry.dockerHub && !path.includes('/')) path = `library/${path}`
  try {
    validateName(path)
  } catch {
    fail(`bad repository name ${JSON.stringify(path)} (lowercase letters, digits and . _ - separators, / between components)`)
  }
  return { registry, schemeGiven: scheme !== null, repository: path, tag, digest }
}

/** `--platform os/arch[/variant]`. */
export function platformFlag (value: string): Platform {
  const platform = parsePlatform(value)
  if (platform === undefined) throw new ConfigError('--platform', `${JSON.stringify(value)}: expected os/arch[/variant], e.g. linux/amd64`)
  return platform
}
