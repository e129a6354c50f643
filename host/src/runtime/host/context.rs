//! `prismhook:plugin/context`: what a call runs for.

use crate::runtime::bindings::context::Host;
use crate::runtime::state::HostState;

impl Host for HostState {
    fn instance(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self.plugin.instance.clone())
    }

    fn vm_cluster_name(&mut self, vm_uuid: String) -> wasmtime::Result<Option<String>> {
        Ok(self.vm_clusters.get(&vm_uuid).map(str::to_owned))
    }
}
