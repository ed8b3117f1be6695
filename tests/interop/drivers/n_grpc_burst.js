// Many PublishMessage calls at once on one grpc-js connection, as the official
// Node gRPC SDK (packages/ensync-client-sdk, not on npm) makes them: the same
// library (@grpc/grpc-js with @grpc/proto-loader, keepCase, longs as strings),
// its default channel options and so its `grpc-node-js/` user agent. Started by
// tests/interop/test_official_grpc.py:
//
//     node n_grpc_burst.js '<config JSON>'
//
// The config: {target, proto, app_key, name, recipient, payload, metadata,
// count}. `payload` is an envelope sealed by the test (the engine never opens
// it). The driver connects, starts `count` publishes together, waits for all of
// them and prints one JSON line: {"answered": n, "failed": n, "errors": [...]}.

"use strict";

const path = require("node:path");

const modules = path.join(__dirname, "..", "..", "node", "node_modules");
const grpc = require(path.join(modules, "@grpc", "grpc-js"));
const protoLoader = require(path.join(modules, "@grpc", "proto-loader"));

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

async function main() {
  const config = JSON.parse(process.argv[2]);
  const definition = protoLoader.loadSync(config.proto, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const Service = grpc.loadPackageDefinition(definition).ensync.EnSyncService;
  const client = new Service(config.target, grpc.credentials.createInsecure());
  const connected = await call(client, "Connect", { access_key: config.app_key });
  if (!connected.success) {
    throw new Error(`Connect refused: ${connected.error_message}`);
  }
  const outcomes = await Promise.allSettled(
    Array.from({ length: config.count }, () =>
      call(client, "PublishMessage", {
        client_id: connected.client_id,
        message_name: config.name,
        payload: config.payload,
        delivery_to: config.recipient,
        metadata: config.metadata,
      }),
    ),
  );
  const errors = new Set();
  let answered = 0;
  for (const outcome of outcomes) {
    if (outcome.status === "fulfilled" && outcome.value.success) {
      answered += 1;
    } else {
      const reason =
        outcome.status === "fulfilled" ? outcome.value.error_message : outcome.reason.message;
      errors.add(String(reason).slice(0, 200));
    }
  }
  client.close();
  const failed = outcomes.length - answered;
  process.stdout.write(
    JSON.stringify({ answered, failed, errors: [...errors].sort().slice(0, 3) }) + "\n",
  );
}

main().catch((error) => {
  process.stdout.write(JSON.stringify({ fatal: String(error && error.stack) }) + "\n");
  process.exit(1);
});
