"""F5 BIG-IP pool-member sync: everything but the WIT glue.

Nutanix categories name the pool a VM serves in (`F5Pool` = `web` by
default); this module keeps the pool's members (`<ip>:<port>`) in step with
the VMs that are powered on and carry the category, through iControl REST.

It knows nothing of componentize-py: it talks to the world through a *host*
object with `send`, `kv_get`, `kv_set`, `kv_delete`, `kv_list` and `log`
(see `app.py` for the real one and `tests/` for a fake), so that it runs and
is tested under plain CPython.

What the plugin added is remembered in kv, because a `VM.DELETE` may carry no
VM at all and the plugin must still know which members to take away:

- `vm/<cluster>/<uuid>` -> JSON list of `[pool, member]` pairs this VM
  contributes, `pool` being the full path (`/Common/web`);
- `member/<pool>/<member>` -> JSON list of `<cluster>/<uuid>` owners, so that
  a member two VMs claim (an address that moved) is removed only when the
  last of them lets go.

Every side effect is idempotent: adding an existing member (409) and
removing a missing one (404) count as success, so a redelivered batch simply
does the same requests again. The members the plugin adds carry the
description `MANAGED`: that is how it tells a member an earlier attempt
added (and whose kv record was lost) from one an administrator added by
hand, which it leaves alone. A batch delivered again can hold later events
of a VM than the attempt whose requests reached BIG-IP but whose kv writes
were lost (its host died); that attempt left the VM at a state one of its
events in this batch wanted, so for a VM with several events the last one's
members are all added again, and what the others wanted and the last one no
longer does is removed too.
"""

import ipaddress
import json
import math

VERSION = "0.2.1"
NAME = "f5-bigip"

DEFAULT_SUBSCRIPTIONS = [
    "VM.CREATE",
    "VM.ON",
    "VM.OFF",
    "VM.UPDATE",
    "VM.MIGRATE",
    "VM.NIC_PLUG",
    "VM.NIC_UNPLUG",
    "VM.DELETE",
]
# The `description` of every member the plugin adds. A member BIG-IP
# already holds without it was added by someone else: the plugin neither
# records it as a VM's nor ever removes it.
MANAGED = "managed by prismhook (f5-bigip)"

KNOWN_KEYS = ("bigip", "port", "category", "partition", "subscriptions", "timeout_ms")
DEFAULT_TIMEOUT_MS = 10_000

# BIG-IP object names: letters, digits and these; `/` and `~` separate
# partitions in paths and URLs, so they can never be part of a name.
_NAME_EXTRA = set("._-")
MAX_NAME_LEN = 255


class ConfigError(ValueError):
    """The operator's settings are unusable; the message says which key."""


class HttpFailure(Exception):
    """The host could not complete a request (the WIT `http.error` variant).

    `kind` is one of `denied`, `invalid-request`, `timeout`,
    `connection-failed`, `too-large`, `limit-exceeded`, `other`.
    """

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class KvFailure(Exception):
    """A kv call returned an error."""


# Outcomes, as plain tuples the glue turns into WIT variants:
# ("done",), ("retry", reason, delay_ms or None), ("reject", reason).
DONE = ("done",)


def retry(reason, delay_ms=None):
    return ("retry", reason, delay_ms)


def reject(reason):
    return ("reject", reason)


class Failure(Exception):
    """Stops work on one VM with the outcome its events get."""

    def __init__(self, outcome):
        super().__init__(outcome[1] if len(outcome) > 1 else outcome[0])
        self.outcome = outcome


# ---------------------------------------------------------------------------
# Configuration


def valid_name(name):
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME_LEN
        and all(c.isascii() and (c.isalnum() or c in _NAME_EXTRA) for c in name)
    )


