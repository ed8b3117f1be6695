#!/usr/bin/env node
// Decrypts wire payloads the way the official Node clients do (tweetnacl +
// ed2curve, PROTOCOL.md section 4), so the Python tests can prove that what
// ensync.crypto seals is readable by them.
//
// stdin:  JSON list of {"wire_payload": str, "secret_key": str (base64, 64 bytes)}
// stdout: JSON list, one entry per input, in order:
//         {"ok": true, "plaintext_b64": str} or {"ok": false, "error": str}
//
// Like the Node clients it reads single envelopes and hybrid envelopes in the
// `encryptedKey` dialect only, and tries every entry of a hybrid key map.
'use strict';

const nacl = require('tweetnacl');
const naclUtil = require('tweetnacl-util');
const ed2curve = require('ed2curve');

function openBox(sealed, boxField, x25519Secret) {
  const opened = nacl.box.open(
    naclUtil.decodeBase64(sealed[boxField]),
    naclUtil.decodeBase64(sealed.nonce),
    naclUtil.decodeBase64(sealed.ephemeralPublicKey),
    x25519Secret,
  );
  return opened; // null when the key is wrong or the data was changed
}

function decrypt(wirePayload, secretKey) {
  const envelope = JSON.parse(naclUtil.encodeUTF8(naclUtil.decodeBase64(wirePayload)));
  const secret = naclUtil.decodeBase64(secretKey);
  if (secret.length !== 64) throw new Error(`secret key has ${secret.length} bytes, not 64`);
  const x25519Secret = ed2curve.convertSecretKey(secret);

  if (envelope.type === 'hybrid') {
    for (const entry of Object.values(envelope.keys)) {
      if (typeof entry.encryptedKey !== 'string') continue;
      const messageKey = openBox(entry, 'encryptedKey', x25519Secret);
      if (messageKey === null) continue;
      const plaintext = nacl.secretbox.open(
        naclUtil.decodeBase64(envelope.payload.ciphertext),
        naclUtil.decodeBase64(envelope.payload.nonce),
        messageKey,
      );
      if (plaintext === null) throw new Error('payload does not open with the message key');
      return plaintext;
    }
    throw new Error('no key entry opens with this secret key');
  }
  const plaintext = openBox(envelope, 'ciphertext', x25519Secret);
  if (plaintext === null) throw new Error('box does not open with this secret key');
  return plaintext;
}

function main() {
  const chunks = [];
  process.stdin.on('data', (chunk) => chunks.push(chunk));
  process.stdin.on('end', () => {
    const requests = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    const results = requests.map(({wire_payload: wirePayload, secret_key: secretKey}) => {
      try {
        return {ok: true, plaintext_b64: naclUtil.encodeBase64(decrypt(wirePayload, secretKey))};
      } catch (err) {
        return {ok: false, error: String(err && err.message ? err.message : err)};
      }
    });
    process.stdout.write(JSON.stringify(results) + '\n');
  });
}

main();
