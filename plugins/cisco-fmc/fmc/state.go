package fmc

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
)

// What the plugin remembers in kv.
//
// Several VMs can hold one address (it moves from a deleted VM to a new
// one, or two VMs briefly report it), and FMC only knows addresses. So an
// address belongs in the union of the objects every VM holding it wants,
// and removing one VM must not take an address out of an object another VM
// still wants. Two records per fact keep that cheap:
//
//   - `vm/<cluster>/<uuid>`: {address: [objects]} this VM contributes; what a
//     VM.DELETE without a body undoes.
//   - `ip/<address>`: {"<cluster>/<uuid>": [objects]} for every VM holding
//     the address; their union is what FMC holds for it.
//
// and `obj/<name>`: the id of an object the plugin created or adopted.
//
// Cluster and uuid are escaped in keys (`%` → `%25`, `/` → `%2F`) so that a
// cluster named with a `/` cannot collide with another cluster's records.
const (
	vmPrefix  = "vm/"
	ipPrefix  = "ip/"
	objPrefix = "obj/"
	domainKey = "domain"
)

func escape(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "%", "%25"), "/", "%2F")
}

// VmKey is `<cluster>/<uuid>`, escaped.
func VmKey(cluster, uuid string) string {
	return escape(cluster) + "/" + escape(uuid)
}

func clusterPrefix(cluster string) string {
	return vmPrefix + escape(cluster) + "/"
}

// vmRecord and ipRecord hold sorted lists so that records are stable bytes.
type vmRecord map[string][]string
type ipRecord map[string][]string

func toRecord(objects IPObjects) vmRecord {
	record := vmRecord{}
	for ip, set := range objects {
		record[ip] = sortedKeys(set)
	}
	return record
}

func (r vmRecord) objects() IPObjects {
	out := IPObjects{}
	for ip, names := range r {
		out[ip] = setOf(names)
	}
	return out
}

func setOf(names []string) map[string]bool {
	set := make(map[string]bool, len(names))
	for _, n := range names {
		set[n] = true
	}
	return set
}

// union is the objects an address belongs in, over every VM holding it.
func (r ipRecord) union() map[string]bool {
	set := map[string]bool{}
	for _, names := range r {
		for _, n := range names {
			set[n] = true
		}
	}
	return set
}

// store reads and writes records through the host's kv, keeping what it
// read so that a batch reads each record once and writes only changes.
type store struct {
	host Host
	vms  map[string]vmRecord // by VmKey
	ips  map[string]ipRecord // by address
	// dirty records, written by flush.
	dirtyVMs map[string]bool
	dirtyIPs map[string]bool
}

func newStore(host Host) *store {
	return &store{host: host, vms: map[string]vmRecord{}, ips: map[string]ipRecord{},
		dirtyVMs: map[string]bool{}, dirtyIPs: map[string]bool{}}
}

// load reads a JSON record; an unreadable one counts as empty (refusing
// every later event over one bad record would be worse, and reconcile
// rewrites it).
func load[T any](host Host, key string, into *T) error {
	bytes, found, err := host.KvGet(key)
	if err != nil {
		return fmt.Errorf("reading kv `%s`: %v", key, err)
	}
	if !found {
		return nil
	}
	if err := json.Unmarshal(bytes, into); err != nil {
		host.Log(Warn, fmt.Sprintf("kv `%s` is unreadable (%v); treating it as empty", key, err))
		var zero T
		*into = zero
	}
	return nil
}

func (s *store) vm(key string) (vmRecord, error) {
	return cached(s.host, s.vms, vmPrefix, key)
}

func (s *store) ip(addr string) (ipRecord, error) {
	return cached(s.host, s.ips, ipPrefix, addr)
}

// cached reads a record once per batch.
func cached[R ~map[string][]string](host Host, cache map[string]R, prefix, key string) (R, error) {
	if r, ok := cache[key]; ok {
		return r, nil
	}
	r := R{}
	if err := load(host, prefix+key, &r); err != nil {
		return nil, err
	}
	if r == nil {
		r = R{}
	}
	cache[key] = r
	return r, nil
}

