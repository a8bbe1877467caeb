/** A parsed `WWW-Authenticate` challenge (RFC 7235), as registries send them. */
export interface Challenge {
  scheme: string
  params: Record<string, string>
}

/** Parses the first challenge of a `WWW-Authenticate` header: `Bearer realm="…",service="…"`. */
export function parseChallenge (header: string | undefined): Challenge | undefined {
  if (header === undefined) return undefined
  const m = /^\s*([A-Za-z][\w-]*)\s*(.*)$/s.exec(header)
  if (m === null) return undefined
  const params: Record<string, string> = {}
  const re = /([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?\s*/gy
  const rest = m[2] as string
  let p: RegExpExecArray | null
  while ((p = re.exec(rest)) !== null && p[0] !== '') {
    params[(p[1] as string).toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : (p[3] ?? '')
  }
  return { scheme: (m[1] as string).toLowerCase(), params }
}
