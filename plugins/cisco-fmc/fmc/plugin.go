package fmc

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Name and Version are what Init reports.
const (
	Name    = "cisco-fmc"
	Version = "0.1.1"
)

// poweredOn says whether a VM counts as on. VM.ON and VM.OFF decide
// themselves; otherwise only an explicit OFF is off, as an absent state most
// likely comes from a payload that does not say.
func poweredOn(eventType, powerState string) bool {
	switch eventType {
	case "VM.ON":
		return true
	case "VM.OFF":
		return false
	}
	return !strings.EqualFold(strings.TrimSpace(powerState), "OFF")
}

// intended is what one event asks for: the VM's new contribution, or nil
// when the event carries nothing to act on.
func (c *Config) intended(host Host, event Event) IPObjects {
	// An operator may subscribe the plugin to more than VMs; only VMs have
	// addresses to map.
	if event.EntityKind != "vm" {
		host.Log(Debug, fmt.Sprintf("%s (%s %s): not a VM, nothing to map", event.EventType, event.EntityKind, event.EntityUuid))
		return nil
	}
	switch event.EventType {
	case "VM.DELETE", "VM.OFF":
		return IPObjects{}
	}
	if event.Vm == nil {
		host.Log(Warn, fmt.Sprintf("%s for VM %s (%s) carries no VM body; nothing to do until the next reconcile",
			event.EventType, event.EntityUuid, event.Cluster))
		return nil
	}
	if !poweredOn(event.EventType, event.Vm.PowerState) {
		return IPObjects{}
	}
	wanted, invalid := c.Wanted(host, event.Cluster, event.Vm)
	if len(invalid) > 0 {
		host.Log(Warn, fmt.Sprintf("VM %s (%s): skipping values that are not IP addresses: %q", event.Vm.Uuid, event.Cluster, invalid))
	}
	return wanted
}

// Handle applies a batch: each VM's final wanted state is diffed against
// what kv says FMC holds and sent as one bulk change (or a few, for FMC's
// body limit). Records are written only after FMC accepted the change, so
// a retried batch recomputes the diff, and adding or removing an address
// twice is harmless. A batch delivered again can hold later events of a VM
// than the attempt that reached FMC did (see store.passedThrough).
//
// When FMC refuses the batch's content, each VM is tried alone, so that one
// VM that can never succeed is rejected and the rest go through.
func Handle(cfg *Config, host Host, events []Event) []Outcome {
	outcomes := make([]Outcome, len(events))
	groups, order := groupByVM(events)
	// The call's waits for 429s, all its attempts together.
	var slept time.Duration
	err := apply(cfg, host, events, order, groups, &slept)
	if err == nil {
		return outcomes
	}
	var refused *APIError
	if len(order) > 1 && errors.As(err, &refused) && refused.Permanent() {
		host.Log(Warn, fmt.Sprintf("FMC refused a batch of %d VMs (%v); trying each VM alone", len(order), err))
		// Past an error FMC's refusal of one VM does not explain (its rate
		// limit, the call's requests spent, a connection), the VMs left
		// share it untried: trying them would meet it again.
		var stop error
		for _, key := range order {
			err := stop
			if err == nil {
				err = apply(cfg, host, events, []string{key}, groups, &slept)
			}
			if err == nil {
				continue
			}
			for _, i := range groups[key] {
				outcomes[i] = failure(err)
			}
			// A refusal of this VM's own (FMC's or the host's) is its
			// alone; what would be retried would meet the others too.
			if failure(err).Kind == Retry {
				stop = err
			}
		}
		return outcomes
	}
	for i := range outcomes {
		outcomes[i] = failure(err)
	}
	return outcomes
}

// groupByVM lists each VM's events (by index), VMs in first-seen order.
func groupByVM(events []Event) (map[string][]int, []string) {
	groups := map[string][]int{}
	var order []string
	for i, e := range events {
		key := VmKey(e.Cluster, e.EntityUuid)
		if _, seen := groups[key]; !seen {
			order = append(order, key)
		}
		groups[key] = append(groups[key], i)
	}
	return groups, order
}

// apply sends the changes of the given VMs' events and records them.
func apply(cfg *Config, host Host, events []Event, vms []string, groups map[string][]int, slept *time.Duration) error {
	st := newStore(host)
	changes := map[string]*Change{}
	for _, key := range vms {
		// Events of one VM come in order: the last that says anything wins.
		var final IPObjects
		passed, earlier := IPObjects{}, false
		for _, i := range groups[key] {
			if wanted := cfg.intended(host, events[i]); wanted != nil {
				if final != nil {
					earlier = true
					passed.merge(final)
				}
				final = wanted
			}
		}
		if final == nil {
			continue
		}
		if err := st.setVM(key, final, changes); err != nil {
			return err
		}
		if earlier {
			if err := st.passedThrough(passed, final, changes); err != nil {
				return err
			}
		}
	}
	add, remove := byObject(changes)
	if len(add)+len(remove) > 0 {
		a := newAPI(cfg, host)
		a.slept = slept
		err := send(a, add, remove)
		var refused *APIError
		if errors.As(err, &refused) && refused.Permanent() {
			// Perhaps an object was deleted (or deleted and made again) on
			// FMC behind the plugin's back: its remembered id is stale.
			// Look every object up afresh and try once more.
			for name := range union(keysOf(add), keysOf(remove)) {
				if err := a.forget(name); err != nil {
					return err
				}
			}
			err = send(a, add, remove)
		}
		if err != nil {
			return err
		}
	}
	return st.flush()
}

