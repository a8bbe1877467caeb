import neostandard from 'neostandard'
import tseslint from 'typescript-eslint'

// The folder tree is the architecture: src/ is the shared core and imports neither
// side; peer/ and scheduler/ meet only through the wire types in src/.
const boundaries = {
  // The CLI is the composition root of every binary, so it alone may reach both sides.
  'src/!(cli)/**/*.ts': ['**/peer/**', '**/scheduler/**'],
  'src/*.ts': ['**/peer/**', '**/scheduler/**'],
  'peer/**/*.ts': ['**/scheduler/**'],
  'scheduler/**/*.ts': ['**/peer/**']
}

export default [
  ...neostandard({ ts: true, ignores: ['node_modules/**', 'bench/results/**', 'bench/.scratch/**', 'deploy/**/*.json'] }),
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
  ...Object.entries(boundaries).map(([files, group]) => ({
    files: [files],
    rules: { 'no-restricted-imports': ['error', { patterns: [{ group, message: 'peer/ and scheduler/ meet only through src/' }] }] }
  })),
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
