// Command cisco-fmc is the prismhook plugin that keeps Cisco Secure Firewall
// Management Center dynamic objects' IP mappings equal to the Nutanix VMs'
// state. `cargo xtask plugins cisco-fmc` builds it into a component.
package main

// The generated glue that exports the plugin to the host; it calls Init,
// Handle and Reconcile in export_prismhook_plugin_handler.
import _ "cisco-fmc/internal/bindings/wit_exports"

// A c-shared (reactor) module never runs main; Go wants one all the same.
func main() {}
