// `{{name}}`: a prismhook plugin, built with componentize-js.
//
// The host makes every call on a fresh instance: `init` with the operator's
// configuration, then exactly one `handle` or `paged.reconcile`. Module
// variables do not survive between calls; what must be remembered goes into
// `kv`, whose writes become durable together when the call returns.
//
// Errors of `result` exports are thrown as strings: componentize-js turns a
// thrown string into `err`, and a thrown `Error` into a trap.

import { nextPage } from 'prismhook:plugin/inventory@0.1.4';
import { set as kvSet } from 'prismhook:plugin/kv@0.1.4';
import { log } from 'prismhook:plugin/log@0.1.4';

const NAME = '{{name}}';
const VERSION = '0.1.0';

export const handler = {
  // `config` is the operator's settings as a JSON object (`{}` when there
  // are none). Throwing a string keeps the plugin from loading.
  init(config) {
    let settings;
    try {
      settings = JSON.parse(config);
    } catch (e) {
      throw `${NAME}: the configuration is not JSON: ${e.message}`;
    }
    if (settings === null || typeof settings !== 'object' || Array.isArray(settings)) {
      throw `${NAME}: the configuration must be a JSON object`;
    }
    return { name: NAME, version: VERSION, subscriptions: ['VM.*'] };
  },

  // One outcome per event, in order. Delivery is at least once: the same
  // event (same `id`) may come again, so side effects must be idempotent.
  // A thrown exception traps: the whole batch is retried.
  handle(events) {
    return events.map((event) => {
      log('info', `${event.cluster} ${event.eventType} ${event.entityUuid} (event ${event.id}, attempt ${event.attempt})`);
      // Something to see from outside: the id of the last event handled.
      try {
        kvSet('last-event', new TextEncoder().encode(event.id));
      } catch (e) {
        return { tag: 'retry', val: { reason: `kv: ${e && e.payload !== undefined ? e.payload : e}`, delayMs: undefined } };
      }
      return { tag: 'done' };
    });
  },

  // The whole VM inventory in one list, for hosts before 0.1.2. The world
  // requires it, but no host that can load this plugin calls it: it imports
  // `inventory` (0.1.2), and such hosts call `paged.reconcile`.
  reconcile(cluster, vms) {
    return `${vms.length} VMs in ${cluster}: nothing to reconcile`;
  },
};

export const paged = {
  // The VM inventory of a cluster, at start and on a timer, a page at a
  // time (so that neither this plugin's memory nor the host's grows with
  // it): bring outside state back in step with it here.
  reconcile(cluster) {
    let vms = 0;
    for (let page = nextPage(); page !== undefined; page = nextPage()) {
      vms += page.length;
    }
    return `${vms} VMs in ${cluster}, read a page at a time: nothing to reconcile`;
  },
};
