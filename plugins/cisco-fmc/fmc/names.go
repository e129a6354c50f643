package fmc

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"sort"
	"strings"
)

// MaxNameLen is the longest dynamic object name FMC takes.
const MaxNameLen = 128

// Category keys and values come from Prism and may hold any character, but
// they end up as object names, which FMC limits to [A-Za-z0-9_.+-]{1,128}:
// anything else becomes `_`, and a name too long is cut with a hash of the
// whole so that two long values never collapse into one object.
func isNameChar(c rune) bool {
	return c < 128 && (('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9') ||
		c == '_' || c == '.' || c == '+' || c == '-')
}

func validName(s string) bool {
	for _, c := range s {
		if !isNameChar(c) {
			return false
		}
	}
	return len(s) <= MaxNameLen
}

// Sanitize replaces every character a name cannot hold with `_`.
func Sanitize(s string) string {
	return strings.Map(func(c rune) rune {
		if isNameChar(c) {
			return c
		}
		return '_'
	}, s)
}

// hashSuffixLen is what LimitLength ends a cut name with: `-` and 8 hex digits.
const hashSuffixLen = 9

// MaxPrefixLen is the longest `tag_prefix`: a name LimitLength cuts keeps
// its first MaxNameLen-hashSuffixLen characters, which must still hold the
// prefix and its dot, or the plugin would not know the object as its own.
const MaxPrefixLen = MaxNameLen - hashSuffixLen - 1

// LimitLength cuts a name to MaxNameLen, ending it with `-` and 8 hex digits
// of FNV-1a over the whole name (names are ASCII after Sanitize).
func LimitLength(name string) string {
	if len(name) <= MaxNameLen {
		return name
	}
	h := fnv.New64a()
	h.Write([]byte(name))
	suffix := fmt.Sprintf("-%08x", uint32(h.Sum64()))
	return name[:MaxNameLen-hashSuffixLen] + suffix
}

type piece struct {
	literal string
	// field is "" for a literal, else prefix, cluster, vm_cluster, key or value.
	field string
}

// Template is an object name template such as `{prefix}.{key}.{value}`.
type Template []piece

// ParseTemplate reads a template; literals must be valid name characters.
func ParseTemplate(source string) (Template, error) {
	var t Template
	rest := source
	for rest != "" {
		if strings.HasPrefix(rest, "{") {
			end := strings.IndexByte(rest, '}')
			if end < 0 {
				return nil, fmt.Errorf("unclosed `{` in %q", source)
			}
			switch field := rest[1:end]; field {
			case "prefix", "cluster", "vm_cluster", "key", "value":
				t = append(t, piece{field: field})
			default:
				return nil, fmt.Errorf("unknown placeholder `{%s}` (known: {prefix}, {cluster}, {vm_cluster}, {key}, {value})", field)
			}
			rest = rest[end+1:]
			continue
		}
		end := strings.IndexByte(rest, '{')
		if end < 0 {
			end = len(rest)
		}
		literal := rest[:end]
		for _, c := range literal {
			if !isNameChar(c) {
				return nil, fmt.Errorf("%q cannot appear in an object name (letters, digits, `.`, `_`, `+`, `-` only)", c)
			}
		}
		t = append(t, piece{literal: literal})
		rest = rest[end:]
	}
	return t, nil
}

// UsesVmFields says whether the template needs a VM's cluster or category.
func (t Template) UsesVmFields() bool {
	for _, p := range t {
		if p.field != "" && p.field != "prefix" {
			return true
		}
	}
	return false
}

// UsesVmCluster says whether the template needs the VM's Nutanix cluster.
func (t Template) UsesVmCluster() bool {
	for _, p := range t {
		if p.field == "vm_cluster" {
			return true
		}
	}
	return false
}

