#!/usr/bin/env node
// Predict images with the three demo models of a running visionrpc server, from Node.js.
//
//   visionrpc serve --repository demo-models &          # or: make serve
//   cd examples/node && npm ci
//   node predict.js cat.jpg street.jpg face.jpg [--server host:port] [--models pets,voc,biwi]
//
// Every model answers every image twice: once through the unary Predict (all images in
// one request), once through the bidirectional PredictStream (one request per image,
// matched back by request_id, since answers may come back out of order). It prints one
// line per model and image, then whether the stream agreed with Predict.
// Exit status: 0 when every image was answered, 1 when an image or a call failed (the
// other images are still answered), 2 for a mistake in the arguments.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const DEMO_MODELS = ['pets', 'voc', 'biwi'];
const DEADLINE_MS = 30000;

class UsageError extends Error {}

function loadInferenceService() {
  const definition = protoLoader.loadSync('visionrpc/v1/inference.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as the .proto spells them: top_k, request_id
    enums: String, // response.task reads 'MODEL_TASK_CLASSIFICATION'
    longs: Number,
    defaults: true,
    oneofs: true, // result.result names the field that is set
  });
  return grpc.loadPackageDefinition(definition).visionrpc.v1.InferenceService;
}

function parseArgs(argv) {
  const options = {
    server: process.env.VISIONRPC_SERVER || '127.0.0.1:8001',
    models: DEMO_MODELS,
    images: [],
  };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--server' || arg === '--models') {
      const value = argv[i + 1];
      if (value === undefined) throw new UsageError(`${arg} needs a value`);
      i += 1;
      if (arg === '--server') options.server = value;
      else options.models = value.split(',').filter(Boolean);
    } else if (arg.startsWith('--')) {
      throw new UsageError(`unknown option ${arg}`);
    } else {
      options.images.push(arg);
    }
  }
  if (options.images.length === 0) throw new UsageError('name at least one image file');
  return options;
}

function scores(labelScores) {
  return labelScores.map((s) => `${s.label} ${s.score.toFixed(2)}`).join(', ');
}

function describe(result) {
  switch (result.result) {
    case 'classification': {
      const top = scores(result.classification.top);
      return result.classification.below_min_confidence ? `no known class (${top})` : top;
    }
    case 'multilabel':
      return scores(result.multilabel.labels) || 'no label';
    case 'points':
      return result.points.points
        .map((p) => `${p.name} at (${p.x.toFixed(1)}, ${p.y.toFixed(1)})`)
        .join(', ');
    case 'error':
      return `error ${grpc.status[result.error.code] || result.error.code}: ${result.error.message}`;
    default:
      return `a result this example does not know (${result.result})`;
  }
}

// An image's error names its index within its request, which differs between one
// request for all images and one per image: errors agree when their codes do.
function sameAnswer(a, b) {
  if (a.result === 'error' || b.result === 'error') {
    return a.result === b.result && a.error.code === b.error.code;
  }
  return describe(a) === describe(b);
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// Writes every request, half-closes, and collects the answers by request_id.
function predictStream(client, requests) {
  return new Promise((resolve, reject) => {
    const answers = new Map();
    const stream = client.PredictStream({ deadline: Date.now() + DEADLINE_MS });
    stream.on('data', (response) => answers.set(response.request_id, response));
    stream.on('error', reject);
    stream.on('end', () => resolve(answers));
    for (const request of requests) stream.write(request);
    stream.end();
  });
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const images = options.images.map((file) => ({ file, encoded: fs.readFileSync(file) }));
  const InferenceService = loadInferenceService();
  const client = new InferenceService(options.server, grpc.credentials.createInsecure());
  let failed = false;
  try {
    const unary = new Map();
    for (const model of options.models) {
      const request = { model, images: images.map(({ encoded }) => ({ encoded })) };
      const response = await call(client, 'Predict', request);
      response.results.forEach((result, index) => {
        console.log(`${model} v${response.version} ${response.task} ${images[index].file}: ${describe(result)}`);
        failed = failed || result.result === 'error';
      });
      unary.set(model, response.results);
    }

    const requests = options.models.flatMap((model) =>
      images.map(({ encoded }, index) => ({ model, images: [{ encoded }], request_id: `${model}#${index}` })),
    );
    const answers = await predictStream(client, requests);
    let differing = 0;
    for (const request of requests) {
      const answer = answers.get(request.request_id);
      const [model, index] = request.request_id.split('#');
      const agrees =
        answer !== undefined &&
        !answer.error &&
        sameAnswer(answer.results[0], unary.get(model)[Number(index)]);
      if (!agrees) differing += 1;
    }
    console.log(
      `PredictStream: ${answers.size} answers to ${requests.length} requests, ${differing} differing from Predict`,
    );
    failed = failed || differing > 0;
  } finally {
    client.close();
  }
  return failed ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    const name = path.basename(__filename, '.js');
    if (error instanceof UsageError) {
      console.error(`${name}: ${error.message}`);
      process.exitCode = 2;
    } else if (error.code !== undefined && grpc.status[error.code] !== undefined) {
      console.error(`${name}: ${grpc.status[error.code]}: ${error.details}`);
      process.exitCode = 1;
    } else {
      console.error(`${name}: ${error.message}`);
      process.exitCode = 1;
    }
  },
);
