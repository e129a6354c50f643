// Package export_prismhook_plugin_handler is what the plugin exports: the
// generated bindings call Init, Handle and Reconcile here (the package name
// is the one they expect).
//
// The host makes every call on a fresh instance: Init with the operator's
// configuration, then exactly one Handle or Reconcile. Globals do not
// survive between calls; what must be remembered goes into kv, whose writes
// become durable together when the call returns.
package export_prismhook_plugin_handler

import (
	"encoding/json"
	"fmt"
	"runtime/debug"

	kv "{{name}}/internal/bindings/prismhook_plugin_kv"
	log "{{name}}/internal/bindings/prismhook_plugin_log"
	. "{{name}}/internal/bindings/prismhook_plugin_types"

	witTypes "go.bytecodealliance.org/pkg/wit/types"
)

const (
	name    = "{{name}}"
	version = "0.1.0"
)

// The host writes the arguments of Handle and Reconcile (and what an import
// returns) into Go's heap through cabi_realloc, where nothing may call out
// of the instance; a garbage collection that ends in there reads the wall
// clock from the host and the call traps ("cannot leave component instance
// (in clock_time_get)"). So Init turns the collector off before the host
// writes the batch, and Handle and Reconcile turn it back on. Around an
// import that returns a lot (an HTTP body, many kv keys, a page), turn it
// off too, and unpin what the host wrote afterwards, or it stays for the
// rest of the call: nextPage in paged.go does both.
func holdGC()   { debug.SetGCPercent(-1) }
func resumeGC() { debug.SetGCPercent(100) }

// Init reads config, the operator's settings for this plugin as a JSON
// object (`{}` when there are none). An error keeps the plugin from loading.
func Init(config string) witTypes.Result[PluginInfo, string] {
	var settings map[string]any
	if err := json.Unmarshal([]byte(config), &settings); err != nil {
		return witTypes.Err[PluginInfo, string](fmt.Sprintf("%s: the configuration must be a JSON object: %v", name, err))
	}
	holdGC()
	return witTypes.Ok[PluginInfo, string](PluginInfo{
		Name:          name,
		Version:       version,
		Subscriptions: []string{"VM.*"},
	})
}

// Handle returns one outcome per event, in order. Delivery is at least
// once: the same event (same Id) may come again, so side effects must be
// idempotent.
func Handle(events []Event) []Outcome {
	resumeGC()
	outcomes := make([]Outcome, len(events))
	for i, event := range events {
		outcomes[i] = handleOne(event)
	}
	return outcomes
}

// Reconcile is never called: the world requires it (the whole inventory in
// one list, for hosts before 0.1.2), but hosts that can load this plugin (it
// imports `inventory`) call Reconcile in export_prismhook_plugin_paged.
func Reconcile(cluster string, vms []Vm) witTypes.Result[string, string] {
	resumeGC()
	return witTypes.Ok[string, string](fmt.Sprintf("%d VMs in %s: nothing to reconcile", len(vms), cluster))
}

func handleOne(event Event) Outcome {
	log.Log(log.LevelInfo, fmt.Sprintf(
		"%s %s %s (event %s, attempt %d)",
		event.Cluster, event.EventType, event.EntityUuid, event.Id, event.Attempt))
	// Something to see from outside: the id of the last event handled.
	if result := kv.Set("last-event", []byte(event.Id)); result.IsErr() {
		return MakeOutcomeRetry(Retry{Reason: "kv: " + result.Err(), DelayMs: witTypes.None[uint64]()})
	}
	return MakeOutcomeDone()
}
