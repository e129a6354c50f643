"""f5sync against an in-memory BIG-IP and kv, under plain CPython:
`python -m unittest discover -s plugins/f5-bigip/tests` (or pytest)."""

import json
import os
import sys
import unittest
from types import SimpleNamespace as NS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import f5sync  # noqa: E402

BIGIP = "https://bigip.test"


def vm(uuid="vm-1", ips=("10.0.0.1",), pool="web", power="ON", categories=None):
    cats = categories if categories is not None else ([NS(key="F5Pool", value=pool)] if pool else [])
    return NS(uuid=uuid, name=uuid, power_state=power, categories=cats,
              nics=[NS(uuid=None, mac_address=None, ips=list(ips), subnet_name=None, subnet_uuid=None)],
              host_name=None, entity_version=None)


_ids = iter(range(1, 1_000_000))


def event(kind, vm_=None, uuid=None, cluster="c1"):
    return NS(id=f"e{next(_ids)}", cluster=cluster, event_type=kind, entity_kind="vm",
              entity_uuid=uuid or (vm_.uuid if vm_ else "vm-1"), attempt=1,
              received_at_ms=0, body="{}", vm=vm_)


class FakeHost:
    """A BIG-IP answering iControl REST as the simulator does, plus kv."""

    def __init__(self, pools=("/Common/web", "/Common/api")):
        self.pools = {p: {} for p in pools}  # pool -> member -> description
        self.kv = {}
        self.committed = {}  # kv as of the last kv_commit
        self.commits = 0
        self.kv_reads = []
        self.logs = []
        self.requests = []
        self.fail = []  # statuses (or HttpFailure) to answer the next requests with

    def send(self, method, url, headers, body, timeout_ms):
        self.requests.append((method, url, json.loads(body) if body else None))
        fault = self.fail.pop(0) if self.fail else None
        if fault is not None:
            if isinstance(fault, Exception):
                raise fault
            status, extra = fault if isinstance(fault, tuple) else (fault, [])
            return NS(status=status, headers=extra, body=json.dumps({"code": status, "message": "boom"}).encode())
        assert url.startswith(BIGIP + "/mgmt/tm/ltm/pool/"), url
        rest, _, query = url[len(BIGIP + "/mgmt/tm/ltm/pool/"):].partition("?")
        parts = rest.split("/")
        pool = parts[0].replace("~", "/")
        if pool not in self.pools:
            return self.answer(404, {"code": 404, "message": f"Object not found - {pool}"})
        members = self.pools[pool]
        if method == "GET" and parts[1:] == ["members"]:
            # What the plugin lists it reads all of: nothing else is asked for.
            assert query == "$select=name,description", query
            return self.answer(200, {"items": [self.member(m, d) for m, d in sorted(members.items())]})
        if method == "POST" and parts[1:] == ["members"]:
            new = json.loads(body)
            name = new["name"]
            if name in members:
                return self.answer(409, {"code": 409, "message": f"member {name} already exists in pool {pool}"})
            members[name] = new.get("description")
            return self.answer(200, self.member(name, members[name]))
        if len(parts) == 3 and parts[1] == "members":
            name = parts[2].split("~")[-1]
            if name not in members:
                return self.answer(404, {"code": 404, "message": "not found"})
            if method == "GET":
                return self.answer(200, self.member(name, members[name]))
            if method == "DELETE":
                del members[name]
                return self.answer(200, {})
        return self.answer(400, {"code": 400, "message": "unexpected"})

    @staticmethod
    def member(name, description):
        # BIG-IP leaves `description` out of a member that has none.
        return {"name": name} if description is None else {"name": name, "description": description}

    def add_by_hand(self, pool, member, description=None):
        self.pools[pool][member] = description

    @staticmethod
    def answer(status, doc):
        return NS(status=status, headers=[("content-type", "application/json")], body=json.dumps(doc).encode())

    def kv_get(self, key):
        self.kv_reads.append(key)
        return self.kv.get(key)

    def kv_set(self, key, value):
        self.kv[key] = bytes(value)

    def kv_delete(self, key):
        self.kv.pop(key, None)

    def kv_list(self, prefix):
        return sorted(k for k in self.kv if k.startswith(prefix))

    def kv_commit(self):
        self.committed = dict(self.kv)
        self.commits += 1

    def discard_uncommitted(self):
        """What the host does with a paged reconcile's writes when it fails."""
        self.kv = dict(self.committed)

    def log(self, level, message):
        self.logs.append((level, message))

    def members(self):
        return {p: sorted(m) for p, m in self.pools.items() if m}


