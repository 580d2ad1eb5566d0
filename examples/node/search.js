#!/usr/bin/env node
// Query a vitrine server from Node.js: the standard gRPC stack (@grpc/grpc-js) and the service
// definition loaded at run time from protos/vitrine/v1/search.proto -- no generated code, nothing of
// vitrine's Python. What a client in any language does: read the proto, set one field of the
// `query` oneof, send a deadline, read the status code.
//
//   npm ci                                   # once, in this folder
//   node search.js --target localhost:50051 --image photo.heic --top-k 5
//   node search.js --target localhost:50051 --product-id 15970 --category Shirts --max-price 50 --in-stock
//   node search.js --target localhost:50051 --image a.jpg --image b.jpg        # one BatchSearch call
//   node search.js --target localhost:50051 --info
//   node search.js ... --json                # the response as JSON (proto field names) instead of a table
//   node search.js ... --tls-ca ca.pem [--tls-cert client.pem --tls-key client.key]   # TLS / mutual TLS
//   node search.js --target localhost:50051 --image street.jpg --crop 0.3,0.2,0.4,0.6   # the marked region only
//
// Exit status: 0 answered; 1 the server answered with an error status (printed as CODE: message);
// 2 bad command line. UNAVAILABLE is retried (--retries, exponential back-off) within the deadline.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.VITRINE_PROTOS || path.resolve(__dirname, '..', '..', 'protos');
const USAGE = `usage: node search.js --target HOST:PORT (--image FILE [--image FILE ...] | --product-id ID | --info)
       [--top-k N] [--category C ...] [--brand B ...] [--min-price P] [--max-price P] [--in-stock]
       [--nprobe N] [--no-rerank] [--deadline-ms MS] [--retries N] [--json]
       [--crop X,Y,W,H] [--tls | --tls-ca CA.pem] [--tls-cert CERT.pem --tls-key KEY.pem]`;

class UsageError extends Error {}

