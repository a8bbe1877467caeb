/** A platform as image indexes name it (`platform` of an index entry). */
export interface Platform {
  os: string
  architecture: string
  variant?: string | undefined
}

const PART = /^[a-z0-9_.-]{1,32}$/
const ARCH: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64', loong64: 'loong64' }

/** `os/arch[/variant]`, e.g. `linux/arm64/v8`; undefined when `value` is not one. */
export function parsePlatform (value: string): Platform | undefined {
  const parts = value.trim().split('/')
  if (parts.length < 2 || parts.length > 3 || parts.some(p => !PART.test(p))) return undefined
  return { os: parts[0] as string, architecture: parts[1] as string, variant: parts[2] }
}

export function formatPlatform (p: Platform): string {
  return `${p.os}/${p.architecture}${p.variant === undefined ? '' : `/${p.variant}`}`
}

/** The platform of this machine as image indexes name it. */
export function hostPlatform (): Platform {
  return { os: process.platform === 'win32' ? 'windows' : process.platform, architecture: ARCH[process.arch] ?? process.arch }
}

/** Same os and architecture, and the same variant when `want` names one (`linux/arm64` takes any arm64). */
export function matchesPlatform (candidate: Partial<Platform> | undefined, want: Platform): boolean {
  return candidate?.os === want.os && candidate.architecture === want.architecture && (want.variant === undefined || candidate.variant === want.variant)
}

/** The first entry of an index for `want`. */
export function pickPlatform<T extends { platform?: Partial<Platform> | undefined }> (manifests: readonly T[], want: Platform): T | undefined {
  return manifests.find(m => matchesPlatform(m.platform, want))
}