// Change is what one address gains and loses.
type Change struct {
	Add, Remove map[string]bool
}

// setVM replaces a VM's contribution and returns, per address whose object
// union changed, the objects it gains and loses.
func (s *store) setVM(key string, wanted IPObjects, changes map[string]*Change) error {
	before, err := s.vm(key)
	if err != nil {
		return err
	}
	for _, ip := range sortedKeys(union(keysOf(before), keysOf(wanted))) {
		record, err := s.ip(ip)
		if err != nil {
			return err
		}
		old := record.union()
		if set, ok := wanted[ip]; ok && len(set) > 0 {
			record[key] = sortedKeys(set)
		} else {
			delete(record, key)
		}
		now := record.union()
		s.dirtyIPs[ip] = true
		for name := range now {
			if !old[name] {
				change(changes, ip).Add[name] = true
				delete(change(changes, ip).Remove, name)
			}
		}
		for name := range old {
			if !now[name] {
				change(changes, ip).Remove[name] = true
				delete(change(changes, ip).Add, name)
			}
		}
	}
	s.vms[key] = toRecord(wanted)
	s.dirtyVMs[key] = true
	return nil
}

// passedThrough completes the change of a VM with several events in the
// batch. An attempt at this batch that reached FMC but not kv (its host
// died, or storing failed) may have left the VM at any state its earlier
// events wanted, and the batch delivered again can hold more of its events
// than that attempt did, so a diff from the records alone would not undo
// it: every address the VM wants now is added again, and what the earlier
// events wanted and no VM wants now is removed. FMC takes adding a mapping
// it has and removing one it lacks without error.
func (s *store) passedThrough(passed, wanted IPObjects, changes map[string]*Change) error {
	for _, ip := range sortedKeys(passed.addresses()) {
		record, err := s.ip(ip)
		if err != nil {
			return err
		}
		now := record.union()
		for name := range passed[ip] {
			if !now[name] {
				c := change(changes, ip)
				c.Remove[name] = true
				delete(c.Add, name)
			}
		}
	}
	for ip, names := range wanted {
		for name := range names {
			c := change(changes, ip)
			c.Add[name] = true
			delete(c.Remove, name)
		}
	}
	return nil
}

func change(changes map[string]*Change, ip string) *Change {
	c := changes[ip]
	if c == nil {
		c = &Change{Add: map[string]bool{}, Remove: map[string]bool{}}
		changes[ip] = c
	}
	return c
}

// flush writes every changed record. Address records go first: if a write
// fails half-way, the retry finds the addresses right and only the VM
// record still to fix, rather than a VM record claiming addresses the
// index lacks. (A trap discards every write of the call anyway.)
func (s *store) flush() error {
	for _, ip := range sortedKeys(s.dirtyIPs) {
		if err := write(s.host, ipPrefix+ip, s.ips[ip], len(s.ips[ip]) == 0); err != nil {
			return err
		}
	}
	for _, key := range sortedKeys(s.dirtyVMs) {
		if err := write(s.host, vmPrefix+key, s.vms[key], len(s.vms[key]) == 0); err != nil {
			return err
		}
	}
	s.dirtyIPs, s.dirtyVMs = map[string]bool{}, map[string]bool{}
	return nil
}

func write(host Host, key string, record any, empty bool) error {
	var err error
	if empty {
		err = host.KvDelete(key)
	} else {
		var bytes []byte
		bytes, err = json.Marshal(record)
		if err == nil {
			err = host.KvSet(key, bytes)
		}
	}
	if err != nil {
		return fmt.Errorf("writing kv `%s`: %v", key, err)
	}
	return nil
}

// byObject turns per-address changes into per-object address lists.
func byObject(changes map[string]*Change) (add, remove map[string][]string) {
	add, remove = map[string][]string{}, map[string][]string{}
	for ip, c := range changes {
		for name := range c.Add {
			add[name] = append(add[name], ip)
		}
		for name := range c.Remove {
			remove[name] = append(remove[name], ip)
		}
	}
	for _, m := range []map[string][]string{add, remove} {
		for _, ips := range m {
			sort.Strings(ips)
		}
	}
	return add, remove
}
