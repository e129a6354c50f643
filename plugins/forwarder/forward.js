// The forwarder's logic, free of WIT imports so that `node --test` runs it
// with a fake `send`; `app.js` wires it to the host.
//
// Delivery is at least once: a redelivered event is posted again, with the
// same `id`, so receivers that care deduplicate on it (unbatched posts also
// carry it as `Idempotency-Key`, with the same body each time: `attempt` is
// not among the default fields, as a receiver that honours the key refuses
// it with another body).

export const NAME = 'forwarder';
export const VERSION = '0.2.0';

export const FIELDS = [
  'id',
  'cluster',
  'event_type',
  'entity_kind',
  'entity_uuid',
  'attempt',
  'received_at_ms',
  'vm',
  'body',
];
const DEFAULT_FIELDS = FIELDS.filter((f) => f !== 'body' && f !== 'attempt');
const KNOWN_KEYS = ['url', 'events', 'fields', 'batch', 'timeout_ms'];
// Well under the host's default call deadline (5 s): a request that times
// out then leaves the call time to answer `retry`, rather than the call
// being stopped at its deadline with no outcome at all.
const DEFAULT_TIMEOUT_MS = 3000;

export class ConfigError extends Error {}

function fail(message) {
  throw new ConfigError(message);
}

/** Parses and checks the operator's JSON settings, applying defaults. */
export function parseConfig(text) {
  let raw;
  try {
    raw = text && text.trim() ? JSON.parse(text) : {};
  } catch (e) {
    fail(`the configuration is not JSON: ${e.message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    fail('the configuration must be a JSON object');
  }
  const unknown = Object.keys(raw).filter((k) => !KNOWN_KEYS.includes(k)).sort();
  if (unknown.length) {
    fail(`unknown key(s) ${unknown.map((k) => `'${k}'`).join(', ')}; known keys are ${KNOWN_KEYS.join(', ')}`);
  }

  if (typeof raw.url !== 'string' || !raw.url.trim()) {
    fail('`url` (where to POST the events, such as https://siem.example.com/ingest) is required');
  }
  const url = raw.url.trim();
  if (!/^https?:\/\/[^/?#\s]+/i.test(url) || /\s/.test(url)) {
    fail(`\`url\` ${JSON.stringify(raw.url)} must be an absolute http:// or https:// URL`);
  }

  const events = raw.events ?? ['*'];
  if (!Array.isArray(events) || !events.length || !events.every((e) => typeof e === 'string' && e.trim())) {
    fail('`events` must be a non-empty list of event types or patterns such as "VM.ON", "VM.*" or "*"');
  }
  for (const e of events) {
    if (e.indexOf('*') !== -1 && e.indexOf('*') !== e.length - 1) {
      fail(`\`events\` entry ${JSON.stringify(e)}: \`*\` may only end a pattern`);
    }
  }

  const fields = raw.fields ?? DEFAULT_FIELDS;
  if (!Array.isArray(fields) || !fields.length || !fields.every((f) => typeof f === 'string')) {
    fail(`\`fields\` must be a non-empty list of field names from: ${FIELDS.join(', ')}`);
  }
  const bad = fields.filter((f) => !FIELDS.includes(f));
  if (bad.length) {
    fail(`\`fields\`: unknown field(s) ${bad.map((f) => `'${f}'`).join(', ')}; known fields are ${FIELDS.join(', ')}`);
  }

  const batch = raw.batch ?? true;
  if (typeof batch !== 'boolean') {
    fail('`batch` must be true (one POST per batch, a JSON array) or false (one POST per event)');
  }

  const timeoutMs = raw.timeout_ms ?? DEFAULT_TIMEOUT_MS;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > 600000) {
    fail(`\`timeout_ms\` must be an integer from 1 to 600000, not ${JSON.stringify(timeoutMs)}`);
  }

  // Where reasons and logs say the events went: the URL's origin, as its
  // path may be the secret (a chat service's webhook URL).
  const origin = url.match(/^https?:\/\/[^/?#]+/i)[0];
  return { url, origin, events: [...events], fields: [...new Set(fields)], batch, timeoutMs };
}

/** Whether a subscription (`VM.ON`, `VM.*`, `*`) covers an event type; the
 * host's own rule: a trailing `*` is a prefix match, case-insensitive. */
export function matches(pattern, eventType) {
  if (pattern.endsWith('*')) {
    const prefix = pattern.slice(0, -1).toUpperCase();
    return eventType.toUpperCase().startsWith(prefix);
  }
  return pattern.toUpperCase() === eventType.toUpperCase();
}

export function selected(config, eventType) {
  return config.events.some((p) => matches(p, eventType));
}

const opt = (v) => (v === undefined ? null : v);

function vmJson(vm) {
  if (vm === undefined || vm === null) return null;
  return {
    uuid: vm.uuid,
    name: opt(vm.name),
    power_state: opt(vm.powerState),
    categories: (vm.categories || []).map((c) => ({ key: c.key, value: c.value })),
    nics: (vm.nics || []).map((n) => ({
      uuid: opt(n.uuid),
      mac_address: opt(n.macAddress),
      ips: [...(n.ips || [])],
      subnet_name: opt(n.subnetName),
      subnet_uuid: opt(n.subnetUuid),
    })),
    host_name: opt(vm.hostName),
    entity_version: opt(vm.entityVersion),
  };
}

function bodyJson(body) {
  try {
    return JSON.parse(body);
  } catch {
    return body; // not JSON: forward the text as it came
  }
}

const GETTERS = {
  id: (e) => e.id,
  cluster: (e) => e.cluster,
  event_type: (e) => e.eventType,
  entity_kind: (e) => e.entityKind,
  entity_uuid: (e) => e.entityUuid,
  attempt: (e) => e.attempt,
  // u64 arrives as a BigInt; milliseconds since 1970 fit a double exactly.
  received_at_ms: (e) => Number(e.receivedAtMs),
  vm: (e) => vmJson(e.vm),
  body: (e) => bodyJson(e.body),
};

/** The JSON object posted for one event: the configured fields only. */
export function project(config, event) {
  const out = {};
  for (const f of config.fields) out[f] = GETTERS[f](event);
  return out;
}

function header(headers, name) {
  for (const [k, v] of headers || []) {
    if (k.toLowerCase() === name) return v;
  }
  return undefined;
}

/**
 * The longest delay a Retry-After may ask for: a day. The host's retries
 * end at their `max_age` anyway, and a delay past 2^64 ms could not even be
 * handed to the host.
 */
export const MAX_RETRY_AFTER_MS = 86_400_000;

/** Retry-After in milliseconds (delta-seconds or an HTTP date), if usable. */
export function retryAfterMs(headers, now = Date.now()) {
  const value = header(headers, 'retry-after');
  if (value === undefined) return undefined;
  const text = value.trim();
  let ms;
  if (/^\d+(\.\d+)?$/.test(text)) {
    ms = Math.round(Number(text) * 1000);
  } else {
    const date = Date.parse(text);
    if (Number.isNaN(date)) return undefined;
    ms = date - now;
  }
  return Math.min(Math.max(0, ms), MAX_RETRY_AFTER_MS);
}

function snippet(body) {
  // An error page may be megabytes: only its start is quoted, or decoded.
  const start = (body || new Uint8Array()).subarray(0, 1024);
  const text = new TextDecoder().decode(start).trim();
  return (text.split('\n')[0] || 'no body').slice(0, 200);
}

export const done = () => ({ tag: 'done' });
export const retry = (reason, delayMs) => ({ tag: 'retry', reason, delayMs });
export const reject = (reason) => ({ tag: 'reject', reason });

/** What an HTTP answer, or the host's error (`{tag, val}`), means. */
export function outcomeOf(answer, what) {
  if (answer.error) {
    const { tag, val } = answer.error;
    switch (tag) {
      case 'denied':
        return reject(`${what}: the host's policy does not allow it: ${val}`);
      case 'invalid-request':
        return reject(`${what}: the host refused the request as malformed: ${val}`);
      case 'timeout':
        return retry(`${what}: no answer in time`);
      case 'connection-failed':
        return retry(`${what}: could not connect: ${val}`);
      case 'too-large':
        // The host read no status: the endpoint may have refused the
        // events (an error page) as well as taken them.
        return retry(
          `${what}: the answer was larger than the host reads (${val} bytes, the plugin's ` +
            '`limits.max_response_bytes`), so whether the endpoint took the events is unknown',
        );
      case 'limit-exceeded':
        // The endpoint is fine; the rest goes in the next call, at once.
        return retry(`${what}: too many requests in one call: ${val}`, 0);
      default:
        return retry(`${what}: ${val ?? tag}`);
    }
  }
  const { status, headers, body } = answer.response;
  if (status >= 200 && status < 300) return done();
  const message = `${what}: HTTP ${status} ${snippet(body)}`;
  // 401 and 403: a credential the operator rotated or that expired; the
  // events wait (with backoff, towards the dead letters) for the fix. 409:
  // a receiver still working on an earlier post under the same
  // Idempotency-Key.
  if (status >= 500 || [401, 403, 408, 409, 429].includes(status)) {
    return retry(message, retryAfterMs(headers));
  }
  return reject(message);
}

const encoder = new TextEncoder();

function post(config, send, payload, extraHeaders = []) {
  return send({
    method: 'POST',
    url: config.url,
    headers: [['Content-Type', 'application/json'], ...extraHeaders],
    body: encoder.encode(JSON.stringify(payload)),
    timeoutMs: config.timeoutMs,
  });
}

/**
 * Answers that can be one event's doing (too large, malformed): a batch
 * refused with one is sent again in halves, so that only the events the
 * endpoint refuses on their own are rejected. Others (404, 405, …) are the
 * endpoint's, and a split would refuse every half the same way.
 */
const SPLIT_ON = [400, 413, 422];

/**
 * Requests one batch may make finding what an endpoint refuses: a few bad
 * events among 256 take about 2·log2(256) = 16 each; an endpoint that
 * refuses every event is not asked 511 times.
 */
export const SPLIT_REQUESTS = 32;

/**
 * Forwards a batch; returns one outcome per event, in order.
 *
 * `send(request)` returns `{response}` or `{error}`; `log(level, message)`.
 * Events the filter does not select are done without a request. A failure
 * that calls for a retry stops the rest of the batch with the same retry:
 * the endpoint is down or busy, and forwarding later events first would
 * reorder them.
 */
export function handle(config, events, send, log) {
  const outcomes = events.map(() => done());
  const chosen = [];
  events.forEach((event, i) => {
    if (selected(config, event.eventType)) chosen.push(i);
  });
  if (!chosen.length) return outcomes;

  if (config.batch) {
    // The first post is one of them; each split books its two halves' posts.
    const budget = { left: SPLIT_REQUESTS - 1 };
    forwardGroup(config, events, chosen, { send, log, outcomes, budget });
    return outcomes;
  }

  let stop;
  for (const i of chosen) {
    if (stop) {
      outcomes[i] = stop;
      continue;
    }
    const event = events[i];
    const what = `forwarding ${event.eventType} ${event.id} to ${config.origin}`;
    const outcome = outcomeOf(post(config, send, project(config, event), [['Idempotency-Key', event.id]]), what);
    report(log, outcome);
    outcomes[i] = outcome;
    if (outcome.tag === 'retry') stop = outcome;
  }
  return outcomes;
}

/**
 * Posts the events at `group` (indices into `events`) as one array and sets
 * their outcomes; a refusal that may be some events' doing sends it again
 * in halves, the first before the second. Returns the retry that stops what
 * follows, if one came.
 */
function forwardGroup(config, events, group, ctx) {
  const what = `forwarding ${group.length} event(s) to ${config.origin}`;
  const answer = post(config, ctx.send, group.map((i) => project(config, events[i])));
  const outcome = outcomeOf(answer, what);
  const status = answer.response?.status;
  const split = outcome.tag === 'reject' && group.length > 1 && SPLIT_ON.includes(status);
  if (split && ctx.budget.left >= 2) {
    ctx.budget.left -= 2;
    ctx.log('info', `${outcome.reason}: sending the ${group.length} events again in halves`);
    const half = Math.ceil(group.length / 2);
    const stop = forwardGroup(config, events, group.slice(0, half), ctx);
    if (!stop) return forwardGroup(config, events, group.slice(half), ctx);
    for (const i of group.slice(half)) ctx.outcomes[i] = stop;
    return stop;
  }
  // Out of requests for finding the refused events: the group's good ones
  // (a call cannot tell them from an endpoint that refuses everything, as it
  // splits from the front) deserve the next call's requests, not the dead
  // letters. The events found refused alone stay rejected, so each call
  // settles some; an endpoint that refuses everything ends them in the dead
  // letters through the plugin's `max_attempts`.
  const remainder = split
    ? retry(`${outcome.reason}; the requests this call may spend finding the refused events are used up: the ${group.length} events are sent again in the next call`, 0)
    : outcome;
  report(ctx.log, remainder);
  for (const i of group) ctx.outcomes[i] = remainder;
  return remainder.tag === 'retry' ? remainder : undefined;
}

function report(log, outcome) {
  if (outcome.tag === 'retry') log('warn', outcome.reason);
  else if (outcome.tag === 'reject') log('error', outcome.reason);
}