class Config:
    """The checked configuration, defaults applied."""

    def __init__(self, bigip, port=80, category="F5Pool", partition="Common",
                 subscriptions=None, timeout_ms=DEFAULT_TIMEOUT_MS):
        self.bigip = bigip
        self.port = port
        self.category = category
        self.partition = partition
        self.subscriptions = list(subscriptions or DEFAULT_SUBSCRIPTIONS)
        self.timeout_ms = timeout_ms

    @staticmethod
    def parse(text):
        try:
            raw = json.loads(text) if text and text.strip() else {}
        except ValueError as e:
            raise ConfigError(f"the configuration is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("the configuration must be a JSON object")
        unknown = sorted(k for k in raw if k not in KNOWN_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                f"known keys are {', '.join(KNOWN_KEYS)}"
            )

        bigip = raw.get("bigip")
        if not isinstance(bigip, str) or not bigip.strip():
            raise ConfigError("`bigip` (the BIG-IP base URL, such as https://bigip.example.com) is required")
        bigip = bigip.strip().rstrip("/")
        scheme, sep, rest = bigip.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest or "?" in rest or "#" in rest:
            raise ConfigError(
                f"`bigip` {raw['bigip']!r} must be an http:// or https:// URL with no path, "
                "such as https://bigip.example.com"
            )

        port = raw.get("port", 80)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"`port` must be an integer from 1 to 65535, not {port!r}")

        category = raw.get("category", "F5Pool")
        if not isinstance(category, str) or not category:
            raise ConfigError("`category` must be a non-empty string (a Nutanix category key)")

        partition = raw.get("partition", "Common")
        if not valid_name(partition):
            raise ConfigError(
                f"`partition` {partition!r} must be a BIG-IP name: letters, digits, `.`, `_` and `-`"
            )

        subscriptions = raw.get("subscriptions", DEFAULT_SUBSCRIPTIONS)
        if (
            not isinstance(subscriptions, list)
            or not subscriptions
            or not all(isinstance(s, str) and s for s in subscriptions)
        ):
            raise ConfigError("`subscriptions` must be a non-empty list of event types such as \"VM.ON\"")

        timeout_ms = raw.get("timeout_ms", DEFAULT_TIMEOUT_MS)
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not 1 <= timeout_ms <= 600_000:
            raise ConfigError(f"`timeout_ms` must be an integer from 1 to 600000, not {timeout_ms!r}")

        return Config(bigip, port, category, partition, subscriptions, timeout_ms)

    def pool_path(self, pool):
        return f"/{self.partition}/{pool}"

    def members_url(self, pool_path):
        return f"{self.bigip}/mgmt/tm/ltm/pool/{tilde(pool_path)}/members"

    def member_url(self, pool_path, member):
        partition = pool_path.split("/")[1]
        return f"{self.members_url(pool_path)}/~{partition}~{member}"


def tilde(path):
    """`/Common/web` -> `~Common~web`, iControl's way to put a path in a URL."""
    return path.replace("/", "~")


# ---------------------------------------------------------------------------
# What a VM should contribute


def member_name(ip, port):
    """BIG-IP names IPv4 members `ip:port` and IPv6 members `ip.port`."""
    return f"{ip}.{port}" if ":" in ip else f"{ip}:{port}"


def member_address(member):
    """The address part of a member name made by `member_name`."""
    if member.count(":") > 1:  # IPv6: `addr.port`
        return member.rsplit(".", 1)[0]
    return member.rsplit(":", 1)[0]


def reachable(address):
    """Whether another machine can reach the VM at `address`: Prism lists
    every address a NIC reports, an IPv6 NIC's link-local one among them,
    which BIG-IP cannot use without a scope."""
    return not (address.is_link_local or address.is_loopback
                or address.is_unspecified or address.is_multicast)


def vm_ips(vm):
    """The VM's valid addresses, canonical and sorted, and the invalid ones;
    addresses no other machine reaches it at are left out."""
    good, bad = set(), []
    for nic in vm.nics or []:
        for raw in nic.ips or []:
            try:
                address = ipaddress.ip_address(raw.strip())
            except ValueError:
                bad.append(raw)
                continue
            # A zone (`fe80::1%eth0`) would end up in the member's name and
            # URL, where `%` means a route domain and the rest is Prism's
            # text: not an address BIG-IP should be given.
            if getattr(address, "scope_id", None):
                bad.append(raw)
            elif reachable(address):
                good.add(str(address))
    return sorted(good, key=lambda a: (":" in a, ipaddress.ip_address(a))), bad


