// The forwarder's logic with a fake `send`: `node --test test/`.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import * as forward from '../forward.js';

const URL = 'https://siem.test/ingest';

function config(extra = {}) {
  return forward.parseConfig(JSON.stringify({ url: URL, ...extra }));
}

let nextId = 1;
function event(eventType = 'VM.ON', extra = {}) {
  return {
    id: `e${nextId++}`,
    cluster: 'c1',
    eventType,
    entityKind: 'vm',
    entityUuid: 'vm-1',
    attempt: 1,
    receivedAtMs: 1700000000123n,
    body: '{"data":{"metadata":{}}}',
    vm: {
      uuid: 'vm-1',
      name: 'web-01',
      powerState: 'ON',
      categories: [{ key: 'AppTier', value: 'Web' }],
      nics: [{ uuid: undefined, macAddress: '50:6b:8d:00:00:01', ips: ['10.0.0.1'], subnetName: 'vlan0', subnetUuid: undefined }],
      hostName: undefined,
      entityVersion: '3',
    },
    ...extra,
  };
}

/** A fake endpoint: answers from `replies` in turn (default 200), records posts. */
function endpoint(...replies) {
  const posts = [];
  const logs = [];
  const send = (request) => {
    posts.push({ ...request, json: JSON.parse(new TextDecoder().decode(request.body)) });
    const reply = replies.length ? replies.shift() : 200;
    if (typeof reply === 'object') return reply;
    return { response: { status: reply, headers: [], body: new TextEncoder().encode(`status ${reply}`) } };
  };
  const log = (level, message) => logs.push([level, message]);
  return { send, log, posts, logs };
}

describe('configuration', () => {
  it('needs only a url and applies the defaults', () => {
    const c = config();
    assert.equal(c.url, URL);
    assert.deepEqual(c.events, ['*']);
    assert.equal(c.batch, true);
    // Not `attempt`: a redelivery posts the same body under its Idempotency-Key.
    assert.deepEqual(c.fields, forward.FIELDS.filter((f) => f !== 'body' && f !== 'attempt'));
    // A timeout answered within the host's default 5 s deadline.
    assert.equal(c.timeoutMs, 3000);
  });

  it('rejects unknown keys by name', () => {
    assert.throws(() => config({ evnts: ['VM.ON'] }), /unknown key\(s\) 'evnts'/);
  });

  it('rejects a missing or relative url', () => {
    assert.throws(() => forward.parseConfig('{}'), /`url`.*required/);
    assert.throws(() => config({ url: 'siem.test/ingest' }), /absolute http/);
  });

  it('rejects unknown fields, a non-boolean batch and bad patterns', () => {
    assert.throws(() => config({ fields: ['id', 'nope'] }), /unknown field\(s\) 'nope'/);
    assert.throws(() => config({ batch: 'yes' }), /`batch`/);
    assert.throws(() => config({ events: [] }), /`events`/);
    assert.throws(() => config({ events: ['VM.*.X'] }), /may only end/);
  });

  it('rejects what is not a JSON object', () => {
    assert.throws(() => forward.parseConfig('[1]'), /JSON object/);
    assert.throws(() => forward.parseConfig('{'), /not JSON/);
  });
});

describe('filtering and fields', () => {
  it('matches exact types, kind patterns and everything, ignoring case', () => {
    assert.ok(forward.matches('*', 'VM.ON'));
    assert.ok(forward.matches('VM.*', 'VM.OFF'));
    assert.ok(forward.matches('vm.on', 'VM.ON'));
    assert.ok(!forward.matches('VM.*', 'SUBNET.CREATE'));
    assert.ok(!forward.matches('VM.ON', 'VM.ONX'));
  });

  it('projects the configured fields with snake_case names', () => {
    const all = forward.project(config({ fields: forward.FIELDS }), event('VM.ON', { id: 'x' }));
    assert.deepEqual(Object.keys(all), forward.FIELDS);
    assert.equal(all.id, 'x');
    assert.equal(all.event_type, 'VM.ON');
    assert.equal(all.received_at_ms, 1700000000123);
    assert.deepEqual(all.body, { data: { metadata: {} } });
    assert.deepEqual(all.vm.nics[0], {
      uuid: null,
      mac_address: '50:6b:8d:00:00:01',
      ips: ['10.0.0.1'],
      subnet_name: 'vlan0',
      subnet_uuid: null,
    });
    assert.equal(all.vm.power_state, 'ON');
    assert.deepEqual(forward.project(config({ fields: ['cluster', 'event_type'] }), event()), {
      cluster: 'c1',
      event_type: 'VM.ON',
    });
  });

  it('forwards a body that is not JSON as text and an absent vm as null', () => {
    const got = forward.project(config({ fields: ['vm', 'body'] }), event('VM.DELETE', { vm: undefined, body: 'oops' }));
    assert.deepEqual(got, { vm: null, body: 'oops' });
  });

  it('leaves the body out by default', () => {
    assert.ok(!('body' in forward.project(config(), event())));
  });
});

