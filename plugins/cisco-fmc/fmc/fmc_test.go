package fmc

import (
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

func config(t *testing.T, extra string) *Config {
	t.Helper()
	text := `{"fmc": "https://fmc.test"` + extra + `}`
	c, err := ParseConfig(text)
	if err != nil {
		t.Fatalf("ParseConfig(%s): %v", text, err)
	}
	return c
}

func vm(uuid, power string, categories map[string]string, ips ...string) *Vm {
	v := &Vm{Uuid: uuid, PowerState: power, Nics: [][]string{ips}}
	for k, val := range categories {
		v.Categories = append(v.Categories, Category{k, val})
	}
	return v
}

func event(kind, uuid string, v *Vm) Event {
	return Event{Id: kind + "-" + uuid, Cluster: "lab", EventType: kind, EntityKind: "vm", EntityUuid: uuid, Attempt: 1, Vm: v}
}

func expectMappings(t *testing.T, h *fakeHost, want map[string][]string) {
	t.Helper()
	got := h.fmc.mappings()
	for name, ips := range got {
		if len(ips) == 0 {
			delete(got, name)
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("FMC mappings:\n got %v\nwant %v", got, want)
	}
}

func allDone(t testing.TB, outcomes []Outcome) {
	t.Helper()
	for i, o := range outcomes {
		if o.Kind != Done {
			t.Fatalf("outcome %d: %+v", i, o)
		}
	}
}

func TestConfigRefusesUnknownKeysAndMissingFMC(t *testing.T) {
	cases := map[string]string{
		`{}`:                                     "`fmc`",
		`{"fmc":"https://f","tag_prefx":"x"}`:    "unknown field \"tag_prefx\"",
		`{"fmc":"ftp://f"}`:                      "http(s) URL",
		`{"fmc":"https://u:p@f"}`:                "no credentials",
		`{"fmc":"https://f","tag_prefix":"a b"}`: "tag_prefix",
		`{"fmc":"https://f","category_tag":"{prefix}.{nope}"}`: "unknown placeholder",
		`{"fmc":"https://f","category_tag":"other.{key}"}`:     "must start with `{prefix}.`",
		`{"fmc":"https://f","static_tag":"elsewhere"}`:         "must start with `ntnx.`",
		`{"fmc":"https://f","max_request_bytes":10}`:           "max_request_bytes",
		`not json`: "configuration",
	}
	// Names FMC could not hold.
	cases[fmt.Sprintf(`{"fmc":"https://f","tag_prefix":%q}`, strings.Repeat("p", MaxPrefixLen+1))] = "at most 118"
	cases[fmt.Sprintf(`{"fmc":"https://f","tag_prefix":%q,"static_tag":"{prefix}.%s"}`,
		strings.Repeat("p", 100), strings.Repeat("s", 30))] = "at most 128"
	for text, want := range cases {
		_, err := ParseConfig(text)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseConfig(%s) = %v, want an error naming %s", text, err, want)
		}
	}
	c := config(t, `, "domain": "Global/East", "categories": ["App"]`)
	if c.Domain != "Global/East" || !c.Categories["App"] || c.StaticTag != "ntnx.managed" || c.Base != "https://fmc.test" {
		t.Fatalf("%+v", c)
	}
}

func TestNamesAreSanitisedAndLongOnesCutWithAHash(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	got := c.Objects(h, "lab", vm("u", "ON", map[string]string{"App Tier": "web/frontend"}))
	want := []string{"ntnx.App_Tier.web_frontend", "ntnx.managed"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v want %v", got, want)
	}
	long1 := LimitLength("ntnx." + strings.Repeat("a", 200) + "1")
	long2 := LimitLength("ntnx." + strings.Repeat("a", 200) + "2")
	if len(long1) != MaxNameLen || long1 == long2 || !validName(long1) {
		t.Fatalf("%q / %q", long1, long2)
	}
	// The longest prefix allowed: a category's name cut to 128 is still
	// known as the plugin's.
	prefix := strings.Repeat("p", MaxPrefixLen)
	c = config(t, `, "tag_prefix": "`+prefix+`"`)
	names := c.Objects(h, "lab", vm("u", "ON", map[string]string{"App": strings.Repeat("v", 50)}))
	for _, name := range names {
		if len(name) > MaxNameLen || !c.owns(name) {
			t.Fatalf("%q: %d characters, owned %v", name, len(name), c.owns(name))
		}
	}
}

func TestVmClusterPlaceholderAsksTheHostAndSkipsUnknownClusters(t *testing.T) {
	c := config(t, `, "category_tag": "{prefix}.CL-{vm_cluster}.{key}.{value}"`)
	h := newHost(t)
	h.clusters["u1"] = "east 1"
	if got := c.Objects(h, "lab", vm("u1", "ON", map[string]string{"App": "web"})); !reflect.DeepEqual(got, []string{"ntnx.CL-east_1.App.web", "ntnx.managed"}) {
		t.Fatal(got)
	}
	if got := c.Objects(h, "lab", vm("u2", "ON", map[string]string{"App": "web"})); !reflect.DeepEqual(got, []string{"ntnx.managed"}) {
		t.Fatal(got)
	}
}

func TestLifecycleCreatesObjectsMapsMovesAndUnmaps(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	web := map[string]string{"App": "web"}
	allDone(t, Handle(c, h, []Event{
		event("VM.CREATE", "u1", vm("u1", "OFF", web, "10.0.0.1")),
		event("VM.ON", "u1", vm("u1", "ON", web, "10.0.0.1")),
	}))
	expectMappings(t, h, map[string][]string{"ntnx.App.web": {"10.0.0.1"}, "ntnx.managed": {"10.0.0.1"}})

	// A category change moves the address between objects in one request.
	before := len(h.fmc.requests)
	allDone(t, Handle(c, h, []Event{event("VM.UPDATE", "u1", vm("u1", "ON", map[string]string{"App": "db"}, "10.0.0.1"))}))
	expectMappings(t, h, map[string][]string{"ntnx.App.db": {"10.0.0.1"}, "ntnx.managed": {"10.0.0.1"}})
	posts := 0
	for _, r := range h.fmc.requests[before:] {
		if strings.HasPrefix(r, "POST "+domainPath+"dynamicobjectmappings") {
			posts++
		}
	}
	if posts != 1 {
		t.Fatalf("%d bulk mapping requests: %v", posts, h.fmc.requests[before:])
	}

	allDone(t, Handle(c, h, []Event{event("VM.OFF", "u1", vm("u1", "OFF", web, "10.0.0.1"))}))
	expectMappings(t, h, map[string][]string{})
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u1", vm("u1", "ON", web, "10.0.0.1"))}))
	// VM.DELETE carries no body: the plugin undoes what kv says.
	allDone(t, Handle(c, h, []Event{event("VM.DELETE", "u1", nil)}))
	expectMappings(t, h, map[string][]string{})
	if keys, _ := h.KvList(vmPrefix); len(keys) != 0 {
		t.Fatalf("records left: %v", keys)
	}
}

func TestAnAddressSharedByTwoVmsStaysWhileEitherWantsIt(t *testing.T) {
	c := config(t, `, "static_tag": ""`)
	h := newHost(t)
	allDone(t, Handle(c, h, []Event{
		event("VM.ON", "a", vm("a", "ON", map[string]string{"App": "web"}, "10.0.0.9")),
		event("VM.ON", "b", vm("b", "ON", map[string]string{"App": "web"}, "10.0.0.9")),
	}))
	allDone(t, Handle(c, h, []Event{event("VM.DELETE", "a", nil)}))
	expectMappings(t, h, map[string][]string{"ntnx.App.web": {"10.0.0.9"}})
	allDone(t, Handle(c, h, []Event{event("VM.DELETE", "b", nil)}))
	expectMappings(t, h, map[string][]string{})
}

// lostThenAgain handles first as an attempt whose host died after FMC took
// its change and before kv stored its writes, then again: the batch the
// next host is delivered, first once more and what came after it.
func lostThenAgain(t *testing.T, c *Config, h *fakeHost, first, again []Event) {
	t.Helper()
	stored := map[string][]byte{}
	for k, v := range h.kv {
		stored[k] = v
	}
	Handle(c, h, first)
	h.kv = stored
	allDone(t, Handle(c, h, again))
}

func TestABatchFMCTookButKvLostIsUndoneWhenDeliveredAgainWithALaterOff(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u1", vm("u1", "ON", map[string]string{"App": "web"}, "10.0.0.1"))}))
	moved := event("VM.UPDATE", "u1", vm("u1", "ON", map[string]string{"App": "db"}, "10.0.0.2"))
	lostThenAgain(t, c, h, []Event{moved}, []Event{moved, event("VM.OFF", "u1", nil)})
	expectMappings(t, h, map[string][]string{})
	for _, prefix := range []string{vmPrefix, ipPrefix} {
		if keys, _ := h.KvList(prefix); len(keys) != 0 {
			t.Fatalf("records left: %v", keys)
		}
	}
}

func TestWhatALostAttemptTookAwayIsAddedAgainWhenTheBatchBringsItBack(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	web := vm("u1", "ON", map[string]string{"App": "web"}, "10.0.0.1")
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u1", web)}))
	want := map[string][]string{"ntnx.App.web": {"10.0.0.1"}, "ntnx.managed": {"10.0.0.1"}}
	away := event("VM.UPDATE", "u1", vm("u1", "ON", map[string]string{"App": "db"}, "10.0.0.1"))
	lostThenAgain(t, c, h, []Event{away}, []Event{away, event("VM.UPDATE", "u1", web)})
	expectMappings(t, h, want)
	off := event("VM.OFF", "u1", nil)
	lostThenAgain(t, c, h, []Event{off}, []Event{off, event("VM.ON", "u1", web)})
	expectMappings(t, h, want)
}

func TestAShortRateLimitIsWaitedOutAndALongOneBecomesARetryWithItsDelay(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	h.fmc.throttle, h.fmc.retryAfter = 1, "1"
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u1", vm("u1", "ON", nil, "10.0.0.1"))}))
	if !reflect.DeepEqual(h.slept, []time.Duration{time.Second}) {
		t.Fatalf("slept %v", h.slept)
	}
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.0.0.1"}})

	h.fmc.throttle, h.fmc.retryAfter = 1, "45"
	out := Handle(c, h, []Event{event("VM.ON", "u2", vm("u2", "ON", nil, "10.0.0.2"))})
	if out[0].Kind != Retry || out[0].Delay != 45*time.Second || !strings.Contains(out[0].Reason, "429") {
		t.Fatalf("%+v", out[0])
	}
	// Nothing was recorded, so the retry sends the change again.
	if _, found, _ := h.KvGet(vmPrefix + VmKey("lab", "u2")); found {
		t.Fatal("a VM record was written for a change FMC never took")
	}
	h.fmc.throttle, h.fmc.retryAfter = 1, ""
	out = Handle(c, h, []Event{event("VM.ON", "u2", vm("u2", "ON", nil, "10.0.0.2"))})
	if out[0].Delay != 30*time.Second {
		t.Fatalf("without Retry-After the configured delay applies: %+v", out[0])
	}
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u2", vm("u2", "ON", nil, "10.0.0.2"))}))
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.0.0.1", "10.0.0.2"}})
}

// A call's waits come to rate_limit_wait in all, however many requests
// meet a 429: the call's deadline must hold them and its requests.
func TestTheWaitsOfOneCallComeToTheRateLimitWaitInAll(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	h.fmc.throttle, h.fmc.retryAfter = 2, "1.5"
	out := Handle(c, h, []Event{event("VM.ON", "u1", vm("u1", "ON", nil, "10.0.0.1"))})
	if out[0].Kind != Retry || out[0].Delay != 1500*time.Millisecond {
		t.Fatalf("%+v", out[0])
	}
	if !reflect.DeepEqual(h.slept, []time.Duration{1500 * time.Millisecond}) {
		t.Fatalf("slept %v: past the 2 s a call waits in all", h.slept)
	}
}

// Where Handle gives a long 429 back to the host, the paged reconcile
// waits it out, however many come: it has a deadline that grew with the
// inventory, and its retry would start over.
func TestThePagedReconcileWaitsOutLong429sThatHandleGivesBack(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	h.fmc.throttle, h.fmc.retryAfter = 3, "45"
	summary, err := PagedReconcile(c, h, "lab", pagesOf([]Vm{*vm("u1", "ON", nil, "10.0.0.1")}, 1))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(h.slept, []time.Duration{45 * time.Second, 45 * time.Second, 45 * time.Second}) {
		t.Fatalf("slept %v", h.slept)
	}
	if !strings.Contains(summary, "1 addresses added") {
		t.Fatalf("%q", summary)
	}
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.0.0.1"}})

	// Past a minute, or past ten in a row, it gives up like Handle does.
	h.fmc.throttle, h.fmc.retryAfter = 1, "90"
	if _, err := PagedReconcile(c, h, "lab", pagesOf(nil, 1)); err == nil || !strings.Contains(err.Error(), "429") {
		t.Fatalf("%v", err)
	}
	h.fmc.throttle, h.fmc.retryAfter = 11, "1"
	if _, err := PagedReconcile(c, h, "lab", pagesOf(nil, 1)); err == nil || !strings.Contains(err.Error(), "429") {
		t.Fatalf("%v", err)
	}
}

func TestARefusedVmIsRejectedAloneAndTheRestOfTheBatchApplies(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	h.fmc.refuse = "10.0.0.66"
	out := Handle(c, h, []Event{
		event("VM.ON", "good", vm("good", "ON", nil, "10.0.0.1")),
		event("VM.ON", "bad", vm("bad", "ON", nil, "10.0.0.66")),
	})
	if out[0].Kind != Done || out[1].Kind != Reject || !strings.HasPrefix(out[1].Reason, "[fmc-refused] ") ||
		!strings.Contains(out[1].Reason, "Invalid mapping 10.0.0.66") {
		t.Fatalf("%+v", out)
	}
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.0.0.1"}})
}

func TestAddressesNoOtherMachineReachesAreNotMapped(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	allDone(t, Handle(c, h, []Event{
		event("VM.ON", "u1", vm("u1", "ON", nil, "fe80::5054:ff:fe12:3456", "127.0.0.1", "::", "ff02::1", "10.0.0.1")),
	}))
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.0.0.1"}})
}

func TestABatchPastTheCallsRequestsIsRetriedAndItsOtherVmsAreNotTriedAlone(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	h.fmc.refuse = "10.0.0.66"
	// Objects and domain looked up and remembered first.
	allDone(t, Handle(c, h, []Event{event("VM.ON", "warm", vm("warm", "ON", nil, "10.0.0.9"))}))
	// Enough for the batch's bulk change, which FMC refuses: the first VM
	// tried alone finds the call's requests spent.
	left := 1
	h.requestsLeft = &left
	out := Handle(c, h, []Event{
		event("VM.ON", "bad", vm("bad", "ON", nil, "10.0.0.66")),
		event("VM.ON", "a", vm("a", "ON", nil, "10.0.0.1")),
		event("VM.ON", "b", vm("b", "ON", nil, "10.0.0.2")),
	})
	for _, o := range out {
		if o.Kind != Retry || !strings.Contains(o.Reason, "limit exceeded") {
			t.Fatalf("past the share: %+v", out)
		}
	}
	if h.overShare != 1 {
		t.Fatalf("%d requests past the share: the VMs after the first were tried alone", h.overShare)
	}
}

func TestARequestTheHostRefusesIsRejectedNotRetried(t *testing.T) {
	// The fake host's allowlist holds https://fmc.test only.
	c := config(t, "")
	c.Base = "https://elsewhere.test"
	out := Handle(c, newHost(t), []Event{event("VM.ON", "u1", vm("u1", "ON", nil, "10.0.0.1"))})
	if out[0].Kind != Reject || !strings.HasPrefix(out[0].Reason, "[host-refused] ") ||
		!strings.Contains(out[0].Reason, "allowlist") {
		t.Fatalf("%+v", out[0])
	}
}

func TestAHugeRetryAfterCountsForADay(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	h.fmc.throttle, h.fmc.retryAfter = 1, "1e30"
	out := Handle(c, h, []Event{event("VM.ON", "u1", vm("u1", "ON", nil, "10.0.0.1"))})
	if out[0].Kind != Retry || out[0].Delay != 24*time.Hour {
		t.Fatalf("%+v", out[0])
	}
}

func TestAnObjectDeletedBehindThePluginsBackIsMadeAgain(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u1", vm("u1", "ON", nil, "10.0.0.1"))}))
	id := h.fmc.objects["ntnx.managed"]
	delete(h.fmc.objects, "ntnx.managed")
	delete(h.fmc.maps, id)
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u2", vm("u2", "ON", nil, "10.0.0.2"))}))
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.0.0.2"}})
	// and reconcile restores the first VM's address too.
	if _, err := Reconcile(c, h, "lab", []Vm{*vm("u1", "ON", nil, "10.0.0.1"), *vm("u2", "ON", nil, "10.0.0.2")}); err != nil {
		t.Fatal(err)
	}
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.0.0.1", "10.0.0.2"}})
}

// reconcilers are the two reconciles a host may call: the whole list
// (handler.reconcile, hosts before 0.1.2) and a page at a time
// (paged.reconcile), here in pages of two VMs so that every test crosses
// a page.
var reconcilers = []struct {
	name string
	run  func(c *Config, h Host, cluster string, vms []Vm) (string, error)
}{
	{"whole", Reconcile},
	{"paged", func(c *Config, h Host, cluster string, vms []Vm) (string, error) {
		return PagedReconcile(c, h, cluster, pagesOf(vms, 2))
	}},
}

func pagesOf(vms []Vm, size int) Pages {
	return func() ([]Vm, bool) {
		if len(vms) == 0 {
			return nil, false
		}
		page := vms[:min(size, len(vms))]
		vms = vms[len(page):]
		return page, true
	}
}

func TestReconcileRepairsOwnedObjectsAndNeverTouchesOthers(t *testing.T) {
	for _, reconcile := range reconcilers {
		t.Run(reconcile.name, func(t *testing.T) {
			c := config(t, "")
			h := newHost(t)
			allDone(t, Handle(c, h, []Event{
				event("VM.ON", "u1", vm("u1", "ON", map[string]string{"App": "web"}, "10.0.0.1")),
				event("VM.ON", "gone", vm("gone", "ON", nil, "10.0.0.7")),
			}))
			// Drift: a mapping lost, a stray one added, and others' objects,
			// some named near the prefix. FMC's filter is left out, so that
			// ownership rests on the plugin's own check.
			delete(h.fmc.maps[h.fmc.objects["ntnx.App.web"]], "10.0.0.1")
			h.fmc.maps[h.fmc.objects["ntnx.managed"]]["192.0.2.50"] = true
			h.fmc.ignoreFilter = true
			for _, other := range []string{"corp.servers", "ntnxfoo", "NTNX.upper"} {
				h.fmc.nextID++
				h.fmc.objects[other] = "other-" + other
				h.fmc.maps["other-"+other] = map[string]bool{"172.16.0.1": true}
			}

			summary, err := reconcile.run(c, h, "lab", []Vm{
				*vm("u1", "ON", map[string]string{"App": "web"}, "10.0.0.1"),
				*vm("u3", "ON", nil, "10.0.0.3", "not-an-ip"),
			})
			if err != nil {
				t.Fatal(err)
			}
			expectMappings(t, h, map[string][]string{
				"ntnx.App.web": {"10.0.0.1"},
				"ntnx.managed": {"10.0.0.1", "10.0.0.3"},
				"corp.servers": {"172.16.0.1"},
				"ntnxfoo":      {"172.16.0.1"},
				"NTNX.upper":   {"172.16.0.1"},
			})
			for _, want := range []string{"2 VMs, 2 objects owned", "2 addresses added", "2 removed", "1 VMs gone", "1 values skipped"} {
				if !strings.Contains(summary, want) {
					t.Errorf("summary %q lacks %q", summary, want)
				}
			}
			// A second reconcile finds nothing to do.
			summary, err = reconcile.run(c, h, "lab", []Vm{*vm("u1", "ON", map[string]string{"App": "web"}, "10.0.0.1"), *vm("u3", "ON", nil, "10.0.0.3")})
			if err != nil || !strings.Contains(summary, "0 addresses added, 0 removed") {
				t.Fatalf("%q %v", summary, err)
			}
		})
	}
}

func TestReconcileOfOneClusterKeepsAnotherClustersAddresses(t *testing.T) {
	for _, reconcile := range reconcilers {
		t.Run(reconcile.name, func(t *testing.T) {
			c := config(t, "")
			h := newHost(t)
			east := event("VM.ON", "e1", vm("e1", "ON", nil, "10.1.0.1"))
			east.Cluster = "east"
			allDone(t, Handle(c, h, []Event{east, event("VM.ON", "w1", vm("w1", "ON", nil, "10.2.0.1"))}))
			if _, err := reconcile.run(c, h, "lab", []Vm{}); err != nil {
				t.Fatal(err)
			}
			expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.1.0.1"}})
		})
	}
}

// Thousands of VMs: Prism's pages, kv's pages of keys and FMC's pages of
// mappings (1,000 each) all run out mid-object.
func TestThePagedReconcileConvergesOverManyPagesAndWritesNothingWhenInStep(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	var vms []Vm
	for i := 0; i < 2_500; i++ {
		tier := map[string]string{"Tier": []string{"web", "app"}[i%2]}
		vms = append(vms, *vm(fmt.Sprintf("u%04d", i), "ON", tier, fmt.Sprintf("10.8.%d.%d", i/250, i%250+1)))
	}
	// Events for the first 2,000 only, and FMC drifts: 50 mappings lost, 30
	// strays; then 100 VMs go without a word.
	var events []Event
	for i := range vms[:2_000] {
		events = append(events, event("VM.ON", vms[i].Uuid, &vms[i]))
	}
	allDone(t, Handle(c, h, events))
	managed := h.fmc.maps[h.fmc.objects["ntnx.managed"]]
	for i := 0; i < 50; i++ {
		delete(managed, vms[i*7].Nics[0][0])
	}
	for i := 0; i < 30; i++ {
		managed[fmt.Sprintf("192.0.2.%d", i+1)] = true
	}
	vms = vms[100:]

	summary, err := PagedReconcile(c, h, "lab", pagesOf(vms, 500))
	if err != nil {
		t.Fatal(err)
	}
	truth := map[string][]string{}
	for _, v := range vms {
		ip := v.Nics[0][0]
		truth["ntnx.managed"] = append(truth["ntnx.managed"], ip)
		name := "ntnx.Tier." + v.Categories[0].Value
		truth[name] = append(truth[name], ip)
	}
	for _, ips := range truth {
		sort.Strings(ips)
	}
	expectMappings(t, h, truth)
	// Added: 500 VMs new to the records, in two objects each, and the 50
	// lost mappings but the 15 of VMs gone since (u0000 to u0098). Removed:
	// the 30 strays and the gone VMs' two mappings each, but those 15.
	want := fmt.Sprintf("2400 VMs, 3 objects owned: %d addresses added, %d removed, 100 VMs gone", 500*2+50-15, 30+100*2-15)
	if !strings.Contains(summary, want) {
		t.Fatalf("summary %q lacks %q", summary, want)
	}
	if h.keyPages < 6 {
		t.Fatalf("%d pages of kv keys for 2,400 VMs' and addresses' records", h.keyPages)
	}

	writes := h.writes
	summary, err = PagedReconcile(c, h, "lab", pagesOf(vms, 500))
	if err != nil || !strings.Contains(summary, "0 addresses added, 0 removed, 0 VMs gone") {
		t.Fatalf("%q %v", summary, err)
	}
	if h.writes != writes {
		t.Fatalf("a reconcile with nothing to change wrote kv %d times", h.writes-writes)
	}
}

// What a host that died mid-batch can leave: an address record naming a
// VM that no longer holds the address, and another cluster's VM whose
// address record lost its entry.
func TestThePagedReconcileRepairsHalfWrittenAddressRecords(t *testing.T) {
	c := config(t, "")
	h := newHost(t)
	east := event("VM.ON", "e1", vm("e1", "ON", nil, "10.1.0.1"))
	east.Cluster = "east"
	allDone(t, Handle(c, h, []Event{east, event("VM.ON", "w1", vm("w1", "ON", nil, "10.2.0.1"))}))
	h.kv["ip/10.9.9.9"] = []byte(`{"lab/w1":["ntnx.managed"]}`)
	delete(h.kv, "ip/10.1.0.1")
	h.fmc.maps[h.fmc.objects["ntnx.managed"]]["10.9.9.9"] = true
	delete(h.fmc.maps[h.fmc.objects["ntnx.managed"]], "10.1.0.1")

	if _, err := PagedReconcile(c, h, "lab", pagesOf([]Vm{*vm("w1", "ON", nil, "10.2.0.1")}, 1)); err != nil {
		t.Fatal(err)
	}
	expectMappings(t, h, map[string][]string{"ntnx.managed": {"10.1.0.1", "10.2.0.1"}})
	if _, ok := h.kv["ip/10.9.9.9"]; ok {
		t.Fatal("the stale address record is still there")
	}
	if got := string(h.kv["ip/10.1.0.1"]); got != `{"east/e1":["ntnx.managed"]}` {
		t.Fatalf("east's address record: %s", got)
	}
}

func TestLargeChangesAreSplitUnderTheRequestLimit(t *testing.T) {
	c := config(t, `, "max_request_bytes": 4096`)
	h := newHost(t)
	var ips []string
	for i := 0; i < 600; i++ {
		ips = append(ips, "10.3."+strconv.Itoa(i/250)+"."+strconv.Itoa(i%250))
	}
	allDone(t, Handle(c, h, []Event{event("VM.ON", "big", vm("big", "ON", nil, ips...))}))
	if got := len(h.fmc.mappings()["ntnx.managed"]); got != 600 {
		t.Fatalf("%d mapped", got)
	}
	total := 0
	for _, size := range h.fmc.mappingBodies {
		if size > 4096 {
			t.Fatalf("a request of %d bytes: %v", size, h.fmc.mappingBodies)
		}
		total += size
	}
	if len(h.fmc.mappingBodies) < 2 || total < 600*12 {
		t.Fatalf("600 addresses in requests of %v bytes", h.fmc.mappingBodies)
	}
}

func TestADomainNameIsLookedUpOnceAndRemembered(t *testing.T) {
	c := config(t, `, "domain": "global"`)
	h := newHost(t)
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u1", vm("u1", "ON", nil, "10.0.0.1"))}))
	allDone(t, Handle(c, h, []Event{event("VM.ON", "u2", vm("u2", "ON", nil, "10.0.0.2"))}))
	lookups := 0
	for _, r := range h.fmc.requests {
		if strings.Contains(r, "/info/domain") {
			lookups++
		}
	}
	if lookups != 1 {
		t.Fatalf("%d domain lookups", lookups)
	}
	c = config(t, `, "domain": "Global/Nowhere"`)
	out := Handle(c, newHost(t), []Event{event("VM.ON", "u1", vm("u1", "ON", nil, "10.0.0.1"))})
	if out[0].Kind != Reject || !strings.Contains(out[0].Reason, `no domain named "Global/Nowhere" (FMC has: Global)`) {
		t.Fatalf("%+v", out[0])
	}
}

func TestEventsOfOtherKindsAreDoneWithoutARequest(t *testing.T) {
	c := config(t, `, "subscriptions": ["SUBNET.CREATE", "VM.ON"]`)
	h := newHost(t)
	subnet := Event{Id: "s1", Cluster: "lab", EventType: "SUBNET.CREATE", EntityKind: "subnet", EntityUuid: "s-1", Attempt: 1}
	allDone(t, Handle(c, h, []Event{subnet}))
	if len(h.fmc.requests) != 0 {
		t.Fatalf("requests for a subnet: %v", h.fmc.requests)
	}
}