def powered_on(event_type, power_state):
    """`VM.ON`/`VM.OFF` decide themselves; otherwise only an explicit `OFF`
    is off: an absent state comes from a payload that does not say."""
    if event_type == "VM.ON":
        return True
    if event_type == "VM.OFF":
        return False
    return not (power_state or "").strip().upper() in ("OFF", "POWERED_OFF")


def wanted(config, vm, on, log=None):
    """The set of `(pool path, member)` pairs a VM should contribute."""
    if not on:
        return set()
    pools = []
    for category in vm.categories or []:
        if category.key != config.category:
            continue
        if valid_name(category.value):
            pools.append(config.pool_path(category.value))
        elif log:
            log("warn", f"VM {vm.uuid}: category {config.category} = {category.value!r} "
                        "is not a valid BIG-IP pool name; ignoring it")
    if not pools:
        return set()
    ips, bad = vm_ips(vm)
    if bad and log:
        log("warn", f"VM {vm.uuid}: skipping values that are not IP addresses: {bad}")
    return {(pool, member_name(ip, config.port)) for pool in pools for ip in ips}


# ---------------------------------------------------------------------------
# kv records


def vm_key(cluster, uuid):
    return f"vm/{cluster}/{uuid}"


def owners_key(pool, member):
    return f"member/{pool}/{member}"


def owner_id(cluster, uuid):
    return f"{cluster}/{uuid}"


def _load(host, key):
    try:
        raw = host.kv_get(key)
    except KvFailure as e:
        raise Failure(retry(f"reading kv `{key}`: {e}")) from None
    if raw is None:
        return None
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except ValueError as e:
        # Refusing every future event over one bad record would be worse;
        # reconcile rewrites it.
        host.log("warn", f"kv `{key}` is unreadable ({e}); treating it as empty")
        return None


def _store(host, key, value):
    try:
        if value:
            host.kv_set(key, json.dumps(value, separators=(",", ":")).encode("utf-8"))
        else:
            host.kv_delete(key)
    except KvFailure as e:
        raise Failure(retry(f"writing kv `{key}`: {e}")) from None


def load_record(host, key):
    record = _load(host, key) or []
    pairs = set()
    for item in record if isinstance(record, list) else []:
        if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            pairs.add((item[0], item[1]))
    return pairs


def store_record(host, key, pairs):
    _store(host, key, [list(p) for p in sorted(pairs)])


def load_owners(host, pool, member):
    owners = _load(host, owners_key(pool, member)) or []
    return {o for o in owners if isinstance(o, str)} if isinstance(owners, list) else set()


def store_owners(host, pool, member, owners):
    _store(host, owners_key(pool, member), sorted(owners))


# ---------------------------------------------------------------------------
# iControl REST


def _header(headers, name):
    for key, value in headers or []:
        if key.lower() == name:
            return value
    return None


# The longest delay a Retry-After may ask for: a day. The host's retries end
# at their `max_age` anyway, and a delay past 2^64 ms cannot be handed to it.
MAX_RETRY_AFTER_MS = 86_400_000


def retry_after_ms(headers):
    value = _header(headers, "retry-after")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: leave the delay to the host's backoff
    if not math.isfinite(seconds):
        return None
    return min(max(0, int(seconds * 1000)), MAX_RETRY_AFTER_MS)


def error_message(body):
    """iControl's `{"code":..,"message":..}`, else the body's first line."""
    text = bytes(body or b"").decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
            return parsed["message"]
    except ValueError:
        pass
    line = text.splitlines()[0] if text else ""
    return line[:300] or "no message"


