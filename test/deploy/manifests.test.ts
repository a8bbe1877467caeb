import assert from 'node:assert/strict'
import { spawnSync } from 'node:child_process'
import { readFile, writeFile, access, chmod, mkdir } from 'node:fs/promises'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs, type ParseArgsConfig } from 'node:util'
import { before, describe, test } from 'node:test'
import { parse as parseYaml, stringify as stringifyYaml } from 'yaml'
import pkg from '../../package.json' with { type: 'json' }
import { PeerConfig, SchedulerConfig, loadPeerConfig, loadSchedulerConfig, settingsOf } from '../../src/config/index.ts'
import { ConfigError } from '../../src/errors.ts'
import { runCli } from '../helpers/cli.ts'
import {
  allContainers, crossObjectProblems, isService, isWorkload, kubectlMissing, renderKustomization, selects, validateObject,
  type Container, type K8sObject, type PodDisruptionBudget, type Service, type Workload
} from '../helpers/kubernetes.ts'
import { freePort } from '../helpers/ports.ts'
import { run, spawnProcess, waitFor } from '../helpers/process.ts'
import { tmpDir } from '../helpers/tmp.ts'

// Renders deploy/kubernetes with real kustomize (kubectl's), validates every
// object against the Kubernetes API schemas from the kubernetes-models package,
// then checks what those schemas cannot see: that the objects fit together and
// that the damselfly configuration each pod would run with is one the real
// config loaders accept. Without kubectl the rendering tests are skipped, with
// the reason, and the rest run.

const NO_KUBECTL = kubectlMissing()
if (NO_KUBECTL !== undefined) process.stdout.write(`# deploy/kubernetes rendering skipped: ${NO_KUBECTL}\n`)

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..')
const BASE = path.join(ROOT, 'deploy', 'kubernetes', 'base')
const HARBOR = path.join(ROOT, 'deploy', 'kubernetes', 'overlays', 'harbor')
const IPV6 = path.join(ROOT, 'deploy', 'kubernetes', 'overlays', 'ipv6')

/** What the committed cluster-secret.txt and redis-password.txt hold; README.md tells to replace them. */
const PLACEHOLDER_SECRET = 'REPLACE-ME'
const IMAGE = `registry.example.com/damselfly/damselfly:${pkg.version}`
/** The Redis the scheduler replicas share: the official image, pinned by tag. */
const REDIS_IMAGE = 'redis:7-alpine'
const REDIS = { statefulSet: 'damselfly-redis', service: 'damselfly-redis', port: 6379, secret: 'damselfly-redis' }
/** Downward API values a node would fill in. */
const FIELDS: Record<string, string> = { 'status.hostIP': '10.0.3.7', 'status.podIP': '10.244.5.9', 'spec.nodeName': 'node-a' }
/** The downward API's answers on an IPv6-only cluster. */
const FIELDS_V6: Record<string, string> = { 'status.hostIP': 'fd00:3::7', 'status.podIP': 'fd00:244:5::9', 'spec.nodeName': 'node-a' }
const TEST_SECRET = 'a-test-cluster-secret-that-is-long-enough'

type Scheduler = Workload & {
  spec: {
    replicas?: number
    strategy?: unknown
    template: { spec: { topologySpreadConstraints?: Array<{ maxSkew: number, topologyKey: string, whenUnsatisfiable: string, labelSelector?: { matchLabels?: Record<string, string> } }> } }
  }
}

type RedisSet = Workload & { spec: { replicas?: number } }

interface ClaimTemplate { metadata: { name: string }, spec: { accessModes?: string[], resources?: { requests?: { storage?: string } } } }

function find<T extends K8sObject> (objects: K8sObject[], kind: string, name: string): T {
  const obj = objects.find(o => o.kind === kind && o.metadata.name === name)
  assert.ok(obj !== undefined, `${kind}/${name} is rendered`)
  return obj as T
}

/** A generated object, whose name kustomize suffixes with a content hash. */
function generated (objects: K8sObject[], kind: string, prefix: string): K8sObject & { data: Record<string, string> } {
  const found = objects.filter(o => o.kind === kind && new RegExp(`^${prefix}-[a-z0-9]{10}$`).test(o.metadata.name))
  assert.equal(found.length, 1, `one ${kind} generated as ${prefix}-<hash>`)
  return found[0] as K8sObject & { data: Record<string, string> }
}

function container (w: Workload, name: string): Container {
  const c = allContainers(w.spec.template.spec).find(c => c.name === name)
  assert.ok(c !== undefined, `${w.kind}/${w.metadata.name} has a container ${name}`)
  return c
}

/** The container's environment as the kubelet would set it: fieldRefs filled in, $(VAR) expanded. */
function containerEnv (c: Container, fields: Record<string, string> = FIELDS): Record<string, string> {
  const env: Record<string, string> = {}
  for (const e of c.env ?? []) {
    if (e.valueFrom?.fieldRef !== undefined) {
      const value = fields[e.valueFrom.fieldRef.fieldPath]
      assert.ok(value !== undefined, `env ${e.name}: no test value for ${e.valueFrom.fieldRef.fieldPath}`)
      env[e.name] = value
      continue
    }
    assert.ok(e.valueFrom === undefined, `env ${e.name}: only fieldRefs are expected here`)
    env[e.name] = (e.value ?? '').replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (all, name: string) => {
      assert.ok(name in env, `env ${e.name} refers to $(${name}), which is not defined before it`)
      return env[name] ?? all
    })
  }
  return env
}

