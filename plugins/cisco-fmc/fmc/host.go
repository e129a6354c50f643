// Package fmc is the cisco-fmc plugin's logic, in plain Go: it sees the host
// only through the Host interface, so `go test` runs it natively against a
// fake FMC, and the Wasm build wires Host to the component's imports.
package fmc

import (
	"strings"
	"time"
)

// Category is one Nutanix category of a VM.
type Category struct {
	Key, Value string
}

// Vm is what the host decoded of a VM: the fields the plugin uses.
type Vm struct {
	Uuid string
	// PowerState is Prism's text ("ON", "OFF"), "" when it did not say.
	PowerState string
	Categories []Category
	// Nics holds each NIC's IP addresses as Prism reported them.
	Nics [][]string
}

// Event is one notification for the plugin.
type Event struct {
	Id, Cluster, EventType, EntityKind, EntityUuid string
	Attempt                                        uint32
	// Vm is nil for other kinds and for bodies without a VM (a VM.DELETE).
	Vm *Vm
}

// OutcomeKind says what became of an event.
type OutcomeKind int

const (
	Done OutcomeKind = iota
	Retry
	Reject
)

// Outcome is the answer for one event.
type Outcome struct {
	Kind   OutcomeKind
	Reason string
	// Delay is the earliest moment to try again (Retry only); 0 leaves it
	// to the host's backoff.
	Delay time.Duration
}

// Level is a log level.
type Level int

const (
	Debug Level = iota
	Info
	Warn
	Error
)

// Request is an HTTP request the host makes for the plugin; the host adds
// the access token (the plugin never sees it).
type Request struct {
	Method  string
	URL     string
	Headers [][2]string
	Body    []byte
}

// Response is the host's answer to a Request.
type Response struct {
	Status  uint16
	Headers [][2]string
	Body    []byte
}

// Header returns the first value of a header, by case-insensitive name.
func (r *Response) Header(name string) (string, bool) {
	for _, h := range r.Headers {
		if strings.EqualFold(h[0], name) {
			return h[1], true
		}
	}
	return "", false
}

// Host is everything the plugin asks of the host.
type Host interface {
	// Send returns an error only when no HTTP answer came (denied by the
	// allowlist, timeout, connection refused, too large).
	Send(Request) (Response, error)
	KvGet(key string) ([]byte, bool, error)
	KvSet(key string, value []byte) error
	KvDelete(key string) error
	KvList(prefix string) ([]string, error)
	// KvListAfter is a page of KvList: at most limit keys that start with
	// prefix and sort after after ("" for the first page), in byte order.
	KvListAfter(prefix, after string, limit uint32) ([]string, error)
	Log(level Level, message string)
	// VmClusterName is the Nutanix cluster a VM belongs to, when known.
	VmClusterName(vmUuid string) (string, bool)
	// Sleep waits inside the call (it counts against the plugin's deadline).
	Sleep(time.Duration)
}