function parseArgs(argv) {
  const args = { target: '127.0.0.1:50051', images: [], categories: [], brands: [], topK: 10, deadlineMs: 10000,
    retries: 3, json: false, inStock: false, rerank: true, info: false, tls: false };
  const number = (flag, value, integer) => {
    const parsed = Number(value);
    if (value === undefined || !Number.isFinite(parsed) || (integer && !Number.isInteger(parsed))) {
      throw new UsageError(`${flag} needs a${integer ? 'n integer' : ' number'}, got ${JSON.stringify(value)}`);
    }
    return parsed;
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${flag} needs a value`);
      return argv[++i];
    };
    switch (flag) {
      case '--target': args.target = value(); break;
      case '--image': args.images.push(value()); break;
      case '--product-id': args.productId = value(); break;
      case '--info': args.info = true; break;
      case '--top-k': args.topK = number(flag, value(), true); break;
      case '--category': args.categories.push(value()); break;
      case '--brand': args.brands.push(value()); break;
      case '--min-price': args.minPrice = number(flag, value(), false); break;
      case '--max-price': args.maxPrice = number(flag, value(), false); break;
      case '--in-stock': args.inStock = true; break;
      case '--nprobe': args.nprobe = number(flag, value(), true); break;
      case '--no-rerank': args.rerank = false; break;
      case '--deadline-ms': args.deadlineMs = number(flag, value(), true); break;
      case '--retries': args.retries = number(flag, value(), true); break;
      case '--json': args.json = true; break;
      case '--crop': args.crop = parseCrop(value()); break;
      case '--tls': args.tls = true; break;
      case '--tls-ca': args.tlsCa = value(); break;
      case '--tls-cert': args.tlsCert = value(); break;
      case '--tls-key': args.tlsKey = value(); break;
      case '-h': case '--help': console.log(USAGE); process.exit(0); break;
      default: throw new UsageError(`unknown argument ${JSON.stringify(flag)}`);
    }
  }
  const modes = [args.images.length > 0, args.productId !== undefined, args.info].filter(Boolean).length;
  if (modes !== 1) throw new UsageError('give exactly one of --image, --product-id or --info');
  if (args.crop !== undefined && args.images.length === 0) {
    throw new UsageError('--crop marks part of a query photo: it needs --image');
  }
  if ((args.tlsCert === undefined) !== (args.tlsKey === undefined)) {
    throw new UsageError('--tls-cert and --tls-key go together');
  }
  return args;
}

// Plaintext, or TLS verified against --tls-ca (else the system's CAs), with a client certificate for mutual TLS.
function credentials(args) {
  if (!args.tls && args.tlsCa === undefined && args.tlsCert === undefined) return grpc.credentials.createInsecure();
  const read = (file) => {
    try {
      return fs.readFileSync(file);
    } catch (error) {
      throw new UsageError(`cannot read ${file}: ${error.message}`);
    }
  };
  return grpc.credentials.createSsl(args.tlsCa === undefined ? null : read(args.tlsCa),
    args.tlsKey === undefined ? null : read(args.tlsKey), args.tlsCert === undefined ? null : read(args.tlsCert));
}

function loadService() {
  const definition = protoLoader.loadSync(path.join('vitrine', 'v1', 'search.proto'), {
    includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).vitrine.v1.VisualSearch;
}

// A unary call with a deadline, retried on UNAVAILABLE (server starting, restarting, swapping pods).
function call(client, method, request, args) {
  const deadline = Date.now() + args.deadlineMs;
  return new Promise((resolve, reject) => {
    const attempt = (n) => {
      client[method](request, { deadline }, (error, response) => {
        if (!error) return resolve(response);
        const backoffMs = 100 * 2 ** n;
        if (error.code === grpc.status.UNAVAILABLE && n < args.retries && Date.now() + backoffMs < deadline) {
          return setTimeout(() => attempt(n + 1), backoffMs);
        }
        reject(error);
      });
    };
    attempt(0);
  });
}

// --crop X,Y,W,H: a region of the query photo in fractions of its width and height (the server checks it).
function parseCrop(text) {
  const parts = text.split(',').map(Number);
  if (parts.length !== 4 || parts.some((v) => !Number.isFinite(v))) {
    throw new UsageError(`--crop must be X,Y,W,H in fractions of the image, got ${JSON.stringify(text)}`);
  }
  const [x, y, width, height] = parts;
  return { x, y, width, height };
}

function searchRequest(query, args) {
  const filter = { categories: args.categories, brands: args.brands, in_stock_only: args.inStock };
  if (args.minPrice !== undefined || args.maxPrice !== undefined) {
    filter.price = {};
    if (args.minPrice !== undefined) filter.price.min = args.minPrice;
    if (args.maxPrice !== undefined) filter.price.max = args.maxPrice;
  }
  const options = { exact_rerank: args.rerank };
  if (args.nprobe !== undefined) options.nprobe = args.nprobe;
  const request = { ...query, top_k: args.topK, filter, options };
  if (args.crop !== undefined && query.image !== undefined) request.crop = args.crop;
  return request;
}

function readImage(file) {
  try {
    return fs.readFileSync(file);
  } catch (error) {
    throw new UsageError(`cannot read --image ${file}: ${error.message}`);
  }
}

function table(response) {
  const lines = [`index version ${response.index_version}, ${response.hits.length} hits, ` +
    `${(Number(response.took_us) / 1000).toFixed(1)} ms on the server` +
    (response.partial ? `, PARTIAL (missing shards ${response.missing_shards.join(',')})` : '')];
  lines.push('rank  score   product_id  category              price  title');
  response.hits.forEach((hit, i) => {
    const p = hit.product;
    const price = p.price === null || p.price === undefined ? '-' : `${p.price.toFixed(2)} ${p.currency}`;
    lines.push(`${String(i + 1).padStart(4)}  ${hit.score.toFixed(4)}  ${hit.product_id.padEnd(10)}  ` +
      `${p.category.padEnd(20)}  ${price.padStart(9)}  ${p.title}`);
  });
  return lines.join('\n');
}

async function main(argv) {
  let args;
  try {
    args = parseArgs(argv);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`error: ${error.message}\n${USAGE}`);
    return 2;
  }
  let channelCredentials;
  try {
    channelCredentials = credentials(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`error: ${error.message}`);
    return 2;
  }
  const VisualSearch = loadService();
  const client = new VisualSearch(args.target, channelCredentials, {
    'grpc.max_send_message_length': 64 * 1024 * 1024, 'grpc.max_receive_message_length': 64 * 1024 * 1024,
  });
  try {
    let output;
    if (args.info) {
      output = await call(client, 'GetIndexInfo', {}, args);
      if (!args.json) output = Object.entries(output).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join('\n');
    } else if (args.images.length > 1) {
      const requests = args.images.map((file) => searchRequest({ image: readImage(file) }, args));
      output = await call(client, 'BatchSearch', { requests }, args);
      if (!args.json) {
        output = output.results.map((r, i) => `== ${args.images[i]}\n` +
          (r.code === 0 ? table(r.response) : `error ${r.code}: ${r.message}`)).join('\n');
      }
    } else {
      const query = args.productId !== undefined ? { product_id: args.productId } : { image: readImage(args.images[0]) };
      output = await call(client, 'Search', searchRequest(query, args), args);
      if (!args.json) output = table(output);
    }
    console.log(typeof output === 'string' ? output : JSON.stringify(output, null, 1));
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      console.error(`error: ${error.message}`);
      return 2;
    }
    if (error.code === undefined) throw error;
    const name = Object.keys(grpc.status).find((k) => grpc.status[k] === error.code) || String(error.code);
    console.error(`${name}: ${error.details}`);
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then((code) => process.exit(code), (error) => {
  console.error(error);
  process.exit(1);
});