/** Content of the file at `file` inside the container: a key of a mounted ConfigMap or Secret. */
function mountedFile (objects: K8sObject[], w: Workload, c: Container, file: string): string {
  const mount = (c.volumeMounts ?? []).find(m => path.dirname(file) === m.mountPath)
  assert.ok(mount !== undefined, `${c.name}: nothing is mounted at ${path.dirname(file)} (for ${file})`)
  const volume = (w.spec.template.spec.volumes ?? []).find(v => v.name === mount.name)
  const key = path.basename(file)
  if (volume?.configMap !== undefined) {
    const map = find<K8sObject & { data: Record<string, string> }>(objects, 'ConfigMap', volume.configMap.name)
    assert.ok(key in map.data, `ConfigMap ${map.metadata.name} has a key ${key}`)
    return map.data[key] as string
  }
  if (volume?.secret !== undefined) {
    const secret = find<K8sObject & { data: Record<string, string> }>(objects, 'Secret', volume.secret.secretName)
    assert.ok(key in secret.data, `Secret ${secret.metadata.name} has a key ${key}`)
    return Buffer.from(secret.data[key] as string, 'base64').toString('utf8')
  }
  throw new assert.AssertionError({ message: `${file} is on volume ${mount.name}, which is not a ConfigMap or Secret` })
}

interface Invocation {
  command: string
  file: string
  env: Record<string, string>
  flags: Record<string, string | boolean | string[] | undefined>
  /** The --config file as mounted, before any path in it was pointed at a copy. */
  mounted: Record<string, unknown>
}

/**
 * What `damselfly` would be started with in this container: the subcommand, its
 * flags (parsed as strictly as the CLI parses them), the environment, and the
 * --config file written to `dir` with the cluster secret file pointed at a copy
 * holding `secret` (the mounted one when undefined), and the Redis password file
 * (statePasswordFile) at a copy of the mounted one.
 */
async function invocation (objects: K8sObject[], w: Workload, c: Container, dir: string, secret?: string, fields: Record<string, string> = FIELDS): Promise<Invocation> {
  assert.equal(c.command, undefined, `${c.name} runs the image's entrypoint`)
  const [command, ...argv] = c.args ?? []
  assert.ok(command === 'peer' || command === 'scheduler', `${c.name} runs damselfly peer or scheduler, not ${String(command)}`)
  const options: NonNullable<ParseArgsConfig['options']> = { config: { type: 'string' } }
  for (const s of settingsOf(command === 'peer' ? PeerConfig : SchedulerConfig)) {
    options[s.flag] = s.schema.type === 'boolean' ? { type: 'boolean' } : s.schema.type === 'array' ? { type: 'string', multiple: true } : { type: 'string' }
  }
  const { values } = parseArgs({ args: argv, options, strict: true, allowPositionals: false })
  const flags = values as Invocation['flags']
  assert.equal(typeof flags.config, 'string', `${c.name} passes --config`)
  const text = mountedFile(objects, w, c, flags.config as string)
  const yaml = parseYaml(text) as { swarm?: { clusterSecretFile?: string }, statePasswordFile?: string }
  const secretFile = yaml.swarm?.clusterSecretFile
  assert.ok(secretFile !== undefined, `${c.name}: the config names swarm.clusterSecretFile`)
  const secretCopy = path.join(dir, `${w.metadata.name}-${c.name}-secret`)
  await writeFile(secretCopy, secret ?? mountedFile(objects, w, c, secretFile))
  yaml.swarm = { ...yaml.swarm, clusterSecretFile: secretCopy }
  if (yaml.statePasswordFile !== undefined) {
    const passwordCopy = path.join(dir, `${w.metadata.name}-${c.name}-state-password`)
    await writeFile(passwordCopy, mountedFile(objects, w, c, yaml.statePasswordFile))
    yaml.statePasswordFile = passwordCopy
  }
  const file = path.join(dir, `${w.metadata.name}-${c.name}.yaml`)
  await writeFile(file, stringifyYaml(yaml))
  return { command, file, env: containerEnv(c, fields), flags, mounted: parseYaml(text) as Record<string, unknown> }
}

