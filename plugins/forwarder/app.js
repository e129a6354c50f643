// WIT glue for the forwarder plugin, built with componentize-js.
//
// Every call runs in a fresh instance and `init` runs first in each, so the
// configuration lives in a module variable. Errors of `result` exports are
// thrown as strings: componentize-js turns a thrown string into `err`, but
// a thrown `Error` into a trap.

import { send as hostSend } from 'prismhook:plugin/http@0.1.4';
import { log as hostLog } from 'prismhook:plugin/log@0.1.4';
import * as forward from './forward.js';

let config;

const LEVELS = new Set(['trace', 'debug', 'info', 'warn', 'error']);

function log(level, message) {
  hostLog(LEVELS.has(level) ? level : 'info', message);
}

function send(request) {
  try {
    return { response: hostSend(request) };
  } catch (e) {
    // An `err` of the import arrives as an exception carrying the variant.
    if (e && e.payload && typeof e.payload.tag === 'string') return { error: e.payload };
    return { error: { tag: 'other', val: String(e && e.message ? e.message : e) } };
  }
}

function toWit(outcome) {
  switch (outcome.tag) {
    case 'done':
      return { tag: 'done' };
    case 'retry':
      return {
        tag: 'retry',
        val: {
          reason: outcome.reason,
          delayMs: outcome.delayMs === undefined ? undefined : BigInt(outcome.delayMs),
        },
      };
    default:
      return { tag: 'reject', val: outcome.reason };
  }
}

export const handler = {
  init(text) {
    try {
      config = forward.parseConfig(text);
    } catch (e) {
      throw `invalid forwarder configuration: ${e.message}`;
    }
    return { name: forward.NAME, version: forward.VERSION, subscriptions: config.events };
  },

  handle(events) {
    if (!config) throw new Error('forwarder: init must run before handle');
    let outcomes;
    try {
      outcomes = forward.handle(config, events, send, log);
    } catch (e) {
      // A bug: say so and let the host back off rather than lose events.
      log('error', `forwarder failed in handle: ${e && e.stack ? e.stack : e}`);
      outcomes = events.map(() => forward.retry(`forwarder internal error: ${e}`));
    }
    return outcomes.map(toWit);
  },

  reconcile(cluster, vms) {
    // A forwarder mirrors no outside state: there is nothing to bring in step.
    return `nothing to reconcile (${vms.length} VMs in ${cluster})`;
  },
};

// The paged reconcile (WIT 0.1.2), which the host calls instead: it reads
// no page, so the host lists the inventory for the plugins that need it
// without holding the list for this one.
export const paged = {
  reconcile(cluster) {
    return `nothing to reconcile (${cluster})`;
  },
};