def http_failure_outcome(failure, what):
    kind = failure.kind
    if kind == "denied":
        return reject(f"the host's policy does not allow calling BIG-IP ({what}): {failure.detail}")
    if kind == "invalid-request":
        return reject(f"the host refused the request as malformed ({what}): {failure.detail}")
    if kind == "timeout":
        return retry(f"BIG-IP did not answer in time ({what})")
    if kind == "connection-failed":
        return retry(f"could not connect to BIG-IP ({what}): {failure.detail}")
    if kind == "too-large":
        return retry(f"BIG-IP's answer exceeded the host's {failure.detail}-byte limit ({what})")
    if kind == "limit-exceeded":
        # Not the BIG-IP's fault, and what was done is recorded: carry on at
        # once in the next call rather than after a backoff.
        return retry(f"too many requests in one call ({what}): {failure.detail}", 0)
    return retry(f"request to BIG-IP failed ({what}): {failure.detail}")


def request(config, host, method, url, what, body=None, ok=(200, 201, 204)):
    """Sends one request; returns the response or raises `Failure` with the
    outcome its status calls for."""
    headers = [("Accept", "application/json")]
    data = None
    if body is not None:
        headers.append(("Content-Type", "application/json"))
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    try:
        response = host.send(method, url, headers, data, config.timeout_ms)
    except HttpFailure as failure:
        raise Failure(http_failure_outcome(failure, what)) from None
    status = response.status
    if status in ok:
        return response
    message = error_message(response.body)
    # 401 and 403: a credential the operator rotated or that expired (a
    # session login signs in again by itself); the events wait for the fix.
    if status >= 500 or status in (401, 403, 408, 429):
        raise Failure(retry(f"BIG-IP answered HTTP {status} ({what}): {message}",
                            retry_after_ms(response.headers)))
    raise Failure(reject(f"BIG-IP refused ({what}) with HTTP {status}: {message}"))


def add_member(config, host, pool, member, recorded=False, again=True):
    """Adds a member. Returns False when BIG-IP already holds it and it is
    not the plugin's: someone else's member, left alone and not recorded.
    `recorded` says kv holds it as the plugin's already, which a 409 then
    confirms without asking whose it is (members added before the
    description was set carry none)."""
    what = f"adding {member} to pool {pool}"
    response = request(config, host, "POST", config.members_url(pool), what,
                       # The partition said outright: BIG-IP puts a member
                       # created without one in /Common, where the member
                       # URLs, which name the pool's, would not find it.
                       {"name": member, "address": member_address(member),
                        "partition": config.partition, "description": MANAGED},
                       ok=(200, 201, 409, 404))
    if response.status == 404:
        raise Failure(reject(
            f"pool {pool} does not exist on BIG-IP ({what}): create it, or fix the "
            f"`{config.category}` category; BIG-IP said: {error_message(response.body)}"
        ))
    if response.status != 409:
        host.log("info", f"added {member} in pool {pool}")
        return True
    if not recorded:
        description = member_description(config, host, pool, member)
        if description is None and again:
            # Gone between the two requests (another call of the plugin
            # removed it, for a VM that let it go): asked once more.
            return add_member(config, host, pool, member, recorded, again=False)
        if description is None:
            # Refused as existing, yet not there by that name: another member
            # holds the address under another name (a named node). Retrying
            # would be refused alike until someone changes the pool.
            raise Failure(reject(
                f"BIG-IP refused {member} in pool {pool} as existing (409) but has no member "
                f"of that name ({what}): another member may use {member_address(member)} under "
                f"another node name; remove it, or leave the address to it"
            ))
        if description != MANAGED:
            left_alone(host, pool, member)
            return False
    host.log("info", f"kept {member} in pool {pool}")
    return True


def left_alone(host, pool, member):
    host.log("info", f"left {member} in pool {pool} alone: it was not added by prismhook "
                     f"(its description is not {MANAGED!r}), so it stays when its VM goes")