for (const [label, dir, fields, ip] of [['base', BASE, FIELDS, 'ip4'], ['overlay harbor', HARBOR, FIELDS, 'ip4'], ['overlay ipv6', IPV6, FIELDS_V6, 'ip6']] as const) {
  describe(`deploy/kubernetes ${label}`, { skip: NO_KUBECTL }, () => {
    let objects: K8sObject[] = []
    before(async () => { objects = await renderKustomization(dir) })

    test('every object conforms to the Kubernetes API schema', () => {
      assert.ok(objects.length >= 10, `rendered ${objects.length} objects`)
      for (const obj of objects) validateObject(obj)
      const kinds = objects.map(o => `${o.kind}/${o.metadata.name.replace(/-[a-z0-9]{10}$/, '')}`).sort()
      assert.deepEqual(kinds, [
        'ConfigMap/damselfly-config', 'DaemonSet/damselfly-peer', 'Deployment/damselfly-scheduler', 'Namespace/damselfly',
        'PodDisruptionBudget/damselfly-scheduler',
        'Secret/damselfly-cluster-secret', 'Secret/damselfly-redis',
        'Service/damselfly-redis', 'Service/damselfly-scheduler', 'Service/damselfly-seed-peer',
        'ServiceAccount/damselfly-peer', 'ServiceAccount/damselfly-redis', 'ServiceAccount/damselfly-scheduler', 'ServiceAccount/damselfly-seed-peer',
        'StatefulSet/damselfly-redis', 'StatefulSet/damselfly-seed-peer'
      ])
    })

    test('objects refer only to what exists, and every Service reaches a port of its pods', () => {
      assert.deepEqual(crossObjectProblems(objects), [])
      for (const obj of objects) {
        if (obj.kind === 'Namespace') assert.equal(obj.metadata.name, 'damselfly')
        else assert.equal(obj.metadata.namespace, 'damselfly', `${obj.kind}/${obj.metadata.name} is in the damselfly namespace`)
      }
    })

    test('every container runs its pinned image, unprivileged, within limits', () => {
      for (const w of objects.filter(isWorkload)) {
        const pod = w.spec.template.spec
        const image = w.metadata.name === REDIS.statefulSet ? REDIS_IMAGE : IMAGE
        assert.equal(pod.securityContext?.runAsNonRoot, true, `${w.metadata.name}: pod runs as non-root`)
        assert.ok((pod.securityContext?.runAsUser ?? 0) > 0, `${w.metadata.name}: pod uid is not 0`)
        for (const c of allContainers(pod)) {
          const id = `${w.metadata.name}/${c.name}`
          assert.equal(c.image, image, `${id} runs ${image}`)
          assert.equal(c.securityContext?.allowPrivilegeEscalation, false, `${id}: no privilege escalation`)
          assert.equal(c.securityContext?.readOnlyRootFilesystem, true, `${id}: read-only root`)
          assert.deepEqual(c.securityContext?.capabilities?.drop, ['ALL'], `${id}: drops every capability`)
          assert.ok(c.resources?.requests?.cpu !== undefined && c.resources.requests.memory !== undefined, `${id}: has requests`)
          assert.ok(c.resources.limits?.cpu !== undefined && c.resources.limits.memory !== undefined, `${id}: has limits`)
          // Only the init containers that write root-owned host directories run as root.
          if (c.securityContext?.runAsUser === 0) assert.ok(pod.initContainers?.includes(c), `${id}: only init containers run as root`)
        }
        // Redis's probes are redis-cli pings (the Redis tests below).
        if (image !== IMAGE) continue
        for (const c of pod.containers) {
          for (const probe of [c.readinessProbe, c.livenessProbe]) assert.equal(probe?.httpGet?.path, '/healthy', `${w.metadata.name}/${c.name}: probes GET /healthy`)
        }
      }
    })

    test('the cluster secret is the documented placeholder, which peers and the scheduler refuse', async (t) => {
      const secret = generated(objects, 'Secret', 'damselfly-cluster-secret')
      assert.deepEqual(Object.keys(secret.data), ['cluster-secret'])
      const value = Buffer.from(secret.data['cluster-secret'] as string, 'base64').toString('utf8').trim()
      assert.equal(value, PLACEHOLDER_SECRET, 'no real secret is committed in deploy/kubernetes/base/cluster-secret.txt')
      const tmp = await tmpDir('df-deploy-')
      t.after(() => tmp.cleanup())
      const peer = find<Workload>(objects, 'DaemonSet', 'damselfly-peer')
      const scheduler = find<Workload>(objects, 'Deployment', 'damselfly-scheduler')
      const p = await invocation(objects, peer, container(peer, 'peer'), tmp.path)
      assert.throws(() => loadPeerConfig(p), (err: unknown) => err instanceof ConfigError && /at least 16 characters/.test(err.message))
      const s = await invocation(objects, scheduler, container(scheduler, 'scheduler'), tmp.path)
      assert.throws(() => loadSchedulerConfig(s), (err: unknown) => err instanceof ConfigError && /at least 16 characters/.test(err.message))
    })

    test('the peer on every node: host network, mirror on loopback, node IP announced, cache on the host', async (t) => {
      const tmp = await tmpDir('df-deploy-')
      t.after(() => tmp.cleanup())
      const ds = find<Workload>(objects, 'DaemonSet', 'damselfly-peer')
      const pod = ds.spec.template.spec
      assert.equal(pod.hostNetwork, true)
      assert.equal(pod.dnsPolicy, 'ClusterFirstWithHostNet', 'cluster DNS (the scheduler Service) resolves from the host network')
      assert.ok(pod.tolerations?.some(t => t.operator === 'Exists' && t.key === undefined), 'tolerates every taint')
      const c = container(ds, 'peer')
      const config = loadPeerConfig(await invocation(objects, ds, c, tmp.path, TEST_SECRET, fields))
      assert.equal(config.clusterSecret, TEST_SECRET)
      assert.equal(config.host, '127.0.0.1', 'the mirror (also a forward proxy) is reachable only from the node')
      assert.equal(config.p2pHost, fields['status.hostIP'])
      assert.deepEqual(config.announce, [`/${ip}/${fields['status.hostIP'] as string}/tcp/${config.p2pPort}`])
      assert.equal(config.seed, false)
      assert.equal(config.registry, label === 'overlay harbor' ? 'https://harbor.example.com' : 'https://registry-1.docker.io')
      for (const probe of [c.readinessProbe, c.livenessProbe]) {
        assert.deepEqual(probe?.httpGet, { host: config.host, path: '/healthy', port: config.port })
      }
      const ports = new Map((c.ports ?? []).map(p => [p.name, p]))
      for (const [name, port] of [['p2p', config.p2pPort], ['mirror', config.port], ['upload', config.uploadPort]] as const) {
        assert.equal(ports.get(name)?.containerPort, port, `container port ${name} is the configured ${port}`)
        assert.equal(ports.get(name)?.hostPort, port)
      }
      const data = c.volumeMounts?.find(m => m.mountPath === config.dataDir)
      assert.ok(data !== undefined, `the data dir ${config.dataDir} is a mount`)
      assert.equal(pod.volumes?.find(v => v.name === data.name)?.hostPath?.path, '/var/lib/damselfly')
      assertSchedulerAddress(objects, config.scheduler)
    })

    test('the init container writes hosts.toml for every registry, pointing containerd at the peer', async (t) => {
      const tmp = await tmpDir('df-deploy-')
      t.after(() => tmp.cleanup())
      const ds = find<Workload>(objects, 'DaemonSet', 'damselfly-peer')
      const init = container(ds, 'containerd-hosts')
      assert.ok(ds.spec.template.spec.initContainers?.includes(init))
      const args = init.args ?? []
      assert.deepEqual(args.slice(0, 2), ['config', 'containerd'])
      const hostsDir = args[args.indexOf('--hosts-dir') + 1]
      assert.equal(hostsDir, '/etc/containerd/certs.d')
      const mount = init.volumeMounts?.find(m => m.mountPath === hostsDir)
      assert.equal(ds.spec.template.spec.volumes?.find(v => v.name === mount?.name)?.hostPath?.path, '/etc/containerd/certs.d', 'the host directory is mounted')
      const peer = loadPeerConfig(await invocation(objects, ds, container(ds, 'peer'), tmp.path, TEST_SECRET, fields))
      const mirror = `http://${peer.host}:${peer.port}`
      assert.equal(args[args.indexOf('--mirror') + 1], mirror)
      // The real command, with the host directory swapped for a temporary one.
      const run = await runCli(args.map(a => a === hostsDir ? tmp.path : a))
      assert.equal(run.code, 0, run.stderr)
      const registries = label === 'overlay harbor' ? ['docker.io', 'harbor.example.com'] : ['docker.io']
      for (const registry of registries) {
        const toml = await readFile(path.join(tmp.path, registry, 'hosts.toml'), 'utf8')
        assert.match(toml, new RegExp(`\\[host\\."${mirror.replaceAll('.', '\\.')}"\\]`))
      }
    })

    test('seed peers: a StatefulSet with --seed, a cache claim and a headless Service', async (t) => {
      const tmp = await tmpDir('df-deploy-')
      t.after(() => tmp.cleanup())
      const sts = find<Workload>(objects, 'StatefulSet', 'damselfly-seed-peer')
      const svc = find<Service>(objects, 'Service', sts.spec.serviceName ?? '')
      assert.equal(svc.spec.clusterIP, 'None')
      const c = container(sts, 'seed-peer')
      assert.ok(c.args?.includes('--seed'))
      const config = loadPeerConfig(await invocation(objects, sts, c, tmp.path, TEST_SECRET, fields))
      assert.equal(config.seed, true)
      assert.deepEqual(config.announce, [`/${ip}/${fields['status.podIP'] as string}/tcp/${config.p2pPort}`], 'other peers dial the pod IP')
      assert.equal(config.p2pHost, ip === 'ip6' ? '::' : '0.0.0.0', 'the seed listens on every address of its family')
      assert.equal(config.proxy.enabled, false, 'a mirror on the pod network is not an open proxy')
      assert.equal(config.registry, label === 'overlay harbor' ? 'https://harbor.example.com' : 'https://registry-1.docker.io')
      const cache = c.volumeMounts?.find(m => m.mountPath === config.dataDir)
      assert.ok(sts.spec.volumeClaimTemplates?.some(v => v.metadata.name === cache?.name), 'the data dir is a volume claim')
      const ports = new Map((c.ports ?? []).map(p => [p.name, p.containerPort]))
      assert.deepEqual([ports.get('p2p'), ports.get('mirror'), ports.get('upload')], [config.p2pPort, config.port, config.uploadPort])
      assertSchedulerAddress(objects, config.scheduler)
    })

    test('the scheduler: three replicas spread over nodes, updated one at a time, ports and probes as configured', async (t) => {
      const tmp = await tmpDir('df-deploy-')
      t.after(() => tmp.cleanup())
      const deploy = find<Scheduler>(objects, 'Deployment', 'damselfly-scheduler')
      assert.equal(deploy.spec.replicas, 3, 'interchangeable replicas over the state in Redis')
      assert.deepEqual(deploy.spec.strategy, { type: 'RollingUpdate', rollingUpdate: { maxUnavailable: 1, maxSurge: 1 } })
      const byNode = deploy.spec.template.spec.topologySpreadConstraints?.find(s => s.topologyKey === 'kubernetes.io/hostname')
      assert.ok(byNode !== undefined, 'the replicas are spread over nodes')
      assert.equal(byNode.maxSkew, 1)
      assert.equal(byNode.whenUnsatisfiable, 'DoNotSchedule', 'a replica does not double up on a node while another could take it')
      assertSelectsOnly(objects, byNode.labelSelector?.matchLabels ?? {}, deploy, 'the spread over nodes')
      const c = container(deploy, 'scheduler')
      const config = loadSchedulerConfig(await invocation(objects, deploy, c, tmp.path, TEST_SECRET, fields))
      assert.deepEqual([config.host, config.httpHost], ip === 'ip6' ? ['::', '::'] : ['0.0.0.0', '0.0.0.0'])
      const ports = new Map((c.ports ?? []).map(p => [p.name, p.containerPort]))
      assert.equal(ports.get('p2p'), config.port)
      assert.equal(ports.get('http'), config.httpPort)
      for (const probe of [c.readinessProbe, c.livenessProbe]) assert.equal(probe?.httpGet?.port, 'http')
      const svc = find<Service>(objects, 'Service', 'damselfly-scheduler')
      assert.deepEqual(svc.spec.ports.map(p => [p.name, p.port]), [['p2p', 8002], ['http', 8080]])
      // Peers dial the Service (assertSchedulerAddress), which reaches every replica.
      assertSelectsOnly(objects, svc.spec.selector, deploy, 'Service/damselfly-scheduler')
    })

    test('a PodDisruptionBudget keeps two scheduler replicas up through drains', () => {
      const deploy = find<Scheduler>(objects, 'Deployment', 'damselfly-scheduler')
      const pdb = find<PodDisruptionBudget>(objects, 'PodDisruptionBudget', 'damselfly-scheduler')
      assert.equal(pdb.spec.minAvailable, 2)
      assert.ok(pdb.spec.minAvailable < (deploy.spec.replicas ?? 1), 'a drain can still take a replica')
      assertSelectsOnly(objects, pdb.spec.selector.matchLabels, deploy, 'the PodDisruptionBudget')
    })

    test('the scheduler replicas share their state in the Redis Service, with the password from its Secret', async (t) => {
      const tmp = await tmpDir('df-deploy-')
      t.after(() => tmp.cleanup())
      const deploy = find<Scheduler>(objects, 'Deployment', 'damselfly-scheduler')
      const c = container(deploy, 'scheduler')
      const inv = await invocation(objects, deploy, c, tmp.path, TEST_SECRET, fields)
      const config = loadSchedulerConfig(inv)
      assert.equal(inv.mounted.state, 'redis://damselfly-redis:6379/0')
      const state = new URL(inv.mounted.state as string)
      assert.equal(state.password, '', 'no password in the URL')
      assert.equal(inv.mounted.statePassword, undefined, 'no password in the config')
      const svc = find<Service>(objects, 'Service', state.hostname)
      assert.ok(svc.spec.ports.some(p => p.port === Number(state.port)), `Service/${svc.metadata.name} has port ${state.port}`)
      const redis = find<RedisSet>(objects, 'StatefulSet', REDIS.statefulSet)
      assertSelectsOnly(objects, svc.spec.selector, redis, `Service/${svc.metadata.name}`)
      // The scheduler reads the key Redis takes its password from.
      const secret = generated(objects, 'Secret', REDIS.secret)
      const file = inv.mounted.statePasswordFile
      assert.equal(typeof file, 'string', 'the config names statePasswordFile')
      const mount = c.volumeMounts?.find(m => m.mountPath === path.dirname(file as string))
      assert.equal(deploy.spec.template.spec.volumes?.find(v => v.name === mount?.name)?.secret?.secretName, secret.metadata.name, `${file as string} is on the Secret`)
      assert.equal(path.basename(file as string), 'password')
      const env = container(redis, 'redis').env?.find(e => e.name === 'REDIS_PASSWORD')
      assert.deepEqual(env?.valueFrom?.secretKeyRef, { name: secret.metadata.name, key: 'password' })
      assert.equal(config.statePassword, Buffer.from(secret.data.password as string, 'base64').toString('utf8').trim())
    })

    test('Redis: one replica, its append-only file on a claim, behind the Service damselfly-redis', () => {
      const sts = find<RedisSet>(objects, 'StatefulSet', REDIS.statefulSet)
      assert.equal(sts.spec.replicas, 1)
      const svc = find<Service>(objects, 'Service', REDIS.service)
      assert.equal(sts.spec.serviceName, svc.metadata.name)
      assertSelectsOnly(objects, svc.spec.selector, sts, `Service/${svc.metadata.name}`)
      assert.deepEqual(svc.spec.ports.map(p => p.port), [REDIS.port])
      const c = container(sts, 'redis')
      assert.equal(c.ports?.find(p => p.name === svc.spec.ports[0]?.targetPort)?.containerPort, REDIS.port)
      assert.match(redisScript(c), /\bexec redis-server --appendonly yes\b/)
      const data = c.volumeMounts?.find(m => m.mountPath === '/data')
      const claim = (sts.spec.volumeClaimTemplates as ClaimTemplate[] | undefined)?.find(v => v.metadata.name === data?.name)
      assert.ok(claim !== undefined, 'the image\'s /data is a volume claim')
      assert.equal(claim.spec.resources?.requests?.storage, '1Gi')
      assert.deepEqual(claim.spec.accessModes, ['ReadWriteOnce'])
      for (const probe of [c.readinessProbe, c.livenessProbe]) {
        assert.match(probe?.exec?.command.join(' ') ?? '', /REDISCLI_AUTH=.*redis-cli ping \| grep/, 'the probes ping with the password and read the answer')
      }
    })

    test('the Redis password comes from the Secret damselfly-redis, never from the manifest', () => {
      const secret = generated(objects, 'Secret', REDIS.secret)
      assert.deepEqual(Object.keys(secret.data), ['password'])
      const placeholder = Buffer.from(secret.data.password as string, 'base64').toString('utf8').trim()
      assert.equal(placeholder, PLACEHOLDER_SECRET, 'no real password is committed in deploy/kubernetes/base/redis-password.txt')
      const c = container(find<RedisSet>(objects, 'StatefulSet', REDIS.statefulSet), 'redis')
      const requirepass = /--requirepass\s+(\S+)/.exec(redisScript(c))
      assert.ok(requirepass !== null, 'Redis requires a password')
      assert.match(requirepass[1] as string, /^"?\$\{?\w+\}?"?$/, '--requirepass takes a shell variable, not a literal')
      const env = c.env?.find(e => e.name === 'REDIS_PASSWORD')
      assert.deepEqual(env?.valueFrom?.secretKeyRef, { name: secret.metadata.name, key: 'password' })
      for (const w of objects.filter(isWorkload)) {
        for (const k of allContainers(w.spec.template.spec)) {
          const literal = [...(k.command ?? []), ...(k.args ?? []), ...(k.env ?? []).map(e => e.value ?? '')].join('\n')
          assert.ok(!literal.includes(placeholder), `${w.metadata.name}/${k.name} spells no password out`)
        }
      }
    })
  })
}

