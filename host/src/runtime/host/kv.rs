//! `prismhook:plugin/kv`: the plugin's private store, through the call's
//! write-buffering session (see `kv_store`).

use crate::runtime::bindings::kv::Host;
use crate::runtime::state::HostState;

impl Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, String>> {
        Ok(self.kv.get(&key).map_err(|e| e.to_string()))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        Ok(self.kv.set(key, value).map_err(|e| e.to_string()))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
        Ok(self.kv.delete(key).map_err(|e| e.to_string()))
    }

    fn list_keys(&mut self, prefix: String) -> wasmtime::Result<Result<Vec<String>, String>> {
        Ok(self.kv.list_keys(&prefix).map_err(|e| e.to_string()))
    }

    fn list_keys_after(
        &mut self,
        prefix: String,
        after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<String>, String>> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(self
            .kv
            .list_keys_after(&prefix, after.as_deref(), limit)
            .map_err(|e| e.to_string()))
    }

    async fn commit(&mut self) -> wasmtime::Result<Result<(), String>> {
        Ok(self.kv.commit_now().await.map_err(|e| e.to_string()))
    }
}
