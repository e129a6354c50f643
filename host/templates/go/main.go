// Command {{name}} is a prismhook plugin; `cargo xtask plugins` builds it
// into a WebAssembly component with `GOOS=wasip1 -buildmode=c-shared`.
package main

// The generated glue that exports the plugin's functions to the host; it
// calls Init, Handle and Reconcile in export_prismhook_plugin_handler.
import _ "{{name}}/internal/bindings/wit_exports"

// A c-shared (reactor) module never runs main; Go wants one all the same.
func main() {}
