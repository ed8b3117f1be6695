// Drive the official npm WebSocket client `ensync-client-sdk@0.0.18` (N-ws-0018)
// from a test. Started by tests/interop/official_ws.py:
//
//     node n_ws_0018.js '<config JSON>'
//
// The config names the engine's http(s) base URL (the client maps it to
// ws://…/message itself, PROTOCOL.md §3.1), the app's key and secret, the
// subscriptions ({name, auto_ack}) and the driver's lifetime. The client is
// loaded from tests/node/node_modules (installed by `npm ci` there). Then one
// JSON command per line on stdin, one JSON event per line on stdout - the same
// line protocol as drivers/p_ws.py:
//
//   {"event": "ready", "client_id": ...}          connected and subscribed
//   {"event": "message", "name": ..., ...}        per handled message
//   {"event": "result", "id": n, "ok": ..., ...}  per command
//   {"event": "fatal", "error": ...}              when it gives up
//   {"event": "closed"}                           just before it exits
//
// Commands: {"id": n, "op": OP, ...}, OP one of publish (name, recipients,
// payload, metadata), ack (name, idem, block), rollback (name, idem, block),
// close. This client has no defer, discard, replay, pause or continue.
//
// Quirks of the official client worked around here (PROTOCOL.md §3.8, §6):
//
// * it logs to the console unconditionally: console output goes to stderr, so
//   stdout carries only the driver's JSON lines;
// * it keys pending requests by Date.now(): two requests in the same
//   millisecond collide and one promise is lost until its 30 s timeout. The
//   driver runs one command at a time and starts each request in a fresh
//   millisecond after the previous request and after any handler call (a
//   handler call may be followed at once by an auto-ack request);
// * its requests time out after 30 s: the driver gives each call 10 s;
// * it reads the record's `id` (never `idem`) and exposes no sender;
// * auto-ack sends EVENT_NAME=:undefined - left as is: the engine must cope;
// * close() leaves its ping interval and request timers behind, so the driver
//   ends the process itself.

"use strict";

const path = require("node:path");
const readline = require("node:readline");
const { createRequire } = require("node:module");

const CALL_TIMEOUT_MS = 10_000;
const CLOSE_TIMEOUT_MS = 3_000;
const NODE_PROJECT = path.resolve(__dirname, "..", "..", "node", "package.json");

// Keep stdout for JSON lines: the client's console.log chatter goes to stderr.
for (const level of ["log", "info", "warn", "debug", "trace"]) {
  console[level] = console.error;
}

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

function describe(error) {
  return {
    error: String(error && error.message !== undefined ? error.message : error),
    error_type: String((error && error.name) || typeof error),
  };
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      const error = new Error(`${what} timed out after ${ms} ms`);
      error.name = "Timeout";
      reject(error);
    }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Driver {
  constructor(config, sdk) {
    this.config = config;
    this.client = new sdk.EnSyncEngine(config.url);
    this.subs = new Map();
    this.lastRequestMs = 0;
  }

  // Wait for a millisecond no earlier request used, then claim it (§3.8).
  async request(start) {
    while (Date.now() <= this.lastRequestMs + 1) {
      await sleep(1);
    }
    this.lastRequestMs = Date.now();
    const pending = start();
    this.lastRequestMs = Date.now();
    return pending;
  }

  async start() {
    await withTimeout(
      this.request(() =>
        this.client.createClient(this.config.app_key, { appSecretKey: this.config.secret_key }),
      ),
      CALL_TIMEOUT_MS,
      "createClient",
    );
    for (const wanted of this.config.subscriptions) {
      const options = { autoAck: Boolean(wanted.auto_ack) };
      const sub = await withTimeout(
        this.request(() => this.client.subscribe(wanted.name, options)),
        CALL_TIMEOUT_MS,
        "subscribe",
      );
      sub.on((message) => this.handle(message));
      this.subs.set(wanted.name, sub);
    }
    emit("ready", { client_id: null });
  }

  handle(message) {
    // An auto-ack request may follow this call within the same millisecond.
    this.lastRequestMs = Date.now();
    emit("message", {
      name: message.eventName,
      idem: message.idem,
      block: message.block,
      payload: message.payload,
      sender: null,
      metadata: message.metadata,
      timestamp: message.timestamp,
    });
  }

  async run(command) {
    const { id, op } = command;
    try {
      const value = await withTimeout(this.call(command), CALL_TIMEOUT_MS, op);
      emit("result", { id, op, ok: true, value: value === undefined ? null : value });
    } catch (error) {
      emit("result", { id, op, ok: false, ...describe(error) });
    }
  }

  call(command) {
    const sub = this.subs.get(command.name);
    switch (command.op) {
      case "publish":
        return this.request(() =>
          this.client.publish(command.name, command.recipients, command.payload, command.metadata),
        );
      case "ack":
        if (sub) return this.request(() => sub.ack(command.idem, command.block));
        break;
      case "rollback":
        if (sub) return this.request(() => sub.rollback(command.idem, command.block));
        break;
      default:
        break;
    }
    return Promise.reject(new Error(`unknown op ${command.op} or name not subscribed`));
  }

  async close() {
    try {
      await withTimeout(this.client.close(), CLOSE_TIMEOUT_MS, "close");
    } catch (error) {
      emit("close_error", describe(error));
    }
  }
}

async function serve(driver) {
  await driver.start();
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const command = JSON.parse(line);
    if (command.op === "close") {
      emit("result", { id: command.id, op: "close", ok: true, value: null });
      return;
    }
    // Sequential on purpose: one request in flight at a time, results in order.
    await driver.run(command);
  }
}

async function main() {
  const config = JSON.parse(process.argv[2]);
  let sdk;
  try {
    sdk = createRequire(NODE_PROJECT)("ensync-client-sdk");
  } catch (error) {
    emit("fatal", { error: `the official client is not installed: ${error.message}`, error_type: "Import" });
    emit("closed");
    return 1;
  }
  const driver = new Driver(config, sdk);
  let code = 0;
  let lifetimeTimer;
  const lifetime = new Promise((_, reject) => {
    lifetimeTimer = setTimeout(() => {
      const error = new Error(`lifetime of ${config.lifetime_s} s exceeded`);
      error.name = "Timeout";
      reject(error);
    }, config.lifetime_s * 1000);
  });
  try {
    await Promise.race([serve(driver), lifetime]);
  } catch (error) {
    emit("fatal", describe(error));
    code = 1;
  } finally {
    clearTimeout(lifetimeTimer);
    await driver.close();
    emit("closed");
  }
  return code;
}

main().then(
  (code) => process.stdout.write("", () => process.exit(code)),
  (error) => {
    process.stderr.write(`driver crashed: ${error && error.stack}\n`);
    process.exit(2);
  },
);