def config(**overrides):
    return f5sync.Config.parse(json.dumps({"bigip": BIGIP, **overrides}))


class ConfigTests(unittest.TestCase):
    def test_defaults_apply_when_only_bigip_is_given(self):
        c = config()
        self.assertEqual((c.bigip, c.port, c.category, c.partition), (BIGIP, 80, "F5Pool", "Common"))
        self.assertIn("VM.ON", c.subscriptions)
        self.assertIn("VM.DELETE", c.subscriptions)

    def test_unknown_keys_are_rejected_by_name(self):
        with self.assertRaisesRegex(f5sync.ConfigError, "unknown key.*'prot'"):
            config(prot=8080)

    def test_bigip_is_required_and_must_be_a_base_url(self):
        for bad in ({}, {"bigip": ""}, {"bigip": "bigip.test"}, {"bigip": "ftp://x"}, {"bigip": "https://x/mgmt"}):
            with self.subTest(bad=bad), self.assertRaisesRegex(f5sync.ConfigError, "bigip"):
                f5sync.Config.parse(json.dumps(bad))

    def test_a_trailing_slash_is_dropped(self):
        self.assertEqual(config(bigip=BIGIP + "/").bigip, BIGIP)

    def test_bad_values_are_explained(self):
        for key, value in [("port", 0), ("port", "80"), ("port", True), ("category", ""),
                           ("partition", "a/b"), ("subscriptions", []), ("subscriptions", "VM.ON")]:
            with self.subTest(key=key, value=value), self.assertRaisesRegex(f5sync.ConfigError, key):
                config(**{key: value})

    def test_config_that_is_not_a_json_object_is_rejected(self):
        for text in ("[]", "nope"):
            with self.assertRaises(f5sync.ConfigError):
                f5sync.Config.parse(text)


class MemberTests(unittest.TestCase):
    def test_ipv4_members_are_ip_colon_port_and_ipv6_ip_dot_port(self):
        self.assertEqual(f5sync.member_name("10.0.0.1", 80), "10.0.0.1:80")
        self.assertEqual(f5sync.member_name("2001:db8::1", 443), "2001:db8::1.443")
        self.assertEqual(f5sync.member_address("2001:db8::1.443"), "2001:db8::1")
        self.assertEqual(f5sync.member_address("10.0.0.1:80"), "10.0.0.1")

    def test_a_vm_contributes_each_valid_ip_to_each_pool_its_category_names(self):
        v = vm(ips=("10.0.0.2", "bogus", "10.0.0.1"), categories=[
            NS(key="F5Pool", value="web"), NS(key="F5Pool", value="api"), NS(key="Env", value="prod")])
        logs = []
        got = f5sync.wanted(config(port=8080), v, True, lambda lvl, msg: logs.append(msg))
        self.assertEqual(got, {("/Common/web", "10.0.0.1:8080"), ("/Common/web", "10.0.0.2:8080"),
                               ("/Common/api", "10.0.0.1:8080"), ("/Common/api", "10.0.0.2:8080")})
        self.assertTrue(any("bogus" in m for m in logs))

    def test_an_ipv6_address_with_a_zone_is_skipped_as_invalid(self):
        v = vm(ips=("fe80::1%a?b", "2001:db8::1%~Common~x", "2001:db8::2"))
        logs = []
        got = f5sync.wanted(config(), v, True, lambda lvl, msg: logs.append(msg))
        self.assertEqual(got, {("/Common/web", "2001:db8::2.80")})
        self.assertTrue(any("fe80::1%a?b" in m for m in logs), logs)

    def test_addresses_no_other_machine_reaches_are_left_out_without_a_warning(self):
        v = vm(ips=("fe80::5054:ff:fe12:3456", "127.0.0.1", "0.0.0.0", "ff02::1", "10.0.0.1"))
        logs = []
        got = f5sync.wanted(config(), v, True, lambda lvl, msg: logs.append(msg))
        self.assertEqual(got, {("/Common/web", "10.0.0.1:80")})
        self.assertEqual(logs, [])

    def test_a_vm_without_the_category_or_powered_off_contributes_nothing(self):
        self.assertEqual(f5sync.wanted(config(), vm(pool=None), True), set())
        self.assertEqual(f5sync.wanted(config(), vm(), False), set())

    def test_a_pool_name_bigip_cannot_hold_is_skipped_with_a_warning(self):
        logs = []
        self.assertEqual(f5sync.wanted(config(), vm(pool="a b"), True, lambda lvl, msg: logs.append(msg)), set())
        self.assertTrue(logs)

    def test_power_follows_the_event_type_then_the_state(self):
        self.assertTrue(f5sync.powered_on("VM.ON", "OFF"))
        self.assertFalse(f5sync.powered_on("VM.OFF", "ON"))
        self.assertFalse(f5sync.powered_on("VM.UPDATE", "OFF"))
        self.assertTrue(f5sync.powered_on("VM.UPDATE", None))

    def test_urls_use_tilde_paths(self):
        c = config(partition="Tenant1")
        self.assertEqual(c.members_url("/Tenant1/web"), BIGIP + "/mgmt/tm/ltm/pool/~Tenant1~web/members")
        self.assertEqual(c.member_url("/Tenant1/web", "10.0.0.1:80"),
                         BIGIP + "/mgmt/tm/ltm/pool/~Tenant1~web/members/~Tenant1~10.0.0.1:80")


