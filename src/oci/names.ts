import { InvalidNameError, InvalidReferenceError } from '../errors.ts'
import { isDigest } from './digest.ts'

// Grammar from the OCI distribution spec ("Pulling manifests"): path components
// separated by '/', each lowercase alphanumerics joined by '.', '_', '__' or '-'.
const COMPONENT = '[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*'
const NAME = new RegExp(`^${COMPONENT}(?:/${COMPONENT})*$`)
const TAG = /^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$/

/** Longest repository name accepted; the spec asks clients to stay under 255 with the host. */
export const MAX_NAME_LENGTH = 255

export function validateName (name: string): string {
  if (name.length === 0 || name.length > MAX_NAME_LENGTH || !NAME.test(name)) throw new InvalidNameError(name)
  return name
}

export function isTag (reference: string): boolean {
  return TAG.test(reference)
}

/** A manifest reference is a tag or a digest. */
export function validateReference (reference: string): { kind: 'tag' | 'digest', value: string } {
  if (isTag(reference)) return { kind: 'tag', value: reference }
  if (isDigest(reference)) return { kind: 'digest', value: reference }
  throw new InvalidReferenceError(reference)
}
