// Package export_prismhook_plugin_handler is what the plugin exports: the
// generated bindings call Init, Handle and Reconcile here (the package name
// is theirs). It only converts between the bindings' types and package
// fmc's, and implements fmc.Host over the component's imports; the logic
// is fmc's.
//
// Every call runs on a fresh instance: Init, then one Handle or Reconcile,
// so the configuration Init parsed is still here for the call that follows.
package export_prismhook_plugin_handler

import (
	"time"

	"cisco-fmc/fmc"
	ctx "cisco-fmc/internal/bindings/prismhook_plugin_context"
	http "cisco-fmc/internal/bindings/prismhook_plugin_http"
	kv "cisco-fmc/internal/bindings/prismhook_plugin_kv"
	log "cisco-fmc/internal/bindings/prismhook_plugin_log"
	types "cisco-fmc/internal/bindings/prismhook_plugin_types"

	witTypes "go.bytecodealliance.org/pkg/wit/types"
)

var config *fmc.Config

// Init checks the operator's configuration; an error keeps the plugin from
// loading.
func Init(settings string) witTypes.Result[types.PluginInfo, string] {
	parsed, err := fmc.ParseConfig(settings)
	if err != nil {
		return witTypes.Err[types.PluginInfo, string](err.Error())
	}
	config = parsed
	return witTypes.Ok[types.PluginInfo, string](types.PluginInfo{
		Name:          fmc.Name,
		Version:       fmc.Version,
		Subscriptions: parsed.Subscriptions,
	})
}

func Handle(events []types.Event) []types.Outcome {
	converted := make([]fmc.Event, len(events))
	for i, e := range events {
		converted[i] = fmc.Event{
			Id: e.Id, Cluster: e.Cluster, EventType: e.EventType,
			EntityKind: e.EntityKind, EntityUuid: e.EntityUuid, Attempt: e.Attempt,
		}
		if e.Vm.IsSome() {
			vm := vmOf(e.Vm.Some())
			converted[i].Vm = &vm
		}
	}
	outcomes := fmc.Handle(config, host{}, converted)
	out := make([]types.Outcome, len(outcomes))
	for i, o := range outcomes {
		switch o.Kind {
		case fmc.Done:
			out[i] = types.MakeOutcomeDone()
		case fmc.Reject:
			out[i] = types.MakeOutcomeReject(o.Reason)
		default:
			delay := witTypes.None[uint64]()
			if o.Delay > 0 {
				delay = witTypes.Some(o.RetryAfter())
			}
			out[i] = types.MakeOutcomeRetry(types.Retry{Reason: o.Reason, DelayMs: delay})
		}
	}
	return out
}

func Reconcile(cluster string, vms []types.Vm) witTypes.Result[string, string] {
	converted := make([]fmc.Vm, len(vms))
	for i, vm := range vms {
		converted[i] = vmOf(vm)
	}
	summary, err := fmc.Reconcile(config, host{}, cluster, converted)
	if err != nil {
		return witTypes.Err[string, string](err.Error())
	}
	return witTypes.Ok[string, string](summary)
}

func vmOf(vm types.Vm) fmc.Vm {
	out := fmc.Vm{Uuid: vm.Uuid, PowerState: vm.PowerState.SomeOr("")}
	for _, c := range vm.Categories {
		out.Categories = append(out.Categories, fmc.Category{Key: c.Key, Value: c.Value})
	}
	for _, nic := range vm.Nics {
		out.Nics = append(out.Nics, nic.Ips)
	}
	return out
}

// host is fmc.Host over the component's imports.
type host struct{}

func (host) Send(r fmc.Request) (fmc.Response, error) {
	request := http.Request{Method: r.Method, Url: r.URL, Body: witTypes.None[[]uint8]()}
	for _, h := range r.Headers {
		request.Headers = append(request.Headers, witTypes.Tuple2[string, string]{F0: h[0], F1: h[1]})
	}
	if r.Body != nil {
		request.Body = witTypes.Some(r.Body)
	}
	result := http.Send(request)
	if result.IsErr() {
		return fmc.Response{}, httpError{result.Err()}
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

func (host) KvGet(key string) ([]byte, bool, error) {
	result := kv.Get(key)
	if result.IsErr() {
		return nil, false, kvError(result.Err())
	}
	value := result.Ok()
	if value.IsNone() {
		return nil, false, nil
	}
	return value.Some(), true, nil
}

func (host) KvSet(key string, value []byte) error {
	if result := kv.Set(key, value); result.IsErr() {
		return kvError(result.Err())
	}
	return nil
}

func (host) KvDelete(key string) error {
	if result := kv.Delete(key); result.IsErr() {
		return kvError(result.Err())
	}
	return nil
}

func (host) KvList(prefix string) ([]string, error) {
	result := kv.ListKeys(prefix)
	if result.IsErr() {
		return nil, kvError(result.Err())
	}
	return result.Ok(), nil
}

type kvError string

func (e kvError) Error() string { return string(e) }

func (host) Log(level fmc.Level, message string) {
	levels := map[fmc.Level]log.Level{
		fmc.Debug: log.LevelDebug, fmc.Info: log.LevelInfo,
		fmc.Warn: log.LevelWarn, fmc.Error: log.LevelError,
	}
	log.Log(levels[level], message)
}

func (host) VmClusterName(vmUuid string) (string, bool) {
	name := ctx.VmClusterName(vmUuid)
	return name.SomeOr(""), name.IsSome()
}

func (host) Sleep(d time.Duration) {
	time.Sleep(d)
}