// Render fills in the placeholders with sanitised values.
func (t Template) Render(prefix, cluster, vmCluster, key, value string) string {
	var b strings.Builder
	for _, p := range t {
		switch p.field {
		case "":
			b.WriteString(p.literal)
		case "prefix":
			b.WriteString(Sanitize(prefix))
		case "cluster":
			b.WriteString(Sanitize(cluster))
		case "vm_cluster":
			b.WriteString(Sanitize(vmCluster))
		case "key":
			b.WriteString(Sanitize(key))
		case "value":
			b.WriteString(Sanitize(value))
		}
	}
	return b.String()
}

// IPObjects maps an address to the objects it belongs in.
type IPObjects map[string]map[string]bool

// merge adds other's memberships to o.
func (o IPObjects) merge(other IPObjects) {
	for ip, names := range other {
		set := o[ip]
		if set == nil {
			set = map[string]bool{}
			o[ip] = set
		}
		for name := range names {
			set[name] = true
		}
	}
}

// addresses is the set of o's addresses.
func (o IPObjects) addresses() map[string]bool {
	set := make(map[string]bool, len(o))
	for ip := range o {
		set[ip] = true
	}
	return set
}

// Objects is the names of the objects a VM's addresses belong in.
func (c *Config) Objects(host Host, cluster string, vm *Vm) []string {
	names := map[string]bool{}
	if c.StaticTag != "" {
		names[c.StaticTag] = true
	}
	vmCluster, known := "", true
	if c.CategoryTag.UsesVmCluster() && len(vm.Categories) > 0 {
		vmCluster, known = host.VmClusterName(vm.Uuid)
	}
	for _, cat := range vm.Categories {
		if c.Categories != nil && !c.Categories[cat.Key] {
			continue
		}
		// Without its Nutanix cluster the VM's category objects cannot be
		// named; the static object still marks it managed.
		if !known {
			break
		}
		names[LimitLength(c.CategoryTag.Render(c.TagPrefix, cluster, vmCluster, cat.Key, cat.Value))] = true
	}
	return sortedKeys(names)
}

// Wanted is what a powered-on VM contributes: each valid address of every
// NIC in each of its objects. Invalid addresses are returned for the log.
func (c *Config) Wanted(host Host, cluster string, vm *Vm) (IPObjects, []string) {
	wanted := IPObjects{}
	var invalid []string
	objects := c.Objects(host, cluster, vm)
	if len(objects) == 0 {
		return wanted, nil
	}
	for _, nic := range vm.Nics {
		for _, text := range nic {
			addr, ok := canonicalAddr(text)
			if !ok {
				invalid = append(invalid, text)
				continue
			}
			if !reachable(addr) {
				continue
			}
			ip := addr.String()
			set := wanted[ip]
			if set == nil {
				set = map[string]bool{}
				wanted[ip] = set
			}
			for _, o := range objects {
				set[o] = true
			}
		}
	}
	return wanted, invalid
}

// CanonicalIP is the canonical text of an address (IPv4-mapped IPv6 as
// IPv4, IPv6 zones dropped), so records and FMC's answers compare equal.
func CanonicalIP(text string) (string, bool) {
	addr, ok := canonicalAddr(text)
	if !ok {
		return "", false
	}
	return addr.String(), true
}

func canonicalAddr(text string) (netip.Addr, bool) {
	addr, err := netip.ParseAddr(strings.TrimSpace(text))
	if err != nil {
		return netip.Addr{}, false
	}
	return addr.Unmap().WithZone(""), true
}

// reachable says whether another machine can reach the VM at addr: Prism
// lists every address a NIC reports, an IPv6 NIC's link-local one among
// them, which no rule on the firewall can use.
func reachable(addr netip.Addr) bool {
	return !addr.IsLinkLocalUnicast() && !addr.IsLinkLocalMulticast() &&
		!addr.IsLoopback() && !addr.IsUnspecified() && !addr.IsMulticast()
}

func sortedKeys(set map[string]bool) []string {
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