/** Why Redis 7 cannot be run here, or undefined when it can. */
function redisMissing (): string | undefined {
  const r = spawnSync('redis-server', ['--version'], { encoding: 'utf8', timeout: 30_000 })
  if (r.error !== undefined || r.status !== 0) return `redis-server is not on the PATH (${r.error?.message ?? `exit ${String(r.status)}`}): apt-get install redis-server`
  if (!/\bv=7\./.test(r.stdout)) return `the manifests run Redis 7; this is ${r.stdout.trim()}`
  return undefined
}

/** Absolute path of a command on the PATH. */
function which (command: string): string {
  const r = spawnSync('sh', ['-c', `command -v ${command}`], { encoding: 'utf8' })
  assert.equal(r.status, 0, `${command} is on the PATH`)
  return r.stdout.trim()
}

// The Redis container's script and probes, run as they are written against
// this machine's redis-server and redis-cli (the image's are on its PATH; here
// they are wrapped onto a free port and a temporary /data).
describe('deploy/kubernetes Redis, run', { skip: NO_KUBECTL ?? redisMissing() }, () => {
  let redis: Container
  let secretValue = ''
  before(async () => {
    const objects = await renderKustomization(BASE)
    redis = container(find<RedisSet>(objects, 'StatefulSet', REDIS.statefulSet), 'redis')
    secretValue = Buffer.from(generated(objects, 'Secret', REDIS.secret).data.password as string, 'base64').toString('utf8')
  })

  /** A PATH with redis-server and redis-cli on `port`, Redis's files in `data`. */
  async function wrappers (dir: string, port: number, data: string): Promise<string> {
    const bin = path.join(dir, 'bin')
    await mkdir(bin)
    // Redis changes into --dir as it reads it, so /data is swapped, not overridden.
    await writeFile(path.join(bin, 'redis-server'), [
      '#!/bin/sh',
      `for a; do shift; if [ "$a" = /data ]; then a='${data}'; fi; set -- "$@" "$a"; done`,
      `exec ${which('redis-server')} "$@" --port ${port} --bind 127.0.0.1`
    ].join('\n') + '\n')
    await writeFile(path.join(bin, 'redis-cli'), `#!/bin/sh\nexec ${which('redis-cli')} -p ${port} "$@"\n`)
    await Promise.all(['redis-server', 'redis-cli'].map(async f => chmod(path.join(bin, f), 0o755)))
    return `${bin}:${process.env.PATH ?? ''}`
  }

  /** The container's environment with its Secret key set to `password`. */
  function envWith (password: string, pathVar: string): NodeJS.ProcessEnv {
    const env: NodeJS.ProcessEnv = { PATH: pathVar }
    for (const e of redis.env ?? []) {
      if (e.valueFrom?.secretKeyRef !== undefined) env[e.name] = password
      else if (e.value !== undefined) env[e.name] = e.value
    }
    return env
  }

  function probe (kind: 'readiness' | 'liveness', env: NodeJS.ProcessEnv): number | null {
    const command = (kind === 'readiness' ? redis.readinessProbe : redis.livenessProbe)?.exec?.command ?? []
    assert.ok(command.length > 0, `an exec ${kind} probe`)
    return spawnSync(command[0] as string, command.slice(1), { env, encoding: 'utf8', timeout: 10_000 }).status
  }

  test('the committed placeholder is refused: Redis does not start', async (t) => {
    const tmp = await tmpDir('df-redis-')
    t.after(() => tmp.cleanup())
    const data = path.join(tmp.path, 'data')
    await mkdir(data)
    const env = envWith(secretValue, await wrappers(tmp.path, await freePort(), data))
    const proc = spawnProcess(redis.command?.[0] as string, [...(redis.command ?? []).slice(1), ...(redis.args ?? [])], { env, cwd: data })
    t.after(() => proc.stop())
    const code = await Promise.race([proc.exited, new Promise<string>(resolve => setTimeout(() => resolve('still running'), 10_000).unref())])
    assert.equal(code, 1, proc.output())
    assert.match(proc.output(), /placeholder or shorter than 16 characters; write a real one to deploy\/kubernetes\/base\/redis-password\.txt/)
  })

  test('with a real password: append-only, the password required and not on its command line, the probes pass', async (t) => {
    const tmp = await tmpDir('df-redis-')
    t.after(() => tmp.cleanup())
    const data = path.join(tmp.path, 'data')
    await mkdir(data)
    const pathVar = await wrappers(tmp.path, await freePort(), data)
    // As `openssl rand -hex 32 > redis-password.txt` writes it: with a newline, which is not part of the password.
    const password = 'f'.repeat(24) + '0123456789abcdef'
    const env = envWith(`${password}\n`, pathVar)
    const proc = spawnProcess(redis.command?.[0] as string, [...(redis.command ?? []).slice(1), ...(redis.args ?? [])], { env, cwd: data })
    t.after(() => proc.stop())
    let exited = false
    void proc.exited.then(() => { exited = true })
    await waitFor(async () => probe('readiness', env) === 0, { timeoutMs: 30_000, what: 'the readiness probe', giveUpIf: () => exited ? `Redis exited:\n${proc.output()}` : undefined })
    assert.equal(probe('liveness', env), 0)
    assert.notEqual(probe('readiness', envWith('another-password-of-some-length', pathVar)), 0, 'the probe reads the answer, not only the exit code')
    const cli = async (args: string[], auth?: string): Promise<string> => (await run('redis-cli', args, { env: { PATH: pathVar, ...(auth !== undefined ? { REDISCLI_AUTH: auth } : {}) } })).stdout.trim()
    assert.match(await cli(['ping']), /NOAUTH/)
    assert.equal(await cli(['ping'], password), 'PONG', 'the password without the newline')
    assert.equal(await cli(['config', 'get', 'appendonly'], password), 'appendonly\nyes')
    assert.equal(await cli(['config', 'get', 'maxmemory-policy'], password), 'maxmemory-policy\nnoeviction')
    if (process.platform === 'linux') {
      // The shell exec'd redis-server: the same process, whose arguments held the password.
      const cmdline = (await readFile(`/proc/${String(proc.child.pid)}/cmdline`, 'utf8')).replaceAll('\0', ' ').trim()
      assert.match(cmdline, /redis-server [^ ]*:\d+$/, 'Redis shows its title')
      assert.ok(!cmdline.includes(password), `the password is not in the command line: ${cmdline}`)
    }
  })
})

