//! `prismhook:plugin/inventory`: the pages of a paged reconcile.

use crate::runtime::bindings::{inventory::Host, Vm};
use crate::runtime::state::HostState;

impl Host for HostState {
    fn next_page(&mut self) -> wasmtime::Result<Option<Vec<Vm>>> {
        Ok(self.inventory.as_mut().and_then(|pages| pages.next()))
    }
}
