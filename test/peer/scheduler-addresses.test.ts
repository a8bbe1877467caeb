import assert from 'node:assert/strict'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, test } from 'node:test'
import { loadPeerConfig } from '../../src/config/index.ts'
import { ConfigError, SchedulerUnavailableError } from '../../src/errors.ts'
import { silentLogger } from '../../src/logger.ts'
import { createSchedulerTargets, type ResolveAll } from '../../peer/swarm/scheduler-targets.ts'
import { runCli } from '../helpers/cli.ts'
import { tmpDir } from '../helpers/tmp.ts'

const PEER_ID = '12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo'

/** The error a bad configuration is reported with. */
function configError (load: () => unknown): ConfigError {
  try {
    load()
  } catch (err) {
    assert.ok(err instanceof ConfigError, `a ConfigError, not ${String(err)}`)
    return err
  }
  assert.fail('the configuration loaded')
}

describe('the peer\'s scheduler setting: a list of replicas', () => {
  test('comma-separated host:port and multiaddr entries become the list, in order, once each', () => {
    const c = loadPeerConfig({ flags: { scheduler: ` sched-0.example:8002, 10.0.0.7:8002,[fd00::7]:8002 ,/ip4/10.0.0.9/tcp/8002/p2p/${PEER_ID},/dns4/sched-3.example/tcp/8002,sched-0.example:8002,` } })
    assert.deepEqual(c.schedulers, ['sched-0.example:8002', '10.0.0.7:8002', '[fd00::7]:8002', `/ip4/10.0.0.9/tcp/8002/p2p/${PEER_ID}`, '/dns4/sched-3.example/tcp/8002'])
  })

  test('one address, from the environment or a file, is a list of one; none means the embedded scheduler', async (t) => {
    assert.deepEqual(loadPeerConfig({ env: { DAMSELFLY_SCHEDULER: 'damselfly-scheduler.damselfly.svc:8002' } }).schedulers, ['damselfly-scheduler.damselfly.svc:8002'])
    const dir = await tmpDir('df-scheduler-list-')
    t.after(() => dir.cleanup())
    const file = join(dir.path, 'peer.yaml')
    await writeFile(file, 'scheduler: "127.0.0.1:8002,127.0.0.1:8003"\n')
    assert.deepEqual(loadPeerConfig({ file }).schedulers, ['127.0.0.1:8002', '127.0.0.1:8003'])
    assert.deepEqual(loadPeerConfig({}).schedulers, [])
  })

  test('a bad entry stops the peer at start, naming the key, the entry, what is wrong and the accepted form', () => {
    const cases: Array<[string, string]> = [
      ['sched-0:8002,sched-1', '"sched-1": no port'],
      ['sched-0:0', '"sched-0:0": port "0" is not from 1 to 65535'],
      ['sched-0:70000', 'port "70000" is not from 1 to 65535'],
      ['::1:8002', 'an IPv6 address with a port needs brackets, e.g. [::1]:8002'],
      ['[fd00::zz]:8002', 'is not an IPv6 address'],
      ['http://sched-0:8002', 'a URL; give host:port'],
      ['sched 0:8002', 'is neither an IP address nor a DNS name'],
      ['/ip4/10.0.0.1/udp/8002', 'not a TCP multiaddr'],
      ['/ip4/300.0.0.1/tcp/8002', '"300.0.0.1" is not an IPv4 address'],
      ['sched-0:8002;sched-1:8002', '"sched-0:8002;sched-1" is neither an IP address nor a DNS name']
    ]
    for (const [value, problem] of cases) {
      const err = configError(() => loadPeerConfig({ flags: { scheduler: value } }))
      assert.equal(err.key, 'scheduler', value)
      assert.ok(err.message.startsWith('scheduler: expected scheduler addresses separated by commas, each host:port, [IPv6]:port or a TCP multiaddr'), err.message)
      assert.match(err.message, /e\.g\. "sched-0\.example:8002,sched-1\.example:8002", or one DNS name that resolves to every replica/)
      assert.ok(err.message.includes(problem), `${value}: ${err.message}`)
    }
  })

  test('the CLI refuses a bad list with exit code 2 and says why', async () => {
    const res = await runCli(['peer', '--scheduler', '127.0.0.1:8002,127.0.0.1'])
    assert.equal(res.code, 2)
    assert.match(res.stderr, /scheduler: expected scheduler addresses separated by commas.*\(got "127\.0\.0\.1": no port\)/)
  })
})