describe('handle', () => {
  it('posts one JSON array per batch and marks every event done on 2xx', () => {
    const ep = endpoint(202);
    const out = forward.handle(config(), [event(), event('VM.OFF')], ep.send, ep.log);
    assert.deepEqual(out, [forward.done(), forward.done()]);
    assert.equal(ep.posts.length, 1);
    assert.equal(ep.posts[0].method, 'POST');
    assert.equal(ep.posts[0].url, URL);
    assert.deepEqual(ep.posts[0].headers, [['Content-Type', 'application/json']]);
    assert.deepEqual(ep.posts[0].json.map((e) => e.event_type), ['VM.ON', 'VM.OFF']);
  });

  it('posts each event on its own when batch is false, with its id as idempotency key', () => {
    const ep = endpoint();
    const events = [event(), event('VM.OFF')];
    const out = forward.handle(config({ batch: false }), events, ep.send, ep.log);
    assert.deepEqual(out, [forward.done(), forward.done()]);
    assert.equal(ep.posts.length, 2);
    assert.equal(ep.posts[1].json.event_type, 'VM.OFF');
    assert.deepEqual(ep.posts[1].headers[1], ['Idempotency-Key', events[1].id]);
  });

  it('skips events the filter does not select, without a request when none is left', () => {
    const ep = endpoint();
    const c = config({ events: ['VM.ON'] });
    assert.deepEqual(forward.handle(c, [event('VM.OFF')], ep.send, ep.log), [forward.done()]);
    assert.equal(ep.posts.length, 0);
    forward.handle(c, [event('VM.OFF'), event('VM.ON')], ep.send, ep.log);
    assert.deepEqual(ep.posts[0].json.map((e) => e.event_type), ['VM.ON']);
  });

  it('retries on 5xx and 429 with the delay Retry-After asks for', () => {
    const busy = { response: { status: 429, headers: [['retry-after', '3']], body: new Uint8Array() } };
    const ep = endpoint(503, busy);
    const [first] = forward.handle(config(), [event()], ep.send, ep.log);
    const [second] = forward.handle(config(), [event()], ep.send, ep.log);
    assert.equal(first.tag, 'retry');
    assert.match(first.reason, /HTTP 503 status 503/);
    assert.equal(first.delayMs, undefined);
    assert.equal(second.tag, 'retry');
    assert.equal(second.delayMs, 3000);
    assert.equal(ep.logs[0][0], 'warn');
  });

  it('reads an HTTP-date Retry-After relative to now', () => {
    const now = Date.parse('2024-01-01T00:00:00Z');
    assert.equal(forward.retryAfterMs([['Retry-After', 'Mon, 01 Jan 2024 00:00:10 GMT']], now), 10000);
    assert.equal(forward.retryAfterMs([['Retry-After', 'soon']], now), undefined);
  });

  it('retries a 409, a receiver still at an earlier post under the same Idempotency-Key', () => {
    const ep = endpoint(409);
    const [out] = forward.handle(config({ batch: false }), [event()], ep.send, ep.log);
    assert.equal(out.tag, 'retry');
  });

  it("names the endpoint's origin in reasons and logs, never the URL's path, which may be a secret", () => {
    const secretUrl = 'https://hooks.chat.test/services/T0/B0/SECRET-TOKEN?x=1';
    for (const batch of [true, false]) {
      const ep = endpoint(500);
      const c = forward.parseConfig(JSON.stringify({ url: secretUrl, batch }));
      const [out] = forward.handle(c, [event()], ep.send, ep.log);
      assert.equal(ep.posts[0].url, secretUrl, 'posted to the whole URL');
      assert.match(out.reason, /to https:\/\/hooks\.chat\.test:/);
      assert.ok(!JSON.stringify([out, ep.logs]).includes('SECRET'), JSON.stringify([out, ep.logs]));
    }
  });

  it('quotes only the start of a large error page', () => {
    const page = new TextEncoder().encode('oops '.repeat(400_000));
    const ep = endpoint({ response: { status: 500, headers: [], body: page } });
    const [out] = forward.handle(config(), [event()], ep.send, ep.log);
    assert.ok(out.reason.length < 400, `${out.reason.length} characters`);
  });

  it('retries a refused credential (401, 403) instead of dead-lettering', () => {
    for (const status of [401, 403]) {
      const ep = endpoint(status);
      const [out] = forward.handle(config(), [event()], ep.send, ep.log);
      assert.equal(out.tag, 'retry', `${status}`);
      assert.match(out.reason, new RegExp(`HTTP ${status}`));
    }
  });

  it('rejects on other 4xx with the answer in the reason', () => {
    const ep = endpoint(400);
    const [out] = forward.handle(config(), [event()], ep.send, ep.log);
    assert.equal(out.tag, 'reject');
    assert.match(out.reason, /HTTP 400 status 400/);
  });

  it('retries connection failures and timeouts, rejects policy denials', () => {
    const ep = endpoint(
      { error: { tag: 'connection-failed', val: 'refused' } },
      { error: { tag: 'timeout' } },
      { error: { tag: 'denied', val: 'not allowed' } },
    );
    const tags = [1, 2, 3].map(() => forward.handle(config(), [event()], ep.send, ep.log)[0].tag);
    assert.deepEqual(tags, ['retry', 'retry', 'reject']);
  });

  it('unbatched, stops at the first retry and gives the rest the same retry', () => {
    const ep = endpoint(200, 503, 200);
    const out = forward.handle(config({ batch: false }), [event(), event(), event()], ep.send, ep.log);
    assert.deepEqual(out.map((o) => o.tag), ['done', 'retry', 'retry']);
    assert.equal(ep.posts.length, 2);
  });

  it("unbatched, the host's request limit retries the rest at once", () => {
    const ep = endpoint(200, { error: { tag: 'limit-exceeded', val: '16 requests per call' } });
    const out = forward.handle(config({ batch: false }), [event(), event(), event()], ep.send, ep.log);
    assert.deepEqual(out.map((o) => [o.tag, o.delayMs]), [['done', undefined], ['retry', 0], ['retry', 0]]);
  });

  it('unbatched, a rejected event does not hold back the next', () => {
    const ep = endpoint(422, 200);
    const out = forward.handle(config({ batch: false }), [event(), event()], ep.send, ep.log);
    assert.deepEqual(out.map((o) => o.tag), ['reject', 'done']);
  });
});

