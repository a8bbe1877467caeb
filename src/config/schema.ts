import { Type, type Static, type TInteger, type TString, type TUnion } from '@sinclair/typebox'
import { DIAL_ADDRESS_FORMS } from '../p2p/address.ts'
import { DEFAULTS } from './defaults.ts'

/**
 * Configuration schemas. Each is at once the validator, the static type, the
 * list of flags and environment variables (derived from the key paths by
 * `src/config/index.ts`) and the help text. Defaults are written here once.
 *
 * Sizes accept a number of bytes or a string such as "10GiB" / "512MB";
 * durations a number of milliseconds or a string such as "30s" / "5m".
 */
// What a value of each kind may look like, for error messages (src/config/index.ts reads `accepts`).
const SIZE_FORMS = 'a number of bytes, or a number and a unit: KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. "10GiB" or "512MB"'
const DURATION_FORMS = 'a number of milliseconds, or a number and a unit (ms, s, m, h), e.g. "30s" or "5m"'
const HOST_FORMS = 'a host name or an IP address, e.g. "127.0.0.1", "0.0.0.0" or "::"'
const SCHEDULER_FORMS = `scheduler addresses separated by commas, each ${DIAL_ADDRESS_FORMS}, e.g. "sched-0.example:8002,sched-1.example:8002", or one DNS name that resolves to every replica, e.g. "damselfly-scheduler.damselfly.svc:8002"`

const Port = (defaultValue: number, description: string): TInteger => Type.Integer({ minimum: 0, maximum: 65535, default: defaultValue, description, accepts: 'a port number from 0 to 65535, e.g. 4001' })
const Size = (defaultValue: string, description: string): TUnion<[TInteger, TString]> => Type.Union([Type.Integer({ minimum: 0 }), Type.String({ pattern: '^\\s*\\d+(\\.\\d+)?\\s*([kKmMgGtT]i?[bB]?|[bB])?\\s*$' })], { default: defaultValue, description, accepts: SIZE_FORMS })
const Duration = (defaultValue: string, description: string): TUnion<[TInteger, TString]> => Type.Union([Type.Integer({ minimum: 0 }), Type.String({ pattern: '^\\s*\\d+(\\.\\d+)?\\s*(ms|s|m|h)?\\s*$' })], { default: defaultValue, description, accepts: DURATION_FORMS })
const Host = (defaultValue: string, description: string): TString => Type.String({ minLength: 1, maxLength: 253, pattern: '^[A-Za-z0-9.:\\-\\[\\]%]+$', default: defaultValue, description, accepts: HOST_FORMS })
/** An address to bind whose default depends on whether a cluster secret is set: empty means "decide". */
const SwarmHost = (description: string): TString => Type.String({ maxLength: 253, pattern: '^[A-Za-z0-9.:\\-\\[\\]%]*$', default: '', description, accepts: `${HOST_FORMS}, or empty to decide by the cluster secret` })
const RegistryUrl = Type.String({ pattern: '^https?://[^/?#@\\s]+/?$', description: 'scheme://host[:port]', accepts: 'a registry URL: http:// or https://, a host and an optional port, e.g. "https://harbor.example" or "http://127.0.0.1:5000"' })
const LogLevel = Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map(l => Type.Literal(l)), { default: 'info', description: 'Log level' })

export const Labels = Type.Object({
  location: Type.String({ default: '', maxLength: 256, description: 'Location label, "|"-separated from wide to narrow (e.g. "eu|eu-west|zone-a"); peers sharing a longer prefix are preferred parents' }),
  idc: Type.String({ default: '', maxLength: 128, description: 'Data-centre label; peers in the same one are preferred parents' })
}, { additionalProperties: false, default: {} })

export const Swarm = Type.Object({
  clusterSecret: Type.String({ default: '', description: 'Shared secret every peer and scheduler of a cluster holds; nodes without it cannot join (min 16 characters when set)' }),
  clusterSecretFile: Type.String({ default: '', description: 'File holding the cluster secret (a Kubernetes Secret mounted as a file)' })
}, { additionalProperties: false, default: {} })