def member_description(config, host, pool, member):
    """The description of a member BIG-IP holds ("" when it has none), or
    None when the member is not there."""
    what = f"reading {member} in pool {pool}"
    response = request(config, host, "GET", config.member_url(pool, member), what, ok=(200, 404))
    if response.status == 404:
        return None
    return description_of(json_body(response, what))


def description_of(item):
    value = item.get("description") if isinstance(item, dict) else None
    return value if isinstance(value, str) else ""


def json_body(response, what):
    try:
        return json.loads(bytes(response.body).decode("utf-8"))
    except ValueError as e:
        raise Failure(retry(f"BIG-IP's answer ({what}) is not the expected JSON: {e}")) from None


def remove_member(config, host, pool, member):
    what = f"removing {member} from pool {pool}"
    response = request(config, host, "DELETE", config.member_url(pool, member), what,
                       ok=(200, 204, 404))
    host.log("info", f"{'already gone:' if response.status == 404 else 'removed'} {member} from pool {pool}")


def pool_members(config, host, pool):
    """The members BIG-IP lists for a pool, name -> description, or None
    when the pool is missing."""
    what = f"listing pool {pool}"
    # Only what is read: a member is some thirty properties, and a pool of
    # thousands would pass the host's answer limit otherwise.
    url = config.members_url(pool) + "?$select=name,description"
    response = request(config, host, "GET", url, what, ok=(200, 404))
    if response.status == 404:
        return None
    doc = json_body(response, what)
    items = doc.get("items", []) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise Failure(retry(f"BIG-IP's answer ({what}) has no list of `items`"))
    return {item["name"]: description_of(item) for item in items
            if isinstance(item, dict) and isinstance(item.get("name"), str)}


# ---------------------------------------------------------------------------
# Applying a VM's wanted state


def apply_vm(config, host, cluster, uuid, want, present=None, passed=None, claimed=frozenset()):
    """Moves one VM's members from what kv records to `want`.

    `present` maps pool path -> set of members BIG-IP lists (reconcile);
    when given, requests whose effect is already there are skipped and
    missing members are added again even if kv says they were added.
    `passed` holds the pairs the batch's earlier events of the VM wanted,
    `None` when it had none (see the module's doc): those no longer wanted
    are removed as well, and when there were such events every wanted pair
    is added again. `claimed` (reconcile) holds every pair some VM of the
    inventory wants: such a member is left for that VM to take on record,
    not removed and added again (a member added anew drops its connections
    and waits for its monitor).
    Returns `(added, removed)` counts. Progress is recorded even when a
    request fails, so the retry starts where this one stopped.
    """
    key = vm_key(cluster, uuid)
    me = owner_id(cluster, uuid)
    recorded = load_record(host, key)
    record = set(recorded)
    added = removed = 0
    earlier = passed is not None
    # Why BIG-IP refused a pair (a pool that does not exist, say): the VM's
    # other pools are still brought in line, then the VM is rejected.
    refused = []
    try:
        for pool, member in sorted((recorded | (passed or set())) - want):
            claims = load_owners(host, pool, member)
            owners = claims - {me}
            if not owners and (pool, member) in claimed and present is not None \
                    and present.get(pool, {}).get(member) == MANAGED:
                host.log("debug", f"{member} in pool {pool} is wanted by another VM of the "
                                  f"inventory; left for it")
            elif not owners:
                if (pool, member) not in recorded:
                    # Only an earlier event of the batch wanted it: BIG-IP
                    # holds it only if a lost attempt added it, or someone else.
                    description = member_description(config, host, pool, member)
                    if description == MANAGED:
                        remove_member(config, host, pool, member)
                        removed += 1
                    elif description is not None:
                        left_alone(host, pool, member)
                elif present is None or member in present.get(pool, ()):
                    remove_member(config, host, pool, member)
                    removed += 1
                    if present is not None:
                        # A VM later in the inventory may want it back.
                        present[pool].pop(member, None)
            else:
                host.log("debug", f"{member} in pool {pool} is still claimed by {sorted(owners)}; keeping it")
                if present is None and (pool, member) in recorded:
                    # Another call of the plugin may have removed it meanwhile,
                    # for a VM that let it go before this one's claim was
                    # stored: kept means there (a 409 when it is, as usual).
                    keep_member(config, host, pool, member, refused)
            if owners != claims:
                store_owners(host, pool, member, owners)
            record.discard((pool, member))
        for pool, member in sorted(want):
            new = (pool, member) not in recorded
            try:
                if present is None:
                    # After earlier events, kv's record may not be what BIG-IP holds.
                    if not new and not earlier:
                        continue
                    ours = add_member(config, host, pool, member, recorded=not new)
                    added += ours
                elif pool not in present:
                    refused.append(f"pool {pool} does not exist on BIG-IP; create it, "
                                   f"or fix the `{config.category}` category of VM {uuid}")
                    continue
                else:
                    listed = present[pool]
                    if member in listed:
                        if not new:
                            continue
                        # Taken on record without a request when it is the
                        # plugin's: an attempt whose kv writes were lost added it.
                        ours = listed[member] == MANAGED
                        if not ours:
                            left_alone(host, pool, member)
                    else:
                        ours = add_member(config, host, pool, member)
                        added += ours
                        if ours:
                            listed[member] = MANAGED
            except Failure as failure:
                if failure.outcome[0] != "reject":
                    raise
                refused.append(failure.outcome[1])
                continue
            if not ours:
                continue
            owners = load_owners(host, pool, member)
            if me not in owners:
                store_owners(host, pool, member, owners | {me})
            record.add((pool, member))
    finally:
        if record != recorded:
            store_record(host, key, record)
    if refused:
        raise Failure(reject("; ".join(refused)))
    return added, removed


