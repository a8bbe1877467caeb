import { spawnSync } from 'node:child_process'
import * as models from 'kubernetes-models'
import { parseAllDocuments } from 'yaml'
import { run } from './process.ts'

/**
 * Rendering and validation of Kubernetes manifests for the deploy/ tests.
 *
 * Rendering is real kustomize: the one built into kubectl (`kubectl kustomize`,
 * kustomize v5 in kubectl >= 1.27), which the machine image has. Nothing here
 * re-implements kustomize.
 *
 * Validation is the Kubernetes API's OpenAPI schemas as compiled by the
 * `kubernetes-models` package (types, required fields, enums, formats). Those
 * schemas do not forbid unknown fields, so a misspelt key is not caught by
 * them; the cross-object checks in the tests catch the ones that matter
 * (probes, ports, volumes, references).
 */

/** One rendered object; fields are read with the accessors below. */
export interface K8sObject {
  apiVersion: string
  kind: string
  metadata: { name: string, namespace?: string, labels?: Record<string, string> }
  [field: string]: unknown
}

interface ModelClass {
  apiVersion: string
  kind: string
  new (data: unknown): { validate: () => void }
}

let modelIndex: Map<string, ModelClass> | undefined

/** Every model class of the package, by `apiVersion/kind`. */
function modelsByKind (): Map<string, ModelClass> {
  if (modelIndex !== undefined) return modelIndex
  const index = new Map<string, ModelClass>()
  const walk = (node: Record<string, unknown>, depth: number): void => {
    for (const value of Object.values(node)) {
      if (typeof value === 'function') {
        const cls = value as unknown as Partial<ModelClass>
        if (typeof cls.apiVersion === 'string' && typeof cls.kind === 'string') index.set(`${cls.apiVersion}/${cls.kind}`, value as unknown as ModelClass)
      } else if (value !== null && typeof value === 'object' && depth < 3) {
        walk(value as Record<string, unknown>, depth + 1)
      }
    }
  }
  walk(models as unknown as Record<string, unknown>, 0)
  modelIndex = index
  return index
}

/**
 * Checks one object against its Kubernetes API schema. Throws, naming the
 * object and the failing paths, when it does not conform or when its
 * apiVersion/kind is not a built-in Kubernetes type.
 */
export function validateObject (obj: unknown): void {
  const meta = obj as Partial<K8sObject> | null
  const id = `${meta?.kind ?? '?'}/${meta?.metadata?.name ?? '?'}`
  const Model = modelsByKind().get(`${meta?.apiVersion ?? ''}/${meta?.kind ?? ''}`)
  if (Model === undefined) throw new Error(`${id}: ${meta?.apiVersion ?? '(no apiVersion)'} ${meta?.kind ?? '(no kind)'} is not a Kubernetes API type`)
  try {
    new Model(obj).validate()
  } catch (err) {
    throw new Error(`${id} does not conform to the Kubernetes API schema: ${(err as Error).message}`, { cause: err })
  }
}

/** The kubectl the tests run; KUBECTL names another (the skip test names one that does not exist). */
const KUBECTL = process.env.KUBECTL ?? 'kubectl'

/**
 * Why the rendering tests cannot run here, or undefined when they can.
 * Debian does not package kubectl, so on a fresh machine they are skipped
 * with this reason rather than failed (README: "Set up and test").
 */
export function kubectlMissing (): string | undefined {
  const r = spawnSync(KUBECTL, ['version', '--client', '-o', 'json'], { encoding: 'utf8', timeout: 30_000 })
  if (r.error !== undefined || r.status !== 0) {
    return `kubectl is not on the PATH (${r.error?.message ?? `exit ${String(r.status)}`}): install kubectl >= 1.27 to render deploy/kubernetes (README: Set up and test)`
  }
  const minor = Number((JSON.parse(r.stdout) as { clientVersion?: { minor?: string } }).clientVersion?.minor?.replace(/\D/g, ''))
  if (minor < 27) return `kubectl 1.${minor} is too old: kustomize v5 comes with kubectl >= 1.27`
  return undefined
}

