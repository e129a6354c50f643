// The forwarder's logic natively, under Node, for BENCHMARKS.md's
// "Languages": batches of distinct VMs as the lifecycle bench hands the
// component (vm_on.json with category F5Pool=web: one NIC, one address;
// the bench's configuration), VM.ON and then VM.OFF, with a `send` that
// answers 200 at once. What it leaves out against the component's figures
// is the host's HTTP to the receiver (one request per batch).
//
//   node plugins/forwarder/bench/handle.mjs

import { readFileSync } from 'node:fs';

import * as forward from '../forward.js';

const body = readFileSync(new URL('../../../tests/fixtures/nutanix/vm_on.json', import.meta.url), 'utf8');
const config = forward.parseConfig(JSON.stringify({
  url: 'http://127.0.0.1:9/ingest',
  events: ['VM.*'],
  fields: ['id', 'event_type', 'entity_uuid', 'attempt', 'vm'],
}));
const ok = { response: { status: 200, headers: [], body: new Uint8Array() } };
const send = () => ok;
const log = () => {};

function batch(round, size, eventType) {
  return Array.from({ length: size }, (_, i) => {
    const uuid = `${String(round).padStart(8, '0')}-0000-4000-8000-${String(i).padStart(12, '0')}`;
    return {
      id: `${round}-${i}-${eventType}`,
      cluster: 'lab',
      eventType,
      entityKind: 'vm',
      entityUuid: uuid,
      attempt: 1,
      receivedAtMs: 0n,
      body,
      vm: {
        uuid,
        name: `vm-${i}`,
        powerState: eventType === 'VM.ON' ? 'ON' : 'OFF',
        categories: [{ key: 'F5Pool', value: 'web' }],
        nics: [{ uuid: undefined, macAddress: '50:6b:8d:00:00:01', ips: [`10.${round % 200}.${Math.floor(i / 250)}.${(i % 250) + 1}`], subnetName: 'vlan0', subnetUuid: undefined }],
        hostName: undefined,
        entityVersion: '3',
      },
    };
  });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

for (const size of [10, 256]) {
  const rounds = size === 10 ? 2000 : 200;
  const times = { 'VM.ON': [], 'VM.OFF': [] };
  for (let round = 0; round < rounds; round++) {
    for (const eventType of ['VM.ON', 'VM.OFF']) {
      const events = batch(round, size, eventType);
      const started = process.hrtime.bigint();
      const out = forward.handle(config, events, send, log);
      times[eventType].push(Number(process.hrtime.bigint() - started) / 1e3 / size);
      if (!out.every((o) => o.tag === 'done')) throw new Error(JSON.stringify(out[0]));
    }
  }
  const warm = rounds / 10;
  const us = (t) => median(t.slice(warm)).toFixed(2);
  console.log(`forward.handle natively (Node ${process.version}), batches of ${size}, ${rounds - warm} rounds after ${warm} warm-up, median per event: VM.ON ${us(times['VM.ON'])} µs, VM.OFF ${us(times['VM.OFF'])} µs`);
}
