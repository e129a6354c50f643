// Package export_prismhook_plugin_handler is what the plugin exports as
// `handler`: the generated bindings call Init, Handle and Reconcile here
// (the package name is theirs).
package export_prismhook_plugin_handler

import (
	"cisco-fmc/component"
	"cisco-fmc/fmc"
	types "cisco-fmc/internal/bindings/prismhook_plugin_types"

	witTypes "go.bytecodealliance.org/pkg/wit/types"
)

// Init checks the operator's configuration; an error keeps the plugin from
// loading.
func Init(settings string) witTypes.Result[types.PluginInfo, string] {
	parsed, err := fmc.ParseConfig(settings)
	if err != nil {
		return witTypes.Err[types.PluginInfo, string](err.Error())
	}
	component.Config = parsed
	component.Hold()
	return witTypes.Ok[types.PluginInfo, string](types.PluginInfo{
		Name:          fmc.Name,
		Version:       fmc.Version,
		Subscriptions: parsed.Subscriptions,
	})
}

func Handle(events []types.Event) []types.Outcome {
	component.Resume()
	converted := make([]fmc.Event, len(events))
	for i, e := range events {
		converted[i] = fmc.Event{
			Id: e.Id, Cluster: e.Cluster, EventType: e.EventType,
			EntityKind: e.EntityKind, EntityUuid: e.EntityUuid, Attempt: e.Attempt,
		}
		if e.Vm.IsSome() {
			vm := component.VmOf(e.Vm.Some())
			converted[i].Vm = &vm
		}
	}
	outcomes := fmc.Handle(component.Config, component.Host{}, converted)
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

// Reconcile is the whole-list reconcile, for hosts older than 0.1.2; newer
// ones call the paged one (export_prismhook_plugin_paged).
func Reconcile(cluster string, vms []types.Vm) witTypes.Result[string, string] {
	component.Resume()
	converted := make([]fmc.Vm, len(vms))
	for i, vm := range vms {
		converted[i] = component.VmOf(vm)
	}
	summary, err := fmc.Reconcile(component.Config, component.Host{}, cluster, converted)
	if err != nil {
		return witTypes.Err[string, string](err.Error())
	}
	return witTypes.Ok[string, string](summary)
}