def keep_member(config, host, pool, member, refused):
    """Makes sure a member other VMs still claim is in its pool."""
    try:
        add_member(config, host, pool, member, recorded=True)
    except Failure as failure:
        if failure.outcome[0] != "reject":
            raise
        refused.append(failure.outcome[1])


def intended(config, event, log):
    """The pairs an event asks its VM to contribute, or None when the event
    carries nothing to act on."""
    kind = event.event_type
    if kind in ("VM.DELETE", "VM.OFF"):
        return set()
    if event.vm is None:
        log("warn", f"{kind} for VM {event.entity_uuid} ({event.cluster}) carries no VM body; "
                    "nothing to do until the next reconcile")
        return None
    on = powered_on(kind, event.vm.power_state)
    return wanted(config, event.vm, on, log)


def handle(config, host, events):
    """One outcome per event, in order. Events of a VM are coalesced to the
    last state they ask for, applied once."""
    owners = []  # per event: the VM it belongs to, or its outcome already
    changes = {}  # (cluster, uuid) -> wanted pairs, in first-seen order
    passed = {}  # (cluster, uuid) -> what its earlier events wanted
    for event in events:
        if not event.event_type.startswith("VM."):
            host.log("debug", f"ignoring {event.event_type} (not a VM event)")
            owners.append(("outcome", DONE))
            continue
        uuid = event.entity_uuid or (event.vm.uuid if event.vm is not None else "")
        if not uuid:
            owners.append(("outcome", reject(f"{event.event_type} event {event.id} names no VM")))
            continue
        vm = (event.cluster, uuid)
        want = intended(config, event, host.log)
        if want is not None:
            if vm in changes:
                passed[vm] = passed.get(vm, set()) | changes[vm]
            changes[vm] = want
        owners.append(("vm", vm))

    results = {}
    for (cluster, uuid), want in changes.items():
        try:
            apply_vm(config, host, cluster, uuid, want, passed=passed.get((cluster, uuid)))
            results[(cluster, uuid)] = DONE
        except Failure as failure:
            level = "warn" if failure.outcome[0] == "retry" else "error"
            host.log(level, f"VM {uuid} ({cluster}): {failure.outcome[1]}")
            results[(cluster, uuid)] = failure.outcome
    return [results.get(value, DONE) if tag == "vm" else value for tag, value in owners]


