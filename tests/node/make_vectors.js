#!/usr/bin/env node
// Makes tests/vectors/crypto.json: keys and envelopes produced by the same
// libraries the official Node clients use (tweetnacl, tweetnacl-util,
// ed2curve), so the Python tests can prove that ensync.crypto reads what
// they write and converts keys the same way (PROTOCOL.md section 4).
//
// Regenerate (from the repository root):
//
//   (cd tests/node && npm ci) && node tests/node/make_vectors.js > tests/vectors/crypto.json
//
// The output is deterministic: the script replaces tweetnacl's random source
// with a SHA-512 counter stream, so ephemeral keys, nonces and message keys
// repeat from run to run and a regenerated file diffs clean. That stream is
// for test data only; nothing here is a usable key.
'use strict';

const path = require('path');
const nacl = require('tweetnacl');
const naclUtil = require('tweetnacl-util');
const ed2curve = require('ed2curve');

const b64 = naclUtil.encodeBase64;
const utf8 = naclUtil.decodeUTF8;

function hex(bytes) {
  return Buffer.from(bytes).toString('hex');
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

// Deterministic stand-in for crypto.getRandomValues: block i of the stream is
// SHA-512("ensync-crypto-vectors/prng/" + i).
function installDeterministicPrng(label) {
  let counter = 0;
  let pool = new Uint8Array(0);
  nacl.setPRNG((x, n) => {
    while (pool.length < n) {
      pool = concat(pool, nacl.hash(utf8(`${label}/${counter}`)));
      counter += 1;
    }
    x.set(pool.subarray(0, n));
    pool = pool.slice(n);
  });
}

function packageVersion(name) {
  // Read from the installed package so the file records what really ran.
  return require(path.join(name, 'package.json')).version;
}

function makeKeyPair(name, seed) {
  const kp = nacl.sign.keyPair.fromSeed(seed);
  return {
    name,
    seed_hex: hex(seed),
    app_id: b64(kp.publicKey),
    secret_key: b64(kp.secretKey),
    x25519_public: b64(ed2curve.convertPublicKey(kp.publicKey)),
    x25519_secret: b64(ed2curve.convertSecretKey(kp.secretKey)),
    // Kept out of the JSON; used below to seal.
    _kp: kp,
  };
}

// Single-recipient envelope, PROTOCOL.md section 4.2.
function sealBox(message, edPublicKey) {
  const eph = nacl.box.keyPair();
  const nonce = nacl.randomBytes(nacl.box.nonceLength);
  const box = nacl.box(message, nonce, ed2curve.convertPublicKey(edPublicKey), eph.secretKey);
  return {nonce: b64(nonce), ciphertext: b64(box), ephemeralPublicKey: b64(eph.publicKey)};
}

// Hybrid envelope, PROTOCOL.md section 4.3, in any of the three dialects.
function sealHybrid(message, recipients, mapKeyOf, keyField) {
  const messageKey = nacl.randomBytes(nacl.secretbox.keyLength);
  const nonce = nacl.randomBytes(nacl.secretbox.nonceLength);
  const keys = {};
  for (const r of recipients) {
    const sealed = sealBox(messageKey, r._kp.publicKey);
    keys[mapKeyOf(r)] = {
      nonce: sealed.nonce,
      [keyField]: sealed.ciphertext,
      ephemeralPublicKey: sealed.ephemeralPublicKey,
    };
  }
  return {
    type: 'hybrid',
    payload: {nonce: b64(nonce), ciphertext: b64(nacl.secretbox(message, nonce, messageKey))},
    keys,
  };
}

function wire(envelope) {
  // What the Node clients put in the publish request's payload field.
  return b64(utf8(JSON.stringify(envelope)));
}

function main() {
  installDeterministicPrng('ensync-crypto-vectors/prng');

  const seedOf = (name) => nacl.hash(utf8(`ensync-crypto-vectors/seed/${name}`)).subarray(0, 32);
  const keypairs = [
    makeKeyPair('alice', seedOf('alice')),
    makeKeyPair('bob', seedOf('bob')),
    makeKeyPair('carol', seedOf('carol')),
    makeKeyPair('dave', seedOf('dave')),
    makeKeyPair('zero-seed', new Uint8Array(32)),
  ];
  const byName = Object.fromEntries(keypairs.map((k) => [k.name, k]));
  const pick = (...names) => names.map((n) => byName[n]);

  const plaintexts = [
    '{"hello":"world"}',
    '{"text":"grüße, 世界 🚀","n":1,"nested":{"ok":true,"list":[1,2,3]}}',
    '{}',
    '',
    JSON.stringify({blob: 'x'.repeat(2000)}),
  ];

  const single = [];
  keypairs.forEach((recipient, i) => {
    const plaintext = plaintexts[i % plaintexts.length];
    single.push({
      name: `single-to-${recipient.name}`,
      recipients: [recipient.name],
      plaintext,
      wire_payload: wire(sealBox(utf8(plaintext), recipient._kp.publicKey)),
    });
  });
  // Every plaintext at least once, all to alice.
  plaintexts.forEach((plaintext, i) => {
    single.push({
      name: `single-plaintext-${i}`,
      recipients: ['alice'],
      plaintext,
      wire_payload: wire(sealBox(utf8(plaintext), byName.alice._kp.publicKey)),
    });
  });

  const dialects = [
    // Node clients: map key = app id, key field encryptedKey.
    {dialect: 'encryptedKey', map_key: 'app_id', key_field: 'encryptedKey', mapKeyOf: (r) => r.app_id},
    // Python clients: map key = hex of the Ed25519 public key, key field ciphertext.
    {dialect: 'ciphertext-hex', map_key: 'hex', key_field: 'ciphertext', mapKeyOf: (r) => hex(r._kp.publicKey)},
    // Go clients: map key = app id, key field ciphertext.
    {dialect: 'ciphertext-base64', map_key: 'app_id', key_field: 'ciphertext', mapKeyOf: (r) => r.app_id},
  ];
  const recipientSets = [
    ['alice', 'bob'],
    ['alice', 'bob', 'carol'],
    ['carol'],
  ];
  const hybrid = [];
  dialects.forEach((d, di) => {
    recipientSets.forEach((names, ri) => {
      const plaintext = plaintexts[(di + ri) % plaintexts.length];
      hybrid.push({
        name: `hybrid-${d.dialect}-${names.join('-')}`,
        dialect: d.dialect,
        map_key: d.map_key,
        key_field: d.key_field,
        recipients: names,
        plaintext,
        wire_payload: wire(sealHybrid(utf8(plaintext), pick(...names), d.mapKeyOf, d.key_field)),
      });
    });
  });

  // 32-byte strings that decode as base64 fine but are not usable Ed25519
  // public keys. ed2curve rejects only the first kind (it returns null);
  // libsodium, and so ensync, rejects all of them.
  const invalidAppIds = [];
  for (let i = 0; invalidAppIds.length < 2; i += 1) {
    const candidate = nacl.hash(utf8(`ensync-crypto-vectors/not-a-point/${i}`)).subarray(0, 32);
    if (ed2curve.convertPublicKey(candidate) === null) {
      invalidAppIds.push({
        why: 'not the encoding of a curve point',
        app_id: b64(candidate),
        ed2curve_convert_public_key: null,
      });
    }
  }
  const smallOrder = [
    ['identity point (y = 1)', '01' + '00'.repeat(31)],
    ['point of order 2 (y = -1)', 'ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f'],
    ['point of order 4 (y = 0)', '00'.repeat(32)],
  ];
  for (const [why, encodingHex] of smallOrder) {
    const converted = ed2curve.convertPublicKey(Uint8Array.from(Buffer.from(encodingHex, 'hex')));
    invalidAppIds.push({
      why: `small-order ${why}`,
      app_id: b64(Buffer.from(encodingHex, 'hex')),
      ed2curve_convert_public_key: converted === null ? null : b64(converted),
    });
  }

  const out = {
    note:
      'Generated by tests/node/make_vectors.js with tweetnacl, tweetnacl-util and ed2curve; ' +
      'do not edit by hand. Regenerate from the repository root with: ' +
      '(cd tests/node && npm ci) && node tests/node/make_vectors.js > tests/vectors/crypto.json',
    generator: {
      script: 'tests/node/make_vectors.js',
      packages: Object.fromEntries(
        ['tweetnacl', 'tweetnacl-util', 'ed2curve'].map((n) => [n, packageVersion(n)]),
      ),
      randomness: 'deterministic SHA-512 counter stream (test data only)',
    },
    encoding: {
      seed_hex: 'hex',
      keys: 'standard base64 with padding',
      plaintext: 'text; the sealed bytes are its UTF-8 encoding',
      wire_payload: 'base64 of the UTF-8 envelope JSON (PROTOCOL.md 4.2, 4.3)',
    },
    keypairs: keypairs.map(({_kp, ...rest}) => rest),
    single,
    hybrid,
    invalid_app_ids: invalidAppIds,
  };
  process.stdout.write(JSON.stringify(out, null, 2) + '\n');
}

main();