/** An endpoint that refuses, with `status`, any array holding an event `bad` says is bad. */
function picky(bad, status = 413, then = []) {
  const posts = [];
  const logs = [];
  const send = (request) => {
    const json = JSON.parse(new TextDecoder().decode(request.body));
    posts.push(json.map((e) => e.id));
    const reply = then.length ? then.shift() : json.some(bad) ? status : 200;
    return { response: { status: reply, headers: [], body: new TextEncoder().encode(`status ${reply}`) } };
  };
  return { send, log: (level, message) => logs.push([level, message]), posts, logs };
}

describe('a batch refused for some of its events', () => {
  const batchOf = (n) => Array.from({ length: n }, () => event());

  it('is sent again in halves until only the refused event is rejected', () => {
    const events = batchOf(8);
    const tooBig = events[5].id;
    const ep = picky((e) => e.id === tooBig);
    const out = forward.handle(config(), events, ep.send, ep.log);
    assert.deepEqual(
      out.map((o) => o.tag),
      ['done', 'done', 'done', 'done', 'done', 'reject', 'done', 'done'],
    );
    assert.match(out[5].reason, /forwarding 1 event\(s\).*HTTP 413/);
    // 8, its halves, the refused half's halves, the refused quarter's
    // halves before the last quarter: every event posted in order.
    assert.deepEqual(ep.posts.map((p) => p.length), [8, 4, 4, 2, 1, 1, 2]);
    assert.deepEqual(ep.posts.slice(1).filter((p) => p.length < 8 && !p.includes(tooBig)).flat(),
      [events[0], events[1], events[2], events[3], events[4], events[6], events[7]].map((e) => e.id));
    assert.ok(ep.logs.some(([level, m]) => level === 'info' && /in halves/.test(m)), ep.logs);
  });

  it('with 400 and 422 too, and several refused events each found', () => {
    for (const status of [400, 422]) {
      const events = batchOf(6);
      const bad = new Set([events[0].id, events[4].id]);
      const ep = picky((e) => bad.has(e.id), status);
      const out = forward.handle(config(), events, ep.send, ep.log);
      assert.deepEqual(out.map((o) => o.tag), ['reject', 'done', 'done', 'done', 'reject', 'done']);
    }
  });

  it('is not split for an answer about the endpoint, such as 404', () => {
    const ep = picky(() => true, 404);
    const out = forward.handle(config(), batchOf(8), ep.send, ep.log);
    assert.ok(out.every((o) => o.tag === 'reject'));
    assert.equal(ep.posts.length, 1);
  });

  it('takes at most SPLIT_REQUESTS requests a call when the endpoint refuses everything, and each call settles some', () => {
    const ep = picky(() => true, 400);
    let left = batchOf(256);
    for (let call = 0; left.length; call++) {
      assert.ok(call < 100, `${left.length} events still unsettled`);
      const before = ep.posts.length;
      const out = forward.handle(config(), left, ep.send, ep.log);
      // The first post, then halves two at a time.
      const n = ep.posts.length - before;
      assert.ok(n <= forward.SPLIT_REQUESTS, `${n} requests`);
      assert.ok(out.every((o) => o.tag === 'reject' || (o.tag === 'retry' && o.delayMs === 0)));
      const next = left.filter((_, i) => out[i].tag === 'retry');
      assert.ok(next.length < left.length, 'each call rejects some events found refused alone');
      left = next;
    }
  });

  it('does not dead-letter the good events behind refused ones it ran out of requests to find', () => {
    const events = batchOf(256);
    const bad = new Set(events.slice(0, 17).map((e) => e.id));
    const ep = picky((e) => bad.has(e.id), 400);
    const out = forward.handle(config(), events, ep.send, ep.log);
    const rejected = events.filter((_, i) => out[i].tag === 'reject').map((e) => e.id);
    assert.ok(rejected.length > 0 && rejected.every((id) => bad.has(id)), `rejected: ${rejected}`);
  });

  it('sends the events it had no requests left to split again in the next call, when the endpoint took some', () => {
    const events = batchOf(256);
    const bad = new Set([events[0].id, events[100].id, events[200].id]);
    const ep = picky((e) => bad.has(e.id), 400);
    const out = forward.handle(config(), events, ep.send, ep.log);
    assert.ok(ep.posts.length <= forward.SPLIT_REQUESTS, `${ep.posts.length} requests`);
    const rejected = events.filter((_, i) => out[i].tag === 'reject').map((e) => e.id);
    assert.ok(rejected.every((id) => bad.has(id)), 'no good event is dead-lettered');
    const again = events.filter((_, i) => out[i].tag === 'retry');
    assert.ok(again.length > 0 && out.every((o) => o.tag !== 'retry' || o.delayMs === 0));
    assert.match(out[255].reason, /sent again in the next call/);

    // The next calls find the rest with requests of their own.
    let left = again;
    for (let call = 0; call < 10 && left.length; call++) {
      const next = forward.handle(config(), left, ep.send, ep.log);
      rejected.push(...left.filter((_, i) => next[i].tag === 'reject').map((e) => e.id));
      left = left.filter((_, i) => next[i].tag === 'retry');
    }
    assert.equal(left.length, 0, 'every event settled');
    assert.deepEqual(new Set(rejected), bad, 'only the refused events are rejected');
  });

  it('caps a Retry-After at a day, however large', () => {
    for (const value of ['99999999999999999999999999', 'Fri, 31 Dec 9999 23:59:59 GMT']) {
      assert.equal(forward.retryAfterMs([['Retry-After', value]]), forward.MAX_RETRY_AFTER_MS);
    }
  });

  it('retries when the answer was too large to read, as its status is unknown', () => {
    const ep = endpoint({ error: { tag: 'too-large', val: 8388608 } });
    const [out] = forward.handle(config(), [event()], ep.send, ep.log);
    assert.equal(out.tag, 'retry');
    assert.match(out.reason, /max_response_bytes/);
  });

  it('stops at a retry in a half and gives the rest the same retry, in order', () => {
    const events = batchOf(4);
    // The whole batch: 413; its first half: 503.
    const ep = picky(() => true, 413, [413, 503]);
    const out = forward.handle(config(), events, ep.send, ep.log);
    assert.deepEqual(out.map((o) => o.tag), ['retry', 'retry', 'retry', 'retry']);
    assert.deepEqual(ep.posts.map((p) => p.length), [4, 2]);
  });
});
