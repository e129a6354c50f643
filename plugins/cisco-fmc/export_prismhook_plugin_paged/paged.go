// Package export_prismhook_plugin_paged is what the plugin exports as
// `paged` (WIT 0.1.2): the reconcile that reads the inventory a page at a
// time from `inventory.next-page` (the package name is the bindings').
package export_prismhook_plugin_paged

import (
	"cisco-fmc/component"
	"cisco-fmc/fmc"

	witTypes "go.bytecodealliance.org/pkg/wit/types"
)

func Reconcile(cluster string) witTypes.Result[string, string] {
	component.Resume()
	summary, err := fmc.PagedReconcile(component.Config, component.Host{}, cluster, component.NextPage)
	if err != nil {
		return witTypes.Err[string, string](err.Error())
	}
	return witTypes.Ok[string, string](summary)
}
