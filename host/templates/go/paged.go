// Package export_prismhook_plugin_paged is what the plugin exports as
// `paged` (WIT 0.1.2 on): the reconcile the host calls instead of the
// handler's, with the inventory a page at a time (the package name is the
// bindings').
package export_prismhook_plugin_paged

import (
	"fmt"
	"runtime/debug"

	inventory "{{name}}/internal/bindings/prismhook_plugin_inventory"
	types "{{name}}/internal/bindings/prismhook_plugin_types"

	witRuntime "go.bytecodealliance.org/pkg/wit/runtime"
	witTypes "go.bytecodealliance.org/pkg/wit/types"
)

// Reconcile gets the VM inventory of a cluster, at start and on a timer, a
// page at a time (so that neither this plugin's memory nor the host's
// grows with it): bring outside state back in step with it here.
func Reconcile(cluster string) witTypes.Result[string, string] {
	debug.SetGCPercent(100) // Init turned it off: see handler.go
	vms := 0
	for {
		page := nextPage()
		if page.IsNone() {
			break
		}
		vms += len(page.Some())
	}
	return witTypes.Ok[string, string](fmt.Sprintf("%d VMs in %s, read a page at a time: nothing to reconcile", vms, cluster))
}

// nextPage is inventory.NextPage with the collector off while the host
// writes the page into the heap, and the page's memory unpinned after, so
// that the pages read before can be collected (see handler.go).
func nextPage() witTypes.Option[[]types.Vm] {
	old := debug.SetGCPercent(-1)
	defer debug.SetGCPercent(old)
	defer witRuntime.Unpin()
	return inventory.NextPage()
}
