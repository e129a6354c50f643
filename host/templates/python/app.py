"""`{{name}}`: a prismhook plugin, built with componentize-py.

The host makes every call on a fresh instance: `init` with the operator's
configuration, then exactly one `handle` or `Paged.reconcile`. Module
globals do not survive between calls; what must be remembered goes into
`kv`, whose writes become durable together when the call returns.

componentize-py snapshots the interpreter after importing this module, and
the component has no files to import from later: import everything at the
top.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import inventory, kv, log, types

NAME = "{{name}}"
VERSION = "0.1.0"


class Handler(exports.Handler):
    def init(self, config: str) -> types.PluginInfo:
        """`config` is the operator's settings as a JSON object (`{}` when
        there are none). Raising `Err` keeps the plugin from loading."""
        try:
            settings = json.loads(config)
        except ValueError as e:
            raise Err(f"{NAME}: the configuration is not JSON: {e}") from None
        if not isinstance(settings, dict):
            raise Err(f"{NAME}: the configuration must be a JSON object")
        return types.PluginInfo(NAME, VERSION, ["VM.*"])

    def handle(self, events):
        """One outcome per event, in order. Delivery is at least once: the
        same event (same `id`) may come again, so side effects must be
        idempotent. An exception traps: the whole batch is retried."""
        outcomes = []
        for event in events:
            log.log(
                log.Level.INFO,
                f"{event.cluster} {event.event_type} {event.entity_uuid} "
                f"(event {event.id}, attempt {event.attempt})",
            )
            # Something to see from outside: the id of the last event handled.
            try:
                kv.set("last-event", event.id.encode())
            except Err as e:
                outcomes.append(types.Outcome_Retry(types.Retry(f"kv: {e.value}", None)))
                continue
            outcomes.append(types.Outcome_Done())
        return outcomes

    def reconcile(self, cluster, vms):
        """The whole VM inventory in one list, for hosts before 0.1.2. The
        world requires it, but no host that can load this plugin calls it: it
        imports `inventory` (0.1.2), and such hosts call `Paged.reconcile`."""
        return f"{len(vms)} VMs in {cluster}: nothing to reconcile"


class Paged(exports.Paged):
    def reconcile(self, cluster):
        """The VM inventory of a cluster, at start and on a timer, a page at
        a time (so that neither this plugin's memory nor the host's grows
        with it): bring outside state back in step with it here."""
        vms = 0
        while (page := inventory.next_page()) is not None:
            vms += len(page)
        return f"{vms} VMs in {cluster}, read a page at a time: nothing to reconcile"
