#!/usr/bin/env node
// Node >= 22.18 runs the TypeScript sources directly (type stripping); nothing is compiled.
import { main } from '../cli/main.ts'

// Exit explicitly: a service that failed half-way through starting may still hold sockets open.
process.exit(await main(process.argv.slice(2)))