class HandleTests(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost()
        self.config = config()

    def handle(self, *events):
        return f5sync.handle(self.config, self.host, list(events))

    def test_power_on_adds_each_ip_to_the_pool_and_records_it(self):
        out = self.handle(event("VM.ON", vm(ips=("10.0.0.1", "10.0.0.2"))))
        self.assertEqual(out, [f5sync.DONE])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80", "10.0.0.2:80"]})
        self.assertEqual(json.loads(self.host.kv["vm/c1/vm-1"]),
                         [["/Common/web", "10.0.0.1:80"], ["/Common/web", "10.0.0.2:80"]])
        post = self.host.requests[0]
        self.assertEqual(post, ("POST", BIGIP + "/mgmt/tm/ltm/pool/~Common~web/members",
                                {"name": "10.0.0.1:80", "address": "10.0.0.1", "partition": "Common",
                                 "description": f5sync.MANAGED}))

    def test_power_off_removes_what_was_added_and_forgets_the_vm(self):
        self.handle(event("VM.ON", vm()))
        out = self.handle(event("VM.OFF", vm(power="OFF")))
        self.assertEqual(out, [f5sync.DONE])
        self.assertEqual(self.host.members(), {})
        self.assertEqual(self.host.kv, {})
        self.assertEqual(self.host.requests[-1][:2],
                         ("DELETE", BIGIP + "/mgmt/tm/ltm/pool/~Common~web/members/~Common~10.0.0.1:80"))

    def test_delete_without_a_vm_body_removes_the_recorded_members(self):
        self.handle(event("VM.ON", vm()))
        self.assertEqual(self.handle(event("VM.DELETE", None, uuid="vm-1")), [f5sync.DONE])
        self.assertEqual(self.host.members(), {})

    def test_a_member_an_attempt_added_before_its_record_was_lost_is_taken_on_record(self):
        self.host.add_by_hand("/Common/web", "10.0.0.1:80", f5sync.MANAGED)
        self.assertEqual(self.handle(event("VM.ON", vm())), [f5sync.DONE])
        self.assertIn("vm/c1/vm-1", self.host.kv)
        self.assertEqual(self.handle(event("VM.OFF", vm(power="OFF"))), [f5sync.DONE])
        self.assertEqual(self.host.members(), {})

    def test_a_member_added_by_hand_is_left_alone_and_outlives_the_vm(self):
        self.host.add_by_hand("/Common/web", "10.0.0.1:80", "the web team's canary")
        self.host.add_by_hand("/Common/web", "10.0.0.2:80")
        self.assertEqual(self.handle(event("VM.ON", vm(ips=("10.0.0.1", "10.0.0.2", "10.0.0.3")))), [f5sync.DONE])
        self.assertEqual(json.loads(self.host.kv["vm/c1/vm-1"]), [["/Common/web", "10.0.0.3:80"]])
        self.assertIn(("info", "left 10.0.0.1:80 in pool /Common/web alone: it was not added by prismhook "
                               "(its description is not 'managed by prismhook (f5-bigip)'), so it stays when its VM goes"),
                      self.host.logs)
        self.assertEqual(self.handle(event("VM.OFF", vm(power="OFF"))), [f5sync.DONE])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80", "10.0.0.2:80"]})
        self.assertEqual(self.host.kv, {})

    def test_a_batch_that_turns_a_vm_on_and_off_leaves_a_member_added_by_hand(self):
        self.host.add_by_hand("/Common/web", "10.0.0.1:80")
        out = self.handle(event("VM.ON", vm()), event("VM.OFF", vm(power="OFF")))
        self.assertEqual(out, [f5sync.DONE, f5sync.DONE])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})

    def test_a_batch_that_turns_a_vm_on_and_off_removes_what_a_lost_attempt_added(self):
        # The first attempt's POST reached BIG-IP; its kv writes did not land.
        self.host.add_by_hand("/Common/web", "10.0.0.1:80", f5sync.MANAGED)
        out = self.handle(event("VM.ON", vm()), event("VM.OFF", vm(power="OFF")))
        self.assertEqual(out, [f5sync.DONE, f5sync.DONE])
        self.assertEqual(self.host.members(), {})

    def test_a_409_for_a_member_not_there_by_its_name_is_refused_not_retried_for_ever(self):
        # Another member holds the address under another node name: BIG-IP
        # would refuse every retry alike (asked twice, in case it was
        # removed between the POST and the read).
        self.host.fail = [409, 404, 409, 404]
        out = self.handle(event("VM.ON", vm()))
        self.assertEqual(out[0][0], "reject")
        self.assertIn("refused 10.0.0.1:80 in pool /Common/web as existing (409)", out[0][1])
        self.assertIn("another node name", out[0][1])

    def test_a_member_removed_between_the_409_and_the_read_is_added_again(self):
        # Another call of the plugin removed it for a VM that let it go.
        self.host.fail = [409, 404]
        self.assertEqual(self.handle(event("VM.ON", vm())), [f5sync.DONE])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})
        self.assertEqual([r[0] for r in self.host.requests], ["POST", "GET", "POST"])

    def test_a_member_another_vm_still_claims_is_made_sure_of_when_a_vm_lets_it_go(self):
        # a hands its address to b. a's first call removed the member while
        # b's call added its claim; a's kv writes then lost to b's, and a's
        # call is made again: the member b claims must be there after it.
        self.handle(event("VM.ON", vm("a")))
        self.handle(event("VM.ON", vm("b")))
        self.host.pools["/Common/web"].clear()  # a's first call's DELETE
        self.assertEqual(self.handle(event("VM.DELETE", uuid="a")), [f5sync.DONE])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})
        self.assertEqual(f5sync.load_owners(self.host, "/Common/web", "10.0.0.1:80"),
                         {"c1/b"})

    def test_the_owners_of_a_member_are_written_only_when_they_change(self):
        self.handle(event("VM.ON", vm("a")))
        f5sync.store_record(self.host, f5sync.vm_key("c1", "x"), {("/Common/web", "10.0.0.1:80")})
        writes = []
        self.host.kv_set = lambda key, value: writes.append(key)
        self.handle(event("VM.DELETE", uuid="x"))
        self.assertNotIn(f5sync.owners_key("/Common/web", "10.0.0.1:80"), writes)

    def test_a_member_already_gone_counts_as_removed(self):
        self.handle(event("VM.ON", vm()))
        self.host.pools["/Common/web"].clear()
        self.assertEqual(self.handle(event("VM.OFF", vm())), [f5sync.DONE])
        self.assertEqual(self.host.kv, {})

    def test_redelivery_sends_nothing_new(self):
        on = event("VM.ON", vm())
        self.handle(on)
        sent = len(self.host.requests)
        self.assertEqual(self.handle(on), [f5sync.DONE])
        self.assertEqual(len(self.host.requests), sent)

    def test_a_category_change_moves_the_member_between_pools(self):
        self.handle(event("VM.ON", vm(pool="web")))
        self.handle(event("VM.UPDATE", vm(pool="api")))
        self.assertEqual(self.host.members(), {"/Common/api": ["10.0.0.1:80"]})

    def test_losing_the_category_removes_the_member(self):
        self.handle(event("VM.ON", vm(pool="web")))
        self.handle(event("VM.UPDATE", vm(pool=None)))
        self.assertEqual(self.host.members(), {})
        self.assertEqual(self.host.kv, {})

    def test_nic_unplug_removes_the_address_that_went_away(self):
        self.handle(event("VM.ON", vm(ips=("10.0.0.1", "10.0.0.2"))))
        self.handle(event("VM.NIC_UNPLUG", vm(ips=("10.0.0.2",))))
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.2:80"]})

    def test_create_of_a_powered_off_vm_adds_nothing(self):
        self.assertEqual(self.handle(event("VM.CREATE", vm(power="OFF"))), [f5sync.DONE])
        self.assertEqual(self.host.requests, [])

    def test_events_of_one_vm_in_a_batch_are_coalesced_to_the_last(self):
        out = self.handle(event("VM.ON", vm()), event("VM.OFF", vm()), event("VM.ON", vm(ips=("10.0.0.9",))))
        self.assertEqual(out, [f5sync.DONE] * 3)
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.9:80"]})
        # The first ON's member is looked for, in case an earlier attempt added it.
        self.assertEqual([r[:2] for r in self.host.requests], [
            ("GET", BIGIP + "/mgmt/tm/ltm/pool/~Common~web/members/~Common~10.0.0.1:80"),
            ("POST", BIGIP + "/mgmt/tm/ltm/pool/~Common~web/members"),
        ])

    def lost_then_again(self, first, again):
        """Handles `first` as an attempt whose host died after BIG-IP took
        its requests and before kv stored its writes, then `again`: the batch
        the next host is delivered, `first` once more and what came after."""
        stored = dict(self.host.kv)
        self.handle(*first)
        self.host.kv = stored
        self.assertEqual(self.handle(*again), [f5sync.DONE] * len(again))

    def test_a_batch_bigip_took_but_kv_lost_is_undone_when_delivered_again_with_a_later_off(self):
        self.handle(event("VM.ON", vm(pool="web")))
        moved = event("VM.UPDATE", vm(pool="api", ips=("10.0.0.2",)))
        self.lost_then_again([moved], [moved, event("VM.OFF", vm(power="OFF"))])
        self.assertEqual(self.host.members(), {})
        self.assertEqual(self.host.kv, {})

    def test_members_a_lost_off_removed_are_added_again_when_the_batch_turns_the_vm_back_on(self):
        self.handle(event("VM.ON", vm()))
        off = event("VM.OFF", vm(power="OFF"))
        self.lost_then_again([off], [off, event("VM.ON", vm())])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})

    def test_what_a_lost_attempt_passed_through_stays_while_another_vm_claims_it(self):
        self.handle(event("VM.ON", vm("other", pool="api")))
        self.handle(event("VM.ON", vm("vm-1", pool="web")))
        through = event("VM.UPDATE", vm("vm-1", pool="api"))
        self.lost_then_again([through], [through, event("VM.UPDATE", vm("vm-1", pool="web"))])
        self.assertEqual(self.host.members(), {"/Common/api": ["10.0.0.1:80"], "/Common/web": ["10.0.0.1:80"]})
        self.handle(event("VM.DELETE", None, uuid="other"))
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})

    def test_an_address_two_vms_claim_stays_until_the_last_lets_go(self):
        self.handle(event("VM.ON", vm("a")), event("VM.ON", vm("b")))
        self.handle(event("VM.OFF", vm("a")))
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})
        self.handle(event("VM.DELETE", None, uuid="b"))
        self.assertEqual(self.host.members(), {})
        self.assertEqual(self.host.kv, {})

    def test_server_errors_and_connection_failures_ask_for_a_retry(self):
        self.host.fail = [(503, [("Retry-After", "7")])]
        [out] = self.handle(event("VM.ON", vm()))
        self.assertEqual(out[0], "retry")
        self.assertEqual(out[2], 7000)
        self.assertIn("HTTP 503", out[1])
        self.host.fail = [f5sync.HttpFailure("connection-failed", "refused")]
        [out] = self.handle(event("VM.ON", vm()))
        self.assertEqual((out[0], out[2]), ("retry", None))
        self.assertIn("refused", out[1])
        self.assertEqual(self.host.members(), {})
        self.assertNotIn("vm/c1/vm-1", self.host.kv)
        self.assertEqual(self.handle(event("VM.ON", vm())), [f5sync.DONE])

    def test_a_retry_keeps_the_progress_made_before_the_failure(self):
        self.handle(event("VM.ON", vm(ips=("10.0.0.1",))))
        self.host.fail = [None, 500]  # the DELETE goes through, the POST fails
        [out] = self.handle(event("VM.UPDATE", vm(ips=("10.0.0.2",))))
        self.assertEqual(out[0], "retry")
        self.assertEqual(self.host.members(), {})
        self.assertNotIn("vm/c1/vm-1", self.host.kv, "the removal is recorded, the failed add is not")
        self.assertEqual(self.handle(event("VM.UPDATE", vm(ips=("10.0.0.2",)))), [f5sync.DONE])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.2:80"]})

    def test_the_hosts_request_limit_asks_for_an_immediate_retry_and_keeps_progress(self):
        self.host.fail = [None, f5sync.HttpFailure("limit-exceeded", "16 requests per call")]
        [out] = self.handle(event("VM.ON", vm(ips=("10.0.0.1", "10.0.0.2"))))
        self.assertEqual(out[0], "retry")
        self.assertEqual(out[2], 0)
        self.assertEqual(json.loads(self.host.kv["vm/c1/vm-1"]), [["/Common/web", "10.0.0.1:80"]])
        self.assertEqual(self.handle(event("VM.ON", vm(ips=("10.0.0.1", "10.0.0.2")))), [f5sync.DONE])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80", "10.0.0.2:80"]})

    def test_a_refused_credential_asks_for_a_retry_not_a_dead_letter(self):
        for status in (401, 403):
            self.host.fail = [status]
            [out] = self.handle(event("VM.ON", vm()))
            self.assertEqual(out[0], "retry", status)
            self.assertIn(f"HTTP {status}", out[1])
        self.assertEqual(self.handle(event("VM.ON", vm())), [f5sync.DONE])

    def test_client_errors_reject_with_bigips_message(self):
        self.host.fail = [400]
        [out] = self.handle(event("VM.ON", vm()))
        self.assertEqual(out[0], "reject")
        self.assertIn("HTTP 400", out[1])
        self.assertIn("boom", out[1])

    def test_a_missing_pool_rejects_and_says_so(self):
        [out] = self.handle(event("VM.ON", vm(pool="nosuch")))
        self.assertEqual(out[0], "reject")
        self.assertIn("/Common/nosuch does not exist", out[1])

    def test_a_missing_pool_does_not_keep_the_vm_out_of_its_other_pools(self):
        pools = [NS(key="F5Pool", value="nosuch"), NS(key="F5Pool", value="web")]
        [out] = self.handle(event("VM.ON", vm(categories=pools)))
        self.assertEqual(out[0], "reject")
        self.assertIn("/Common/nosuch does not exist", out[1])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})
        # Recorded, so that its VM going takes it away.
        self.handle(event("VM.OFF", vm(categories=pools, power="OFF")))
        self.assertEqual(self.host.members(), {})

    def test_a_member_is_created_in_the_pools_partition(self):
        self.host = FakeHost(pools=("/Tenant/web",))
        self.config = config(partition="Tenant")
        [out] = self.handle(event("VM.ON", vm()))
        self.assertEqual(out, f5sync.DONE)
        posts = [body for method, _, body in self.host.requests if method == "POST"]
        self.assertEqual([p["partition"] for p in posts], ["Tenant"])

    def test_a_retry_after_counts_for_at_most_a_day_and_nonsense_for_nothing(self):
        def asked(value):
            return f5sync.retry_after_ms([("Retry-After", value)])
        self.assertEqual(asked("1e30"), f5sync.MAX_RETRY_AFTER_MS)
        self.assertEqual(asked("3"), 3000)
        self.assertIsNone(asked("nan"))
        self.assertIsNone(asked("inf"))

    def test_policy_denial_rejects(self):
        self.host.fail = [f5sync.HttpFailure("denied", "origin not allowed")]
        [out] = self.handle(event("VM.ON", vm()))
        self.assertEqual(out[0], "reject")

    def test_one_failing_vm_does_not_hold_back_another(self):
        self.host.fail = [503]
        out = self.handle(event("VM.ON", vm("a", ips=("10.0.0.1",))), event("VM.ON", vm("b", ips=("10.0.0.2",))))
        self.assertEqual([o[0] for o in out], ["retry", "done"])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.2:80"]})

    def test_other_events_are_done_without_requests(self):
        out = self.handle(event("SUBNET.CREATE", None, uuid="s"), event("VM.UPDATE", None))
        self.assertEqual(out, [f5sync.DONE, f5sync.DONE])
        self.assertEqual(self.host.requests, [])

    def test_one_outcome_per_event_in_order(self):
        out = self.handle(event("VM.ON", vm("a")), event("X.Y", None, uuid="x"),
                          event("VM.ON", vm("b", pool="nosuch")), event("VM.OFF", vm("a")))
        self.assertEqual([o[0] for o in out], ["done", "done", "reject", "done"])


