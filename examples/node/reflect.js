#!/usr/bin/env node
// Discover a visionrpc server through gRPC server reflection and call it with nothing
// but what reflection returned: no .proto file on this side.
//
//   node reflect.js [--server host:port] [--reflection v1|v1alpha]
//
// Prints the services the server lists, the methods of visionrpc.v1.InferenceService,
// and the models ListModels answers (called through the reflected descriptor).
// The server answers both reflection versions; v1 is the default here.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const { GrpcReflection } = require('grpc-js-reflection-client');

const SERVICE = 'visionrpc.v1.InferenceService';
const DEADLINE_MS = 30000;

function parseArgs(argv) {
  const options = { server: process.env.VISIONRPC_SERVER || '127.0.0.1:8001', reflection: 'v1' };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--server' && value) options.server = value;
    else if (flag === '--reflection' && (value === 'v1' || value === 'v1alpha')) options.reflection = value;
    else throw new Error(`usage: reflect.js [--server host:port] [--reflection v1|v1alpha]`);
  }
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const credentials = grpc.credentials.createInsecure();
  const reflection = new GrpcReflection(options.server, credentials, {}, options.reflection);
  const services = await reflection.listServices();
  for (const service of [...services].sort()) console.log(`service ${service}`);
  const methods = await reflection.listMethods(SERVICE);
  console.log(`${SERVICE}: ${methods.map((m) => m.name).sort().join(', ')}`);

  const descriptor = await reflection.getDescriptorBySymbol(SERVICE);
  const api = descriptor.getPackageObject({ keepCase: true, enums: String, longs: Number, defaults: true });
  const client = new api.visionrpc.v1.InferenceService(options.server, credentials);
  const listed = await new Promise((resolve, reject) =>
    client.ListModels({}, { deadline: Date.now() + DEADLINE_MS }, (error, response) =>
      error ? reject(error) : resolve(response),
    ),
  );
  for (const model of listed.models) {
    console.log(`model ${model.name} ${model.task} versions ${model.versions.join(',')}`);
  }
  client.close();
}

main().then(
  // The reflection client keeps its channel open; nothing else is left to wait for.
  () => process.exit(0),
  (error) => {
    const status = error.code !== undefined ? `${grpc.status[error.code]}: ${error.details}` : error.message;
    console.error(`${path.basename(__filename, '.js')}: ${status}`);
    process.exit(1);
  },
);