/** `selector` selects the pods of `target` and of no other workload. */
function assertSelectsOnly (objects: K8sObject[], selector: Record<string, string>, target: Workload, what: string): void {
  assert.ok(Object.keys(selector).length > 0, `${what} has a selector`)
  const selected = objects.filter(isWorkload).filter(w => selects(selector, w.spec.template.metadata.labels))
  assert.deepEqual(selected.map(w => `${w.kind}/${w.metadata.name}`), [`${target.kind}/${target.metadata.name}`], `${what} selects ${target.kind}/${target.metadata.name} only`)
}

/** What the Redis container runs: `sh -c <script>`, so the script. */
function redisScript (c: Container): string {
  assert.deepEqual(c.command, ['sh', '-c'])
  assert.equal(c.args?.length, 1)
  return c.args[0] as string
}

/** The peers' scheduler address is the scheduler Service's DNS name and p2p port. */
function assertSchedulerAddress (objects: K8sObject[], address: string): void {
  const svc = find<Service>(objects, 'Service', 'damselfly-scheduler')
  const p2p = svc.spec.ports.find(p => p.name === 'p2p')
  assert.equal(address, `${svc.metadata.name}.${svc.metadata.namespace ?? ''}.svc:${p2p?.port ?? ''}`)
}

describe('the checks can fail', () => {
  const daemonSet = (containers: unknown): unknown => ({
    apiVersion: 'apps/v1',
    kind: 'DaemonSet',
    metadata: { name: 'broken' },
    spec: { selector: { matchLabels: { app: 'x' } }, template: { metadata: { labels: { app: 'x' } }, spec: { containers } } }
  })

  test('the schema validator rejects malformed objects and unknown kinds', () => {
    validateObject(daemonSet([{ name: 'c', image: 'i' }]))
    assert.throws(() => validateObject(daemonSet('x')), /DaemonSet\/broken does not conform .*containers must be array/)
    assert.throws(() => validateObject(daemonSet([{ image: 'i' }])), /containers\/0 must have required property name/)
    assert.throws(() => validateObject(daemonSet([{ name: 'c', ports: [{ containerPort: 'http' }] }])), /containerPort must be integer/)
    assert.throws(() => validateObject({ apiVersion: 'v1', kind: 'Service', metadata: { name: 's' }, spec: { ports: [{ port: 80, protocol: 'ICMP' }] } }), /does not conform/)
    assert.throws(() => validateObject({ apiVersion: 'apps/v1', kind: 'Daemonset', metadata: { name: 'typo' } }), /is not a Kubernetes API type/)
  })

  test('cross-object checks find dangling references, stray selectors and missing probe ports', { skip: NO_KUBECTL }, async () => {
    const objects = await renderKustomization(BASE)
    const broken = structuredClone(objects)
    const svc = broken.find(o => isService(o) && o.metadata.name === 'damselfly-scheduler') as Service
    svc.spec.selector = { 'app.kubernetes.io/component': 'nothing' }
    const ds = broken.find(o => o.kind === 'DaemonSet') as Workload
    const peer = ds.spec.template.spec.containers[0] as Container
    peer.readinessProbe = { httpGet: { path: '/healthy', port: 4999 } }
    const configVolume = ds.spec.template.spec.volumes?.find(v => v.configMap !== undefined)
    if (configVolume?.configMap !== undefined) configVolume.configMap.name = 'damselfly-config'
    ds.spec.template.spec.serviceAccountName = 'nobody'
    const seedSvc = broken.find(o => isService(o) && o.metadata.name === 'damselfly-seed-peer') as Service
    seedSvc.spec.ports.push({ name: 'extra', port: 9999, targetPort: 'metrics' })
    const pdb = broken.find(o => o.kind === 'PodDisruptionBudget') as PodDisruptionBudget
    pdb.spec.selector.matchLabels = { 'app.kubernetes.io/component': 'schedular' }
    const problems = crossObjectProblems(broken).join('\n')
    assert.match(problems, /Service\/damselfly-scheduler: its selector matches no pod template/)
    assert.match(problems, /DaemonSet\/damselfly-peer\/peer: readiness probe port 4999 is not one of the container's ports/)
    assert.match(problems, /volume config names ConfigMap damselfly-config, which does not exist/, 'the unhashed name is not the generated one')
    assert.match(problems, /ServiceAccount nobody does not exist/)
    assert.match(problems, /Service\/damselfly-seed-peer: port extra targets metrics, which StatefulSet\/damselfly-seed-peer does not expose/)
    assert.match(problems, /PodDisruptionBudget\/damselfly-scheduler: its selector matches no pod template/)
  })
})

test('the committed placeholders are what the README tells operators to replace', async () => {
  const readme = await readFile(path.join(ROOT, 'README.md'), 'utf8')
  for (const file of ['cluster-secret.txt', 'redis-password.txt']) {
    const committed = (await readFile(path.join(BASE, file), 'utf8')).trim()
    assert.equal(committed, PLACEHOLDER_SECRET)
    assert.ok(committed.length < 16, `${file}: too short to be accepted`)
    assert.ok(readme.includes(`openssl rand -hex 32 > deploy/kubernetes/base/${file}`), `the README says how to replace ${file}`)
  }
  await access(path.join(HARBOR, 'kustomization.yaml'))
})

test('without kubectl the rendering tests are skipped with the reason, not failed and not passed', { skip: NO_KUBECTL }, async () => {
  const file = fileURLToPath(import.meta.url)
  // The child sees no kubectl; its own copy of this test is skipped by the same rule, so this does not recurse.
  // NODE_TEST_CONTEXT would make the child report to this runner instead of printing TAP.
  const { NODE_TEST_CONTEXT: _, ...env } = process.env
  const { stdout } = await run(process.execPath, ['--test', '--test-reporter=tap', file], { env: { ...env, KUBECTL: '/nonexistent/kubectl' }, timeoutMs: 300_000 })
  assert.match(stdout, /rendering skipped: kubectl is not on the PATH .*install kubectl >= 1\.27/)
  const count = (name: string): number => Number(new RegExp(`^# ${name} (\\d+)$`, 'm').exec(stdout)?.[1])
  assert.equal(count('fail'), 0)
  assert.match(stdout, /^ok \d+ - deploy\/kubernetes base # SKIP kubectl is not on the PATH/m)
  assert.match(stdout, /^ok \d+ - deploy\/kubernetes overlay harbor # SKIP kubectl is not on the PATH/m)
  assert.ok(count('skipped') >= 2, `skipped ${count('skipped')}`)
  assert.ok(count('pass') >= 1, 'the tests that need no kubectl still run')
})