class ReconcileTests(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost()
        self.config = config()

    def test_reconcile_adds_missing_members_and_removes_vms_gone_from_the_inventory(self):
        f5sync.handle(self.config, self.host, [event("VM.ON", vm("gone", ips=("10.0.0.8",)))])
        summary = f5sync.reconcile(self.config, self.host, "c1", [vm("a"), vm("b", ips=("10.0.0.2",), power="OFF")])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})
        self.assertEqual(sorted(self.host.kv), ["member//Common/web/10.0.0.1:80", "vm/c1/a"])
        self.assertIn("1 members added, 1 removed", summary)

    def test_reconcile_restores_a_member_removed_behind_the_plugins_back(self):
        f5sync.handle(self.config, self.host, [event("VM.ON", vm())])
        self.host.pools["/Common/web"].clear()
        f5sync.reconcile(self.config, self.host, "c1", [vm()])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})

    def test_a_member_one_vm_lets_go_is_added_back_for_a_later_vm_that_wants_it(self):
        # b's events were lost: only a's record holds the address.
        f5sync.handle(self.config, self.host, [event("VM.ON", vm("a"))])
        before = len(self.host.requests)
        f5sync.reconcile(self.config, self.host, "c1", [vm("a", power="OFF"), vm("b")])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})
        self.assertIn("vm/c1/b", self.host.kv)
        self.assertEqual(f5sync.load_owners(self.host, "/Common/web", "10.0.0.1:80"),
                         {"c1/b"})
        # Left in its pool for b, not removed and added again.
        self.assertEqual([r[0] for r in self.host.requests[before:]], ["GET"])

    def test_reconcile_leaves_a_member_added_by_hand_off_the_record(self):
        self.host.add_by_hand("/Common/web", "10.0.0.1:80")
        f5sync.reconcile(self.config, self.host, "c1", [vm("a")])
        self.assertEqual([r[0] for r in self.host.requests], ["GET"])
        self.assertNotIn("vm/c1/a", self.host.kv)
        f5sync.reconcile(self.config, self.host, "c1", [vm("a", power="OFF")])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})

    def test_reconcile_takes_the_plugins_own_unrecorded_member_on_record_without_a_request(self):
        self.host.add_by_hand("/Common/web", "10.0.0.1:80", f5sync.MANAGED)
        f5sync.reconcile(self.config, self.host, "c1", [vm("a")])
        self.assertEqual([r[0] for r in self.host.requests], ["GET"])
        self.assertIn("vm/c1/a", self.host.kv)
        f5sync.reconcile(self.config, self.host, "c1", [vm("a", power="OFF")])
        self.assertEqual(self.host.members(), {})

    def test_reconcile_in_step_sends_only_reads(self):
        f5sync.handle(self.config, self.host, [event("VM.ON", vm())])
        before = len(self.host.requests)
        summary = f5sync.reconcile(self.config, self.host, "c1", [vm()])
        self.assertEqual([r[0] for r in self.host.requests[before:]], ["GET"])
        self.assertIn("0 members added, 0 removed", summary)

    def test_reconcile_leaves_other_clusters_alone(self):
        f5sync.handle(self.config, self.host, [event("VM.ON", vm("x", ips=("10.9.9.9",)), cluster="c2")])
        f5sync.reconcile(self.config, self.host, "c1", [])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.9.9.9:80"]})

    def test_reconcile_reports_a_missing_pool_without_failing(self):
        summary = f5sync.reconcile(self.config, self.host, "c1", [vm(pool="nosuch"), vm("b", ips=("10.0.0.2",))])
        self.assertIn("does not exist", summary)
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.2:80"]})

    def test_reconcile_raises_a_retry_when_bigip_is_down(self):
        self.host.fail = [503]
        with self.assertRaises(f5sync.Failure) as caught:
            f5sync.reconcile(self.config, self.host, "c1", [vm()])
        self.assertEqual(caught.exception.outcome[0], "retry")


