// Package component is what the plugin's export packages share: the
// configuration Init parsed, and fmc.Host over the component's imports. It
// only converts between the bindings' types and package fmc's; the logic is
// fmc's.
//
// Every call runs on a fresh instance: Init, then one Handle or Reconcile,
// so the configuration Init parsed is still here for the call that follows.
package component

import (
	"runtime/debug"
	"time"

	"cisco-fmc/fmc"
	ctx "cisco-fmc/internal/bindings/prismhook_plugin_context"
	http "cisco-fmc/internal/bindings/prismhook_plugin_http"
	inventory "cisco-fmc/internal/bindings/prismhook_plugin_inventory"
	kv "cisco-fmc/internal/bindings/prismhook_plugin_kv"
	log "cisco-fmc/internal/bindings/prismhook_plugin_log"
	types "cisco-fmc/internal/bindings/prismhook_plugin_types"

	witRuntime "go.bytecodealliance.org/pkg/wit/runtime"
	witTypes "go.bytecodealliance.org/pkg/wit/types"
)

// Config is the configuration Init parsed for this instance.
var Config *fmc.Config

// The host writes what an import returns, and the arguments of the export
// it calls, into Go's heap through cabi_realloc, where the component model
// forbids calling out of the instance. A garbage collection that ends in
// there reads the wall clock (Go's mark termination calls time_now), the
// WASI adapter asks the host for it, and the instance traps: "cannot leave
// component instance (in clock_time_get)". The adapter's pause, which
// wit-bindgen's cabi_realloc sets, covers only the monotonic clock. So
// the collector is off whenever the host may be writing into the heap:
// from Init until the export it calls next begins, and around every
// import that returns something.
const gcPercent = 100

// Hold turns the collector off until Resume: the end of Init, before the
// host lowers the next export's arguments. A cycle in progress finishes
// first, here, where calling out is allowed.
func Hold() { debug.SetGCPercent(-1) }

// Resume turns the collector back on, at the start of an export.
func Resume() { debug.SetGCPercent(gcPercent) }

// lowered runs an import with the collector off, and then lets go of what
// the host wrote: wit-bindgen's cabi_realloc pins every block it hands the
// host, and only an export's entry unpins them, so without this every
// answer of every import (each kv record, each page, each HTTP body) would
// stay for the rest of the call, and a reconcile's memory would grow with
// the inventory. What the answer's lifted values still point at stays
// alive through them.
func lowered[T any](call func() T) T {
	old := debug.SetGCPercent(-1)
	defer debug.SetGCPercent(old)
	defer witRuntime.Unpin()
	return call()
}

// VmOf is the plugin's view of a VM the host decoded.
func VmOf(vm types.Vm) fmc.Vm {
	out := fmc.Vm{Uuid: vm.Uuid, PowerState: vm.PowerState.SomeOr("")}
	for _, c := range vm.Categories {
		out.Categories = append(out.Categories, fmc.Category{Key: c.Key, Value: c.Value})
	}
	for _, nic := range vm.Nics {
		out.Nics = append(out.Nics, nic.Ips)
	}
	return out
}

// NextPage is the inventory's next page (inventory.next-page), false once
// every VM was read.
func NextPage() ([]fmc.Vm, bool) {
	page := lowered(func() witTypes.Option[[]types.Vm] { return inventory.NextPage() })
	if page.IsNone() {
		return nil, false
	}
	vms := page.Some()
	converted := make([]fmc.Vm, len(vms))
	for i, vm := range vms {
		converted[i] = VmOf(vm)
	}
	return converted, true
}

// Host is fmc.Host over the component's imports.
type Host struct{}