export const SchedulerApi = Type.Object({
  token: Type.String({ default: '', description: 'Bearer token the HTTP API requires on preheat endpoints (/api/v1/preheat, and Harbor\'s /oapi/v1/jobs and /preheats); empty leaves them open. Min 16 characters when set' }),
  tokenFile: Type.String({ default: '', description: 'File holding the API token (a Kubernetes Secret mounted as a file)' })
}, { additionalProperties: false, default: {} })

export const PeerMirror = Type.Object({
  port: Port(0, 'Port of this extra mirror listener'),
  registry: RegistryUrl
}, { additionalProperties: false })

export const PeerProxy = Type.Object({
  enabled: Type.Boolean({ default: true, description: 'Also answer as a forward HTTP proxy on the mirror port (absolute-form requests and CONNECT), as nydusd\'s proxy.url and HTTP_PROXY clients expect' }),
  caCert: Type.String({ default: '', description: 'PEM certificate of the CA that signs certificates for intercepted hosts (clients trust it, or skip verification)' }),
  caKey: Type.String({ default: '', description: 'PEM private key of that CA (RSA or EC)' }),
  intercept: Type.Array(Type.String({ minLength: 1, maxLength: 260 }), { default: [], description: 'Registries (host or host:port) whose CONNECT tunnels are opened here and their blob reads served through the swarm; other hosts are tunnelled untouched' }),
  allowedHosts: Type.Array(Type.String({ minLength: 1, maxLength: 260 }), { default: [], description: 'host:port pairs (443 when no port) the proxy may forward to or tunnel to. Empty: any, but only while the mirror listens on loopback; a mirror reachable from the network forwards nothing unless they are listed' })
}, { additionalProperties: false, default: {} })

export const PeerConfig = Type.Object({
  dataDir: Type.String({ minLength: 1, default: '/var/lib/damselfly', description: 'Directory for the piece cache, metadata and keys; nothing is written outside it' }),
  host: Host('127.0.0.1', 'Address the mirror listens on'),
  port: Port(4001, 'Mirror port (registry API, /healthy, /metrics)'),
  healthPort: Port(0, 'Separate port for /healthy and /metrics (0: only on the mirror port)'),
  p2pHost: SwarmHost('Address the p2p and upload ports bind. Default: 0.0.0.0 with a cluster secret, 127.0.0.1 without one; any other address than loopback needs a cluster secret'),
  p2pPort: Port(4000, 'Piece-exchange (libp2p) port: scheduler sessions, commands, and pieces when pieceTransport is libp2p'),
  uploadPort: Port(4002, 'HTTP upload port other peers download pieces from (on p2pHost)'),
  pieceTransport: Type.Union([Type.Literal('http'), Type.Literal('libp2p')], { default: 'http', description: 'How pieces travel between peers: http (the upload port; fastest) or libp2p (encrypted streams on the p2p port, for networks where piece bytes must not cross in the clear)' }),
  announce: Type.Array(Type.String(), { default: [], description: 'Multiaddrs other peers should dial to reach this one (default: the listen addresses)' }),
  registry: Type.String({ default: 'https://registry-1.docker.io', description: 'Upstream registry for requests that name none (docker.io means registry-1.docker.io)' }),
  registries: Type.Array(RegistryUrl, { default: [], description: 'Registries by URL, so containerd\'s ns=host maps to the right scheme (hosts not listed are https)' }),
  allowUnlistedRegistries: Type.Boolean({ default: false, description: 'Let requests name registries that registry, registries, mirrors and proxy.intercept do not list. They are passed through, verified but never cached, shared in the swarm or served from the cache; without this they get 403' }),
  mirrors: Type.Array(PeerMirror, { default: [], description: 'Extra mirror listeners, each serving one registry to clients that send no registry header' }),
  scheduler: Type.String({ default: '', maxLength: 8192, description: 'Scheduler addresses, comma-separated (host:port or a multiaddr each); the peer starts at a random one and moves to the next when it goes. A DNS name is resolved at every (re)connect and stands for every address it resolves to (a headless Service). Empty runs an embedded single-node scheduler', accepts: SCHEDULER_FORMS }),
  seed: Type.Boolean({ default: false, description: 'Seed peer: preferred first fetcher from the origin; fetches whole blobs; runs preheats' }),
  cacheSize: Size(DEFAULTS.cacheSize, 'Byte quota of the piece cache; least recently used blobs are evicted past it'),
  diskHighWatermark: Type.Integer({ minimum: 1, maximum: 100, default: 90, description: 'Percent of the data dir\'s file system in use past which least recently used blobs are evicted (whoever filled it)', accepts: 'a percentage from 1 to 100, e.g. 90' }),
  diskLowWatermark: Type.Integer({ minimum: 0, maximum: 99, default: 80, description: 'Percent of the file system in use that eviction past the high watermark brings it back under', accepts: 'a percentage from 0 to 99, below diskHighWatermark, e.g. 80' }),
  cacheTtl: Duration('0', 'Blobs not read or written for this long are evicted (0: kept until the quota or the disk needs the room)'),
  memoryCacheSize: Size(DEFAULTS.memoryCacheSize, 'Verified pieces kept in memory: the latest written and read, for children fetching a piece just after it lands and for repeated range reads'),
  authCheck: Type.Boolean({ default: true, description: 'Serve cached content only to callers the origin accepts (turn off only for public-only registries)' }),
  authCacheTtl: Duration('60s', 'How long an origin yes/no for (registry, repository, digest, credentials) is reused'),
  authStaleIfError: Duration('10m', 'How old a yes may be and still be used while the origin is unreachable'),
  uploadConcurrency: Type.Integer({ minimum: 1, maximum: 1024, default: DEFAULTS.uploadConcurrency, description: 'Most pieces this peer sends to other peers at once (fewer while its uplink, as measured, could not send them all within a quarter second; two always); other requests are answered busy at once, naming peers the piece recently went to' }),
  uploadRateLimit: Size('0', 'Bytes per second this peer sends to other peers (0: unlimited)'),
  originRateLimit: Size('0', 'Bytes per second this peer reads from origin registries into its cache, "back to source" (0: unlimited; pass-through registries are not limited)'),
  downloadRateLimit: Size('0', 'Bytes per second this peer takes in, from peers and origins together (0: unlimited)'),
  prefetchRateLimit: Size('0', 'Bytes per second taken in for prefetch and preheat, work no client is waiting on (0: unlimited)'),
  uploadConnectionsPerAddress: Type.Integer({ minimum: 1, maximum: 65_535, default: DEFAULTS.uploadConnectionsPerAddress, description: 'Upload-port connections one address may hold open; at the total limit (1,024) idle connections that never proved cluster membership are closed first' }),
  originCa: Type.String({ default: '', description: 'PEM file of extra CAs trusted for origin registries' }),
  proxy: PeerProxy,
  labels: Labels,
  swarm: Swarm,
  logLevel: LogLevel
}, { additionalProperties: false })

