#!/usr/bin/env node
// Node >= 22.18 runs the TypeScript sources directly (type stripping); nothing is compiled.
// This file is plain JavaScript so that an older Node gets a sentence, not ERR_UNKNOWN_FILE_EXTENSION.
const [major, minor] = process.versions.node.split('.').map(Number)
if (major < 22 || (major === 22 && minor < 18)) {
  process.stderr.write(`damselfly needs Node.js 22.18 or newer (it runs its TypeScript sources directly); this is Node ${process.versions.node} at ${process.execPath}.\n` +
    'Install Node 24 (https://nodejs.org or your distribution), or run it from the checkout with `npx damselfly …`, which uses the Node 24 that `npm ci` installed.\n')
  process.exit(1)
}
const { main } = await import('../cli/main.ts')

// Exit explicitly: a service that failed half-way through starting may still hold sockets open.
process.exit(await main(process.argv.slice(2)))