def reconcile(config, host, cluster, vms):
    """Brings the pools in line with a cluster's inventory. Returns a
    one-line summary; raises `Failure` when something must be tried again
    at the next interval (progress made so far is kept)."""
    wants = {}
    for vm in vms:
        if vm.uuid:
            wants[vm.uuid] = wanted(config, vm, powered_on(None, vm.power_state), host.log)
    for uuid in recorded_vms(host, cluster):
        wants.setdefault(uuid, set())  # gone from the inventory
    return bring_in_line(config, host, cluster, wants, len(vms))


# VMs brought in line between two `kv_commit`s of a paged reconcile: a
# timeout loses at most the records of these.
COMMIT_EVERY = 100


def reconcile_paged(config, host, cluster, pages):
    """`reconcile` with the inventory read a page at a time from `pages`
    (the host's `inventory.next-page`). Across pages it keeps what the
    pools need, not the inventory: the members each VM in a pool wants, and
    the VMs kv has a record of. A paged reconcile's error discards its kv
    writes, so the records of what it changed are committed (`kv_commit`)
    every `COMMIT_EVERY` VMs and before it raises: a member it added is
    never forgotten, to stay on BIG-IP after its VM is gone."""
    has_record = set(recorded_vms(host, cluster))
    wants = {}
    listed = 0
    for page in pages:
        for vm in page:
            listed += 1
            if not vm.uuid:
                continue
            want = wanted(config, vm, powered_on(None, vm.power_state), host.log)
            if want or vm.uuid in has_record or vm.uuid in wants:
                wants[vm.uuid] = want
    for uuid in has_record:
        wants.setdefault(uuid, set())  # gone from the inventory
    return bring_in_line(config, host, cluster, wants, listed, commit=host.kv_commit)


def recorded_vms(host, cluster):
    """The uuids of the cluster's VMs that kv holds a record of."""
    prefix = vm_key(cluster, "")
    try:
        keys = host.kv_list(prefix)
    except KvFailure as e:
        raise Failure(retry(f"listing kv `{prefix}`: {e}")) from None
    return [key[len(prefix):] for key in keys if key[len(prefix):]]


def bring_in_line(config, host, cluster, wants, listed, commit=None):
    """Moves every VM of `wants` (uuid -> the pairs it should contribute)
    to what it wants, against what the pools hold. `commit`, when given,
    makes the kv writes so far durable (see `reconcile_paged`)."""
    # The pools to list: those wanted and those on record. apply_vm reads
    # each record again rather than this keeping every one until then.
    pools = set()
    for uuid, want in wants.items():
        pools.update(p for p, _ in want | load_record(host, vm_key(cluster, uuid)))
    present = {}
    for pool in sorted(pools):
        members = pool_members(config, host, pool)
        if members is not None:
            present[pool] = members
        else:
            host.log("warn", f"pool {pool} does not exist on BIG-IP")

    claimed = set().union(*wants.values())
    added = removed = 0
    problems = []
    since_commit = 0
    for uuid, want in wants.items():
        try:
            a, r = apply_vm(config, host, cluster, uuid, want, present, claimed=claimed)
            added += a
            removed += r
        except Failure as failure:
            if failure.outcome[0] == "reject":
                problems.append(failure.outcome[1])
                continue
            if commit is not None:
                _commit(commit)
            raise
        since_commit += 1
        if commit is not None and since_commit >= COMMIT_EVERY:
            _commit(commit)
            since_commit = 0
    summary = f"{listed} VMs: {added} members added, {removed} removed"
    if problems:
        summary += f"; {len(problems)} problem(s): {problems[0]}"
    return summary


def _commit(commit):
    try:
        commit()
    except KvFailure as e:
        raise Failure(retry(f"committing kv: {e}")) from None
