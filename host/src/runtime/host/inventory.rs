//! `prismhook:plugin/inventory`: the pages of a paged reconcile.

use std::sync::Arc;
use std::time::Instant;

use crate::runtime::bindings::{inventory::Host, Vm};
use crate::runtime::state::HostState;

impl Host for HostState {
    async fn next_page(&mut self) -> wasmtime::Result<Option<Vec<Vm>>> {
        if self.inventory.is_none() {
            return Ok(None);
        }
        let waiting = Instant::now();
        // Waiting for the listing is not the plugin's time: the timer
        // around the call (see `HostState::deadline_shared`) waits too.
        self.hold_deadline();
        let inventory = self.inventory.as_mut().expect("checked above");
        let next = inventory.next().await;
        self.extend_deadline(waiting.elapsed());
        let page = match next {
            Ok(Some(page)) => page,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.inventory_failed = Some(e.clone());
                return Err(e.into());
            }
        };
        // The deadline and the request budget are the plugin's once per
        // page: a long inventory is not a slow or chatty plugin.
        if self.pages_read > 0 {
            let limits = self.plugin.limits;
            self.extend_deadline(limits.deadline);
            self.max_requests = self
                .max_requests
                .saturating_add(limits.max_requests_per_call);
        }
        self.pages_read += 1;
        // The call's own map (a paged reconcile starts with an empty one),
        // so this does not copy it.
        let clusters = Arc::make_mut(&mut self.vm_clusters);
        for vm in page.iter() {
            if let Some(name) = &vm.cluster_name {
                clusters.insert(&vm.uuid, name);
            }
        }
        Ok(Some(page.iter().map(Vm::from).collect()))
    }
}