/** `kubectl kustomize DIR`, parsed into objects. */
export async function renderKustomization (dir: string): Promise<K8sObject[]> {
  const { stdout } = await run(KUBECTL, ['kustomize', dir], { timeoutMs: 60_000 })
  const objects: K8sObject[] = []
  for (const doc of parseAllDocuments(stdout)) {
    if (doc.errors.length > 0) throw new Error(`kustomize printed invalid YAML: ${doc.errors[0]?.message ?? ''}`)
    const value: unknown = doc.toJS()
    if (value !== null && value !== undefined) objects.push(value as K8sObject)
  }
  return objects
}

export interface Container {
  name: string
  image?: string
  command?: string[]
  args?: string[]
  env?: Array<{ name: string, value?: string, valueFrom?: { fieldRef?: { fieldPath: string }, secretKeyRef?: { name: string }, configMapKeyRef?: { name: string } } }>
  envFrom?: Array<{ secretRef?: { name: string }, configMapRef?: { name: string } }>
  ports?: Array<{ name?: string, containerPort: number, hostPort?: number }>
  readinessProbe?: Probe
  livenessProbe?: Probe
  startupProbe?: Probe
  resources?: { requests?: Record<string, string>, limits?: Record<string, string> }
  securityContext?: { allowPrivilegeEscalation?: boolean, readOnlyRootFilesystem?: boolean, runAsNonRoot?: boolean, runAsUser?: number, capabilities?: { drop?: string[], add?: string[] } }
  volumeMounts?: Array<{ name: string, mountPath: string, readOnly?: boolean }>
}

export interface Probe {
  httpGet?: { host?: string, path?: string, port: number | string }
  tcpSocket?: { port: number | string }
  exec?: { command: string[] }
}

export interface Volume {
  name: string
  configMap?: { name: string }
  secret?: { secretName: string }
  hostPath?: { path: string }
  emptyDir?: unknown
}

export interface PodSpec {
  serviceAccountName?: string
  hostNetwork?: boolean
  dnsPolicy?: string
  tolerations?: Array<{ operator?: string, key?: string }>
  securityContext?: { runAsNonRoot?: boolean, runAsUser?: number, fsGroup?: number }
  initContainers?: Container[]
  containers: Container[]
  volumes?: Volume[]
}

export interface Workload extends K8sObject {
  spec: {
    selector: { matchLabels: Record<string, string> }
    serviceName?: string
    template: { metadata: { labels: Record<string, string> }, spec: PodSpec }
    volumeClaimTemplates?: Array<{ metadata: { name: string } }>
  }
}

export interface PodDisruptionBudget extends K8sObject {
  spec: { minAvailable?: number | string, maxUnavailable?: number | string, selector: { matchLabels: Record<string, string> } }
}

export interface Service extends K8sObject {
  spec: { clusterIP?: string, selector: Record<string, string>, ports: Array<{ name?: string, port: number, targetPort?: number | string }> }
}

export const WORKLOAD_KINDS = new Set(['Deployment', 'DaemonSet', 'StatefulSet'])

export function isWorkload (obj: K8sObject): obj is Workload {
  return WORKLOAD_KINDS.has(obj.kind)
}

export function isService (obj: K8sObject): obj is Service {
  return obj.kind === 'Service'
}

/** Init containers and containers of a pod spec. */
export function allContainers (pod: PodSpec): Container[] {
  return [...(pod.initContainers ?? []), ...pod.containers]
}

/** Whether every label of `selector` is on `labels`. */
export function selects (selector: Record<string, string>, labels: Record<string, string>): boolean {
  return Object.entries(selector).every(([k, v]) => labels[k] === v)
}

/**
 * Problems with how the rendered objects refer to each other: Services and
 * PodDisruptionBudgets that select no pods, Services that target ports the
 * pods do not have, ConfigMaps, Secrets and
 * ServiceAccounts that do not exist, mounts of undeclared volumes, probes on
 * ports the container does not declare. An empty list means none found.
 */