func send(a *api, add, remove map[string][]string) error {
	if err := a.Ensure(sortedNames(add)); err != nil {
		return err
	}
	return a.Apply(add, remove)
}

// failure is the outcome for an error: a refusal FMC will repeat is a
// reject (coded, for the host's metrics), everything else a retry.
func failure(err error) Outcome {
	var limited *RateLimited
	if errors.As(err, &limited) {
		return Outcome{Kind: Retry, Reason: err.Error(), Delay: limited.After}
	}
	var refused *APIError
	if errors.As(err, &refused) && refused.Permanent() {
		return Outcome{Kind: Reject, Reason: "[fmc-refused] " + err.Error()}
	}
	var denied *HostRefused
	if errors.As(err, &denied) {
		return Outcome{Kind: Reject, Reason: "[host-refused] " + err.Error()}
	}
	return Outcome{Kind: Retry, Reason: err.Error()}
}

// Reconcile brings FMC back in step with a cluster's whole inventory: the
// cluster's records are rebuilt from it, then every object the plugin owns
// is read back from FMC and its addresses repaired to what the records of
// all clusters want. Objects it owns that nothing wants any more are
// emptied, never deleted (an access rule may still name them).
func Reconcile(cfg *Config, host Host, cluster string, vms []Vm) (string, error) {
	st := newStore(host)
	changes := map[string]*Change{}
	seen := map[string]bool{}
	invalid := 0
	for i := range vms {
		vm := &vms[i]
		key := VmKey(cluster, vm.Uuid)
		seen[key] = true
		wanted := IPObjects{}
		if poweredOn("", vm.PowerState) {
			var bad []string
			wanted, bad = cfg.Wanted(host, cluster, vm)
			invalid += len(bad)
		}
		if err := st.setVM(key, wanted, changes); err != nil {
			return "", err
		}
	}
	prefix := clusterPrefix(cluster)
	keys, err := host.KvList(prefix)
	if err != nil {
		return "", fmt.Errorf("listing kv `%s`: %v", prefix, err)
	}
	gone := 0
	for _, k := range keys {
		key := strings.TrimPrefix(k, vmPrefix)
		if !seen[key] {
			gone++
			if err := st.setVM(key, IPObjects{}, changes); err != nil {
				return "", err
			}
		}
	}

	// What every address record (all clusters) wants, per object.
	wanted := map[string]map[string]bool{}
	ipKeys, err := host.KvList(ipPrefix)
	if err != nil {
		return "", fmt.Errorf("listing kv `%s`: %v", ipPrefix, err)
	}
	for _, k := range ipKeys {
		addr := strings.TrimPrefix(k, ipPrefix)
		record, err := st.ip(addr)
		if err != nil {
			return "", err
		}
		for name := range record.union() {
			if wanted[name] == nil {
				wanted[name] = map[string]bool{}
			}
			wanted[name][addr] = true
		}
	}
	// Addresses whose records this reconcile wrote but kv does not list yet.
	for addr := range st.dirtyIPs {
		for name := range st.ips[addr].union() {
			if wanted[name] == nil {
				wanted[name] = map[string]bool{}
			}
			wanted[name][addr] = true
		}
	}
	for name, set := range wanted {
		for addr := range set {
			if !st.ips[addr].union()[name] {
				delete(set, addr)
			}
		}
	}

	a := newAPI(cfg, host)
	owned, err := a.Owned()
	if err != nil {
		return "", err
	}
	if err := a.Ensure(sortedKeys(missingObjects(wanted, owned))); err != nil {
		return "", err
	}
	add, remove := map[string][]string{}, map[string][]string{}
	for _, name := range sortedKeys(union(keysOf(wanted), keysOf(owned))) {
		actual := map[string]bool{}
		if id, ok := owned[name]; ok {
			if actual, err = a.Mappings(id); err != nil {
				return "", err
			}
		}
		for addr := range wanted[name] {
			if !actual[addr] {
				add[name] = append(add[name], addr)
			}
		}
		for addr := range actual {
			if !wanted[name][addr] {
				remove[name] = append(remove[name], addr)
			}
		}
	}
	for _, m := range []map[string][]string{add, remove} {
		for _, ips := range m {
			sort.Strings(ips)
		}
	}
	if err := a.Apply(add, remove); err != nil {
		return "", err
	}
	if err := st.flush(); err != nil {
		return "", err
	}
	counted := inventory{vms: len(vms), gone: gone, invalid: invalid}
	return summarise(counted, len(union(keysOf(wanted), keysOf(owned))), add, remove, a.Requests), nil
}

// missingObjects is the objects that would get addresses (wanted: a set or
// a list of them per name) and FMC does not have.
func missingObjects[S map[string]bool | []string](wanted map[string]S, owned map[string]string) map[string]bool {
	missing := map[string]bool{}
	for name, set := range wanted {
		if _, ok := owned[name]; !ok && len(set) > 0 {
			missing[name] = true
		}
	}
	return missing
}

func keysOf[V any](m map[string]V) map[string]bool {
	set := make(map[string]bool, len(m))
	for k := range m {
		set[k] = true
	}
	return set
}

func union(a, b map[string]bool) map[string]bool {
	out := make(map[string]bool, len(a)+len(b))
	for k := range a {
		out[k] = true
	}
	for k := range b {
		out[k] = true
	}
	return out
}

func count(m map[string][]string) int {
	n := 0
	for _, ips := range m {
		n += len(ips)
	}
	return n
}

// RetryAfter is the delay a Retry outcome carries, in milliseconds (0 for
// the host's backoff).
func (o Outcome) RetryAfter() uint64 {
	return uint64(o.Delay / time.Millisecond)
}
