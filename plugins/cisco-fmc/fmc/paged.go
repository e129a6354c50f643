package fmc

// The paged reconcile (`paged.reconcile`, host 0.1.2): the inventory a page
// at a time, through the kv records, so that the plugin holds a page, a few
// bytes per VM and mapping, and the change to send, never the inventory.
//
//  1. Each page's VMs: their contributions go to their `vm/` records and to
//     the `ip/` records of the addresses they had or have (writing only what
//     differs). Then the cluster's VMs that were not listed lose theirs, and
//     other clusters' VM records put back any `ip/` entry they lack.
//  2. Every `ip/` record against the `vm/` records of its holders: an entry
//     a VM no longer contributes goes, so a record a dead host left
//     half-written is repaired.
//  3. Every owned object's mappings, a page of FMC's answer at a time,
//     against the `ip/` records; then the `ip/` records against what FMC
//     mapped. The change is applied after the reading, so that it does not
//     shift FMC's pages under it.
//
// An error returns before anything is applied, or after part of it; the
// host then discards the call's kv writes (the paged contract), so the
// records never claim what FMC did not take.

import (
	"fmt"
	"hash/maphash"
	"maps"
	"slices"
	"sort"
	"strings"
)

// keyPage is how many kv keys a walk asks for at a time.
const keyPage = 1000

// Pages hands over the inventory: the next page, and false once every VM
// was read.
type Pages func() ([]Vm, bool)

// fingerprints stand for VMs and mappings across pages: 8 bytes rather
// than their keys, in a slice sorted once every one was added (a map would
// take two to three times that). Two keys of one reconcile sharing a
// fingerprint (odds of about 10⁻⁸ at a million) would leave one stale
// record or mapping to the next reconcile.
type fingerprints struct {
	seed   maphash.Seed
	list   []uint64
	sorted bool
}

func newFingerprints() *fingerprints {
	return &fingerprints{seed: maphash.MakeSeed()}
}

// of is the fingerprint of the parts, as one key (a NUL between them).
func (f *fingerprints) of(parts ...string) uint64 {
	var h maphash.Hash
	h.SetSeed(f.seed)
	for i, part := range parts {
		if i > 0 {
			h.WriteByte(0)
		}
		h.WriteString(part)
	}
	return h.Sum64()
}

func (f *fingerprints) add(parts ...string) {
	f.list = append(f.list, f.of(parts...))
	f.sorted = false
}

func (f *fingerprints) has(parts ...string) bool {
	if !f.sorted {
		slices.Sort(f.list)
		f.sorted = true
	}
	_, found := slices.BinarySearch(f.list, f.of(parts...))
	return found
}

// eachKey calls each with every kv key under prefix, in byte order, a page
// of KvListAfter at a time: no list of every key is held, and what each
// writes behind the walk does not disturb it.
func eachKey(host Host, prefix string, each func(key string) error) error {
	after := ""
	for {
		page, err := host.KvListAfter(prefix, after, keyPage)
		if err != nil {
			return fmt.Errorf("listing kv `%s`: %v", prefix, err)
		}
		for _, key := range page {
			if err := each(key); err != nil {
				return err
			}
		}
		if len(page) < keyPage {
			return nil
		}
		after = page[len(page)-1]
	}
}

// setEntry makes VM key's entry in an address's record names (no entry
// when there are none); whether the record changed.
func setEntry(record *ipRecord, key string, names []string) bool {
	if len(names) == 0 {
		if _, ok := (*record)[key]; !ok {
			return false
		}
		delete(*record, key)
		return true
	}
	if old, ok := (*record)[key]; ok && slices.Equal(old, names) {
		return false
	}
	if *record == nil {
		*record = ipRecord{}
	}
	(*record)[key] = names
	return true
}

// setContribution makes VM key's record, and its entries in the records of
// every address it had or has, what it contributes now (wanted), writing
// only what differs.
func setContribution(host Host, key string, wanted vmRecord) error {
	var old vmRecord
	if err := load(host, vmPrefix+key, &old); err != nil {
		return err
	}
	for _, ip := range sortedKeys(union(keysOf(old), keysOf(wanted))) {
		var record ipRecord
		if err := load(host, ipPrefix+ip, &record); err != nil {
			return err
		}
		if setEntry(&record, key, wanted[ip]) {
			if err := write(host, ipPrefix+ip, record, len(record) == 0); err != nil {
				return err
			}
		}
	}
	if maps.EqualFunc(old, wanted, slices.Equal[[]string]) {
		return nil
	}
	return write(host, vmPrefix+key, wanted, len(wanted) == 0)
}

// inventory is what step 1 counted.
type inventory struct {
	vms, gone, invalid int
}