describe('scheduler targets: which replica to dial next', () => {
  const logger = silentLogger()

  test('the first is a random one, then each in turn, round and round', async () => {
    const addresses = ['10.0.0.1:8002', '10.0.0.2:8002', '10.0.0.3:8002']
    const targets = createSchedulerTargets({ logger, random: () => 0.5 }, { addresses })
    const seen = []
    for (let i = 0; i < 4; i++) seen.push(await targets.next())
    assert.deepEqual(seen, [
      { address: '/ip4/10.0.0.2/tcp/8002', count: 3 },
      { address: '/ip4/10.0.0.3/tcp/8002', count: 3 },
      { address: '/ip4/10.0.0.1/tcp/8002', count: 3 },
      { address: '/ip4/10.0.0.2/tcp/8002', count: 3 }
    ])
    const last = createSchedulerTargets({ logger, random: () => 0.99 }, { addresses })
    assert.equal((await last.next()).address, '/ip4/10.0.0.3/tcp/8002', 'a peer may start anywhere in the list')
  })

  test('a name is resolved again at every call and stands for every address it has, in a stable order', async () => {
    // A headless Service: the replicas behind the name change between calls, and the resolver rotates its answers.
    const answers = [
      [{ address: '10.1.0.3', family: 4 }, { address: '10.1.0.1', family: 4 }, { address: 'fd00::1', family: 6 }],
      [{ address: '10.1.0.1', family: 4 }, { address: 'fd00::1', family: 6 }, { address: '10.1.0.3', family: 4 }],
      // 10.1.0.3's pod was replaced by 10.1.0.4.
      [{ address: '10.1.0.4', family: 4 }, { address: '10.1.0.1', family: 4 }]
    ]
    const asked: Array<[string, number]> = []
    const resolve: ResolveAll = async (host, family) => {
      asked.push([host, family])
      return answers[Math.min(asked.length - 1, answers.length - 1)] ?? []
    }
    const targets = createSchedulerTargets({ logger, resolve, random: () => 0.4 }, { addresses: ['damselfly-scheduler.damselfly.svc:8002'] })
    assert.deepEqual(await targets.next(), { address: '/ip4/10.1.0.3/tcp/8002', count: 3 })
    assert.deepEqual(await targets.next(), { address: '/ip6/fd00::1/tcp/8002', count: 3 })
    assert.deepEqual(await targets.next(), { address: '/ip4/10.1.0.1/tcp/8002', count: 2 })
    assert.deepEqual(asked, [['damselfly-scheduler.damselfly.svc', 0], ['damselfly-scheduler.damselfly.svc', 0], ['damselfly-scheduler.damselfly.svc', 0]])
  })

  test('/dns4 and /dns6 ask for their family and keep the /p2p/ id', async () => {
    const asked: number[] = []
    const resolve: ResolveAll = async (_host, family) => {
      asked.push(family)
      return family === 6 ? [{ address: 'fd00::9', family: 6 }] : [{ address: '10.2.0.9', family: 4 }]
    }
    const targets = createSchedulerTargets({ logger, resolve, random: () => 0 }, { addresses: [`/dns4/sched.example/tcp/8002/p2p/${PEER_ID}`, '/dns6/sched.example/tcp/8003'] })
    assert.deepEqual(await targets.next(), { address: `/ip4/10.2.0.9/tcp/8002/p2p/${PEER_ID}`, count: 2 })
    assert.deepEqual(await targets.next(), { address: '/ip6/fd00::9/tcp/8003', count: 2 })
    assert.deepEqual(asked, [4, 6, 4, 6])
  })

  test('a name that does not resolve, or not in time, leaves the others; none at all is SchedulerUnavailableError', async () => {
    const resolve: ResolveAll = async (host) => {
      if (host === 'gone.example') throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${host}`), { code: 'ENOTFOUND' })
      return new Promise(() => {}) // a resolver that never answers
    }
    const targets = createSchedulerTargets({ logger, resolve, random: () => 0 }, { addresses: ['gone.example:8002', 'slow.example:8002', '10.0.0.1:8002'], resolveTimeoutMs: 50 })
    assert.deepEqual(await targets.next(), { address: '/ip4/10.0.0.1/tcp/8002', count: 1 })
    const none = createSchedulerTargets({ logger, resolve }, { addresses: ['gone.example:8002', 'slow.example:8002'], resolveTimeoutMs: 50 })
    await assert.rejects(none.next(), (err: unknown) => err instanceof SchedulerUnavailableError && /no scheduler address resolved \(gone\.example:8002, slow\.example:8002\)/.test(err.message))
  })

  test('a caller that gives up stops the wait for a resolver', async () => {
    const targets = createSchedulerTargets({ logger, resolve: async () => new Promise(() => {}) }, { addresses: ['slow.example:8002'] })
    const controller = new AbortController()
    const next = targets.next({ signal: controller.signal })
    controller.abort(new Error('stopping'))
    await assert.rejects(next, /stopping/)
  })

  test('an address the configuration would refuse is refused here too', () => {
    assert.throws(() => createSchedulerTargets({ logger }, { addresses: ['sched-0'] }), (err: unknown) => err instanceof ConfigError && err.key === 'scheduler')
    assert.throws(() => createSchedulerTargets({ logger }, { addresses: [] }), (err: unknown) => err instanceof ConfigError && err.key === 'scheduler')
  })
})