export function crossObjectProblems (objects: K8sObject[]): string[] {
  const problems: string[] = []
  const names = (kind: string): Set<string> => new Set(objects.filter(o => o.kind === kind).map(o => o.metadata.name))
  const configMaps = names('ConfigMap')
  const secrets = names('Secret')
  const accounts = names('ServiceAccount')
  const workloads = objects.filter(isWorkload)

  for (const w of workloads) {
    const id = `${w.kind}/${w.metadata.name}`
    const pod = w.spec.template.spec
    if (!selects(w.spec.selector.matchLabels, w.spec.template.metadata.labels)) problems.push(`${id}: selector does not match its pod template's labels`)
    if (pod.serviceAccountName !== undefined && !accounts.has(pod.serviceAccountName)) problems.push(`${id}: ServiceAccount ${pod.serviceAccountName} does not exist`)
    const volumes = new Set([...(pod.volumes ?? []).map(v => v.name), ...(w.spec.volumeClaimTemplates ?? []).map(c => c.metadata.name)])
    for (const v of pod.volumes ?? []) {
      if (v.configMap !== undefined && !configMaps.has(v.configMap.name)) problems.push(`${id}: volume ${v.name} names ConfigMap ${v.configMap.name}, which does not exist`)
      if (v.secret !== undefined && !secrets.has(v.secret.secretName)) problems.push(`${id}: volume ${v.name} names Secret ${v.secret.secretName}, which does not exist`)
    }
    for (const c of allContainers(pod)) {
      for (const m of c.volumeMounts ?? []) {
        if (!volumes.has(m.name)) problems.push(`${id}/${c.name}: mounts volume ${m.name}, which the pod does not declare`)
      }
      for (const e of c.env ?? []) {
        const secret = e.valueFrom?.secretKeyRef?.name
        const map = e.valueFrom?.configMapKeyRef?.name
        if (secret !== undefined && !secrets.has(secret)) problems.push(`${id}/${c.name}: env ${e.name} names Secret ${secret}, which does not exist`)
        if (map !== undefined && !configMaps.has(map)) problems.push(`${id}/${c.name}: env ${e.name} names ConfigMap ${map}, which does not exist`)
      }
      for (const e of c.envFrom ?? []) {
        if (e.secretRef !== undefined && !secrets.has(e.secretRef.name)) problems.push(`${id}/${c.name}: envFrom names Secret ${e.secretRef.name}, which does not exist`)
        if (e.configMapRef !== undefined && !configMaps.has(e.configMapRef.name)) problems.push(`${id}/${c.name}: envFrom names ConfigMap ${e.configMapRef.name}, which does not exist`)
      }
      for (const [kind, probe] of [['readiness', c.readinessProbe], ['liveness', c.livenessProbe], ['startup', c.startupProbe]] as const) {
        const port = probe?.httpGet?.port ?? probe?.tcpSocket?.port
        if (port === undefined) continue
        const declared = (c.ports ?? []).some(p => typeof port === 'number' ? p.containerPort === port : p.name === port)
        // A numeric port need not be declared in the pod network either, but
        // here every probe must name a port the container says it listens on.
        if (!declared) problems.push(`${id}/${c.name}: ${kind} probe port ${port} is not one of the container's ports`)
      }
    }
  }

  for (const s of objects.filter(isService)) {
    const id = `Service/${s.metadata.name}`
    const targets = workloads.filter(w => w.metadata.namespace === s.metadata.namespace && selects(s.spec.selector, w.spec.template.metadata.labels))
    if (targets.length === 0) {
      problems.push(`${id}: its selector matches no pod template`)
      continue
    }
    for (const p of s.spec.ports) {
      const target = p.targetPort ?? p.port
      for (const w of targets) {
        const has = w.spec.template.spec.containers.some(c => (c.ports ?? []).some(cp => typeof target === 'number' ? cp.containerPort === target : cp.name === target))
        if (!has) problems.push(`${id}: port ${p.name ?? p.port} targets ${target}, which ${w.kind}/${w.metadata.name} does not expose`)
      }
    }
  }

  for (const pdb of objects.filter(o => o.kind === 'PodDisruptionBudget') as PodDisruptionBudget[]) {
    const selector = pdb.spec.selector.matchLabels
    const targets = workloads.filter(w => w.metadata.namespace === pdb.metadata.namespace && selects(selector, w.spec.template.metadata.labels))
    if (targets.length === 0) problems.push(`PodDisruptionBudget/${pdb.metadata.name}: its selector matches no pod template`)
  }
  return problems
}