// takeInventory is step 1.
func takeInventory(cfg *Config, host Host, cluster string, next Pages) (inventory, error) {
	var counted inventory
	listed := newFingerprints()
	for {
		page, ok := next()
		if !ok {
			break
		}
		for i := range page {
			vm := &page[i]
			counted.vms++
			key := VmKey(cluster, vm.Uuid)
			listed.add(key)
			wanted := IPObjects{}
			if poweredOn("", vm.PowerState) {
				var bad []string
				wanted, bad = cfg.Wanted(host, cluster, vm)
				counted.invalid += len(bad)
			}
			if err := setContribution(host, key, toRecord(wanted)); err != nil {
				return counted, err
			}
		}
	}
	own := clusterPrefix(cluster)
	err := eachKey(host, vmPrefix, func(recordKey string) error {
		key := strings.TrimPrefix(recordKey, vmPrefix)
		if strings.HasPrefix(recordKey, own) {
			if listed.has(key) {
				return nil
			}
			counted.gone++
			return setContribution(host, key, vmRecord{})
		}
		// Another cluster's VM, known only from what its events left in kv.
		var record vmRecord
		if err := load(host, recordKey, &record); err != nil {
			return err
		}
		return setContribution(host, key, record)
	})
	return counted, err
}

// repairAddresses is step 2: each `ip/` entry must be what its VM's record
// says.
func repairAddresses(host Host) error {
	return eachKey(host, ipPrefix, func(recordKey string) error {
		ip := strings.TrimPrefix(recordKey, ipPrefix)
		var record ipRecord
		if err := load(host, recordKey, &record); err != nil {
			return err
		}
		fixed := false
		for _, holder := range sortedNames(record) {
			var contribution vmRecord
			if err := load(host, vmPrefix+holder, &contribution); err != nil {
				return err
			}
			fixed = setEntry(&record, holder, contribution[ip]) || fixed
		}
		if !fixed {
			return nil
		}
		return write(host, recordKey, record, len(record) == 0)
	})
}

// compareFMC is step 3: the addresses to add to and remove from each
// object, and the names of every object the records want.
func compareFMC(a *api, owned map[string]string) (add, remove map[string][]string, wanted map[string]bool, err error) {
	add, remove, wanted = map[string][]string{}, map[string][]string{}, map[string]bool{}
	mapped := newFingerprints()
	for _, name := range sortedNames(owned) {
		err := a.eachMapping(owned[name], func(ip string) error {
			mapped.add(name, ip)
			var record ipRecord
			if err := load(a.host, ipPrefix+ip, &record); err != nil {
				return err
			}
			if !record.union()[name] {
				remove[name] = append(remove[name], ip)
			}
			return nil
		})
		if err != nil {
			return nil, nil, nil, err
		}
	}
	err = eachKey(a.host, ipPrefix, func(recordKey string) error {
		ip := strings.TrimPrefix(recordKey, ipPrefix)
		var record ipRecord
		if err := load(a.host, recordKey, &record); err != nil {
			return err
		}
		for name := range record.union() {
			wanted[name] = true
			if !mapped.has(name, ip) {
				add[name] = append(add[name], ip)
			}
		}
		return nil
	})
	for _, m := range []map[string][]string{add, remove} {
		for _, ips := range m {
			sort.Strings(ips)
		}
	}
	return add, remove, wanted, err
}

// PagedReconcile brings FMC back in step with a cluster's inventory, read
// from next until it answers false, as Reconcile does with a whole list.
func PagedReconcile(cfg *Config, host Host, cluster string, next Pages) (string, error) {
	counted, err := takeInventory(cfg, host, cluster, next)
	if err != nil {
		return "", err
	}
	if err := repairAddresses(host); err != nil {
		return "", err
	}
	a := newAPI(cfg, host)
	a.patient = true
	owned, err := a.Owned()
	if err != nil {
		return "", err
	}
	add, remove, wanted, err := compareFMC(a, owned)
	if err != nil {
		return "", err
	}
	if err := a.Ensure(sortedKeys(missingObjects(add, owned))); err != nil {
		return "", err
	}
	if err := a.Apply(add, remove); err != nil {
		return "", err
	}
	return summarise(counted, len(union(wanted, keysOf(owned))), add, remove, a.Requests), nil
}

// summarise is a reconcile's line for the log.
func summarise(counted inventory, objects int, add, remove map[string][]string, requests int) string {
	summary := fmt.Sprintf("%d VMs, %d objects owned: %d addresses added, %d removed, %d VMs gone; %d FMC requests",
		counted.vms, objects, count(add), count(remove), counted.gone, requests)
	if counted.invalid > 0 {
		summary += fmt.Sprintf("; %d values skipped as not IP addresses", counted.invalid)
	}
	return summary
}