export const SchedulerConfig = Type.Object({
  dataDir: Type.String({ minLength: 1, default: '/var/lib/damselfly-scheduler', description: 'Directory for the scheduler\'s key' }),
  host: SwarmHost('Address the scheduler\'s p2p port binds. Default: 0.0.0.0 with a cluster secret, 127.0.0.1 without one; any other address than loopback needs a cluster secret'),
  port: Port(8002, 'Scheduler (libp2p) port peers connect to'),
  httpHost: Host('0.0.0.0', 'Address of the HTTP API (status, preheat, swarm page, metrics). Off loopback, starting preheats needs api.token'),
  httpPort: Port(8080, 'HTTP API port'),
  announce: Type.Array(Type.String(), { default: [], description: 'Multiaddrs peers should dial (default: the listen addresses)' }),
  state: Type.String({ default: 'memory', accepts: 'memory, or redis://[user@]host:port[/db] (rediss:// for TLS)', description: 'Where the swarm\'s state lives: this process\'s memory (one scheduler), or a Redis that any number of interchangeable replicas share' }),
  statePasswordFile: Type.String({ default: '', description: 'File holding the Redis password (the ACL user, if any, goes in the state URL)' }),
  stateCaFile: Type.String({ default: '', description: 'PEM CA bundle that signs the Redis server\'s certificate, for rediss://' }),
  api: SchedulerApi,
  swarm: Swarm,
  logLevel: LogLevel
}, { additionalProperties: false })

export type PeerConfigInput = Static<typeof PeerConfig>
export type SchedulerConfigInput = Static<typeof SchedulerConfig>