func (Host) Send(r fmc.Request) (fmc.Response, error) {
	request := http.Request{Method: r.Method, Url: r.URL, Body: witTypes.None[[]uint8]()}
	for _, h := range r.Headers {
		request.Headers = append(request.Headers, witTypes.Tuple2[string, string]{F0: h[0], F1: h[1]})
	}
	if r.Body != nil {
		request.Body = witTypes.Some(r.Body)
	}
	result := lowered(func() witTypes.Result[http.Response, http.Error] { return http.Send(request) })
	if result.IsErr() {
		failure := httpError{result.Err()}
		switch failure.e.Tag() {
		case http.ErrorDenied, http.ErrorInvalidRequest:
			return fmc.Response{}, &fmc.HostRefused{Reason: failure.Error()}
		case http.ErrorLimitExceeded:
			return fmc.Response{}, &fmc.OutOfRequests{Reason: failure.Error()}
		}
		return fmc.Response{}, failure
	}
	response := result.Ok()
	out := fmc.Response{Status: response.Status, Body: response.Body}
	for _, h := range response.Headers {
		out.Headers = append(out.Headers, [2]string{h.F0, h.F1})
	}
	return out, nil
}

// httpError says why the host answered no HTTP response.
type httpError struct{ e http.Error }

func (e httpError) Error() string {
	switch e.e.Tag() {
	case http.ErrorDenied:
		return "denied by the host's allowlist: " + e.e.Denied()
	case http.ErrorInvalidRequest:
		return "invalid request: " + e.e.InvalidRequest()
	case http.ErrorTimeout:
		return "timed out"
	case http.ErrorConnectionFailed:
		return "connection failed: " + e.e.ConnectionFailed()
	case http.ErrorTooLarge:
		return "answer too large"
	case http.ErrorLimitExceeded:
		return "limit exceeded: " + e.e.LimitExceeded()
	default:
		return e.e.Other()
	}
}

func (Host) KvGet(key string) ([]byte, bool, error) {
	result := lowered(func() witTypes.Result[witTypes.Option[[]uint8], string] { return kv.Get(key) })
	if result.IsErr() {
		return nil, false, kvError(result.Err())
	}
	value := result.Ok()
	if value.IsNone() {
		return nil, false, nil
	}
	return value.Some(), true, nil
}

func (Host) KvSet(key string, value []byte) error {
	if result := lowered(func() witTypes.Result[witTypes.Unit, string] { return kv.Set(key, value) }); result.IsErr() {
		return kvError(result.Err())
	}
	return nil
}

func (Host) KvDelete(key string) error {
	if result := lowered(func() witTypes.Result[witTypes.Unit, string] { return kv.Delete(key) }); result.IsErr() {
		return kvError(result.Err())
	}
	return nil
}

func (Host) KvList(prefix string) ([]string, error) {
	result := lowered(func() witTypes.Result[[]string, string] { return kv.ListKeys(prefix) })
	if result.IsErr() {
		return nil, kvError(result.Err())
	}
	return result.Ok(), nil
}

func (Host) KvListAfter(prefix, after string, limit uint32) ([]string, error) {
	from := witTypes.None[string]()
	if after != "" {
		from = witTypes.Some(after)
	}
	result := lowered(func() witTypes.Result[[]string, string] { return kv.ListKeysAfter(prefix, from, limit) })
	if result.IsErr() {
		return nil, kvError(result.Err())
	}
	return result.Ok(), nil
}

type kvError string

func (e kvError) Error() string { return string(e) }

func (Host) Log(level fmc.Level, message string) {
	levels := map[fmc.Level]log.Level{
		fmc.Debug: log.LevelDebug, fmc.Info: log.LevelInfo,
		fmc.Warn: log.LevelWarn, fmc.Error: log.LevelError,
	}
	log.Log(levels[level], message)
}

func (Host) VmClusterName(vmUuid string) (string, bool) {
	name := lowered(func() witTypes.Option[string] { return ctx.VmClusterName(vmUuid) })
	return name.SomeOr(""), name.IsSome()
}

func (Host) Sleep(d time.Duration) {
	time.Sleep(d)
}
