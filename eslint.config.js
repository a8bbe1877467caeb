import neostandard from 'neostandard'
import tseslint from 'typescript-eslint'

// The folder tree is the architecture: src/ is the shared core and imports nothing above it;
// peer/ and scheduler/ import src/ and never each other (they meet through the wire types in
// src/protocol/); cli/ is the application, and alone composes the binaries from all three.
const boundaries = [
  { files: 'src/**/*.ts', forbidden: ['peer', 'scheduler', 'cli'], message: 'src/ is the shared core: it imports nothing from peer/, scheduler/ or cli/' },
  { files: 'peer/**/*.ts', forbidden: ['scheduler', 'cli'], message: 'peer/ imports only src/: it meets scheduler/ through src/protocol/, and cli/ composes it' },
  { files: 'scheduler/**/*.ts', forbidden: ['peer', 'cli'], message: 'scheduler/ imports only src/: it meets peer/ through src/protocol/, and cli/ composes it' }
]

// Inside the peer, each folder imports only those built before it (peer/main.ts builds them
// in this order; docs/architecture.md says what each does). A folder may import anything
// from an earlier layer, nothing from its own layer but itself, nothing from a later one.
const peerLayers = [
  ['piece-store', 'facts', 'upstream'],
  ['origin'],
  ['swarm'],
  ['auth'],
  ['blobs'],
  ['manifests', 'upload'],
  ['jobs', 'mirror', 'proxy']
]
// The scheduler likewise (scheduler/main.ts): the state, the rules that choose parents, the
// swarm that changes the state through a log, then what serves peers, jobs and the HTTP API.
const schedulerLayers = [
  ['state'],
  ['scheduling'],
  ['swarm'],
  ['rpc', 'preheat'],
  ['api']
]
const layerRules = (root, layers, outside) => layers.flatMap((layer, depth) => layer.map(folder => {
  const later = layers.slice(depth + 1).flat()
  const siblings = layer.filter(other => other !== folder)
  return {
    files: [`${root}/${folder}/**/*.ts`],
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [
          { group: outside.map(dir => `**/${dir}/**`), message: 'peer/ and scheduler/ meet only through src/' },
          ...[...later, ...siblings].map(other => ({ group: [`**/${root}/${other}/**`, `../${other}/**`], message: `${root}/${folder} is built before ${root}/${other}: it may not import it (see docs/architecture.md)` }))
        ]
      }]
    }
  }
}))
const peerRules = layerRules('peer', peerLayers, ['scheduler', 'cli'])
const schedulerRules = layerRules('scheduler', schedulerLayers, ['peer', 'cli'])

export default [
  ...neostandard({ ts: true, ignores: ['node_modules/**', 'dist/**', 'bench/results/**', 'bench/.scratch/**', 'deploy/**/*.json'] }),
  {
    files: ['**/*.ts'],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname }
    },
    plugins: { '@typescript-eslint': tseslint.plugin },
    rules: {
      '@typescript-eslint/no-floating-promises': ['error', {
        // node:test collects these itself; awaiting them at top level would serialise nothing.
        allowForKnownSafeCalls: [{ from: 'package', package: 'node:test', name: ['test', 'it', 'describe', 'suite'] }]
      }],
      '@typescript-eslint/only-throw-error': 'error',
      '@typescript-eslint/return-await': ['error', 'in-try-catch'],
      '@typescript-eslint/consistent-type-imports': 'error',
      '@typescript-eslint/explicit-function-return-type': ['error', { allowExpressions: true, allowTypedFunctionExpressions: true, allowHigherOrderFunctions: true }],
      'n/prefer-node-protocol': 'error',
      // `void promise` is how a deliberately unawaited promise is marked.
      'no-void': ['error', { allowAsStatement: true }],
      'no-console': 'error',
      // TypeBox's idiom is a schema value and its static type under one name; tsc catches real redeclarations.
      '@typescript-eslint/no-redeclare': 'off',
      'max-depth': ['error', 4]
    }
  },
  ...boundaries.map(({ files, forbidden, message }) => ({
    files: [files],
    rules: {
      'no-restricted-imports': ['error', { patterns: [{ group: forbidden.map(dir => `**/${dir}/**`), message }] }],
      // no-restricted-imports does not look at import(); \x2F is a slash, which esquery's regex literals cannot hold.
      'no-restricted-syntax': ['error', { selector: `ImportExpression[source.value=/(^|\\x2F)(${forbidden.join('|')})\\x2F/]`, message }]
    }
  })),
  // After the folder-wide rules, which they include: the last matching rule wins.
  ...peerRules,
  ...schedulerRules,
  {
    // The scheduler's status page runs in a browser, as a module, unbuilt.
    files: ['scheduler/ui/**/*.js'],
    languageOptions: {
      sourceType: 'module',
      globals: { document: 'readonly', fetch: 'readonly', setTimeout: 'readonly', AbortSignal: 'readonly' }
    }
  },
  {
    // Only the CLI, tests and benchmarks talk to a terminal.
    files: ['cli/**/*.ts', 'test/**/*.ts', 'bench/**/*.ts'],
    rules: { 'no-console': 'off' }
  }
]