class PagedReconcileTests(unittest.TestCase):
    def setUp(self):
        self.host = FakeHost()
        self.config = config()

    def reconcile(self, *pages):
        return f5sync.reconcile_paged(self.config, self.host, "c1", iter(pages))

    def test_it_ends_where_the_whole_list_reconcile_does(self):
        f5sync.handle(self.config, self.host, [event("VM.ON", vm("gone", ips=("10.0.0.8",)))])
        summary = self.reconcile([vm("a")], [], [vm("b", ips=("10.0.0.2",), power="OFF")])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80"]})
        self.assertEqual(sorted(self.host.kv), ["member//Common/web/10.0.0.1:80", "vm/c1/a"])
        self.assertEqual(summary, "2 VMs: 1 members added, 1 removed")

    def test_vms_in_no_pool_and_without_a_record_are_not_looked_up(self):
        f5sync.handle(self.config, self.host, [event("VM.ON", vm("kept", ips=("10.0.0.9",)))])
        self.host.kv_reads.clear()
        others = [vm(f"other-{i}", pool=None) for i in range(1_000)]
        summary = self.reconcile(others[:500], others[500:] + [vm("kept", ips=("10.0.0.9",))])
        self.assertEqual({k for k in self.host.kv_reads if k.startswith("vm/")}, {"vm/c1/kept"})
        self.assertEqual(summary, "1001 VMs: 0 members added, 0 removed")

    def test_a_failure_midway_keeps_the_records_of_what_it_changed(self):
        # BIG-IP takes a and b, then fails: the host discards the writes
        # since the last commit, and the records of a and b must survive it.
        self.host.fail = [None, None, None, 503]
        with self.assertRaises(f5sync.Failure) as caught:
            self.reconcile([vm("a"), vm("b", ips=("10.0.0.2",))], [vm("c", ips=("10.0.0.3",))])
        self.assertEqual(caught.exception.outcome[0], "retry")
        self.host.discard_uncommitted()
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.1:80", "10.0.0.2:80"]})
        self.assertIn("vm/c1/a", self.host.kv)
        # VM a goes while nobody hears of it: the next reconcile takes its
        # member away, which it could not without the record.
        self.reconcile([vm("b", ips=("10.0.0.2",))], [vm("c", ips=("10.0.0.3",))])
        self.assertEqual(self.host.members(), {"/Common/web": ["10.0.0.2:80", "10.0.0.3:80"]})
        self.assertNotIn("vm/c1/a", self.host.kv)

    def test_records_are_committed_every_hundred_vms(self):
        vms = [vm(f"v{i}", ips=(f"10.1.{i // 250}.{i % 250 + 1}",)) for i in range(250)]
        self.reconcile(vms[:120], vms[120:])
        self.assertEqual(self.host.commits, 2)  # after 100 and 200; the host commits the rest
        self.assertEqual(len(self.host.members()["/Common/web"]), 250)


if __name__ == "__main__":
    unittest.main()
