//! prismhook plugin `paloalto`: keeps a PAN-OS firewall's User-ID IP→tag
//! registrations equal to the Nutanix VMs' state, so dynamic address groups
//! follow VMs without a single commit.
//!
//! The logic is plain Rust behind the [`host::Host`] trait and is tested
//! natively; only the `component` module below, compiled for Wasm, touches
//! the generated WIT bindings.

pub mod alloc;
pub mod config;
pub mod firewall;
pub mod handler;
pub mod host;
pub mod memcmp;
pub mod paged;
pub mod response;
pub mod state;
pub mod tags;
pub mod uid;

#[cfg(target_family = "wasm")]
mod component {
    use std::cell::RefCell;

    use crate::config::Config;
    use crate::host;

    wit_bindgen::generate!({ path: "../../wit", world: "paged-plugin" });

    use exports::prismhook::plugin::handler::Guest;
    use exports::prismhook::plugin::paged::Guest as PagedGuest;
    use prismhook::plugin::types::{Event, Outcome, PluginInfo, Retry, Vm};
    use prismhook::plugin::{context, http, inventory, kv, log};

    thread_local! {
        // Each instance serves `init` and then one call, so the
        // configuration only has to outlive that one call.
        static CONFIG: RefCell<Option<Config>> = const { RefCell::new(None) };
    }

    /// The host imports behind the plugin's [`host::Host`] trait.
    struct Imports;

    impl host::Host for Imports {
        fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
            kv::get(key)
        }

        fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
            kv::set(key, value)
        }

        fn kv_delete(&mut self, key: &str) -> Result<(), String> {
            kv::delete(key)
        }

        fn kv_list_after(
            &mut self,
            prefix: &str,
            after: Option<&str>,
            limit: u32,
        ) -> Result<Vec<String>, String> {
            kv::list_keys_after(prefix, after, limit)
        }

        fn send(&mut self, request: host::Request) -> Result<host::Response, host::HttpError> {
            let request = http::Request {
                method: request.method,
                url: request.url,
                headers: request.headers,
                body: Some(request.body),
                timeout_ms: None,
            };
            match http::send(&request) {
                Ok(response) => Ok(host::Response {
                    status: response.status,
                    headers: response.headers,
                    body: response.body,
                }),
                Err(error) => Err(match error {
                    http::Error::Denied(why) => host::HttpError::Denied(why),
                    http::Error::InvalidRequest(why) => host::HttpError::InvalidRequest(why),
                    http::Error::Timeout => host::HttpError::Timeout,
                    http::Error::ConnectionFailed(why) => host::HttpError::ConnectionFailed(why),
                    http::Error::TooLarge(limit) => host::HttpError::TooLarge(limit),
                    http::Error::LimitExceeded(why) => host::HttpError::LimitExceeded(why),
                    http::Error::Other(why) => host::HttpError::Other(why),
                }),
            }
        }

        fn log(&mut self, level: host::Level, message: &str) {
            let level = match level {
                host::Level::Debug => log::Level::Debug,
                host::Level::Info => log::Level::Info,
                host::Level::Warn => log::Level::Warn,
            };
            log::log(level, message);
        }
    }

    fn vm(vm: Vm) -> host::Vm {
        // One host call per VM, made only when a tag names the cluster.
        let wants_cluster = CONFIG.with(|slot| {
            slot.borrow()
                .as_ref()
                .is_some_and(|c| c.category_tag.uses_vm_cluster())
        });
        host::Vm {
            cluster_name: if wants_cluster {
                context::vm_cluster_name(&vm.uuid)
            } else {
                None
            },
            uuid: vm.uuid,
            name: vm.name,
            power_state: vm.power_state,
            categories: vm
                .categories
                .into_iter()
                .map(|c| (c.key, c.value))
                .collect(),
            nics: vm.nics.into_iter().map(|nic| nic.ips).collect(),
        }
    }

    fn event(event: Event) -> host::Event {
        host::Event {
            id: event.id,
            cluster: event.cluster,
            event_type: event.event_type,
            entity_uuid: event.entity_uuid,
            vm: event.vm.map(vm),
        }
    }

    fn outcome(outcome: host::Outcome) -> Outcome {
        match outcome {
            host::Outcome::Done => Outcome::Done,
            host::Outcome::Retry { reason, delay_ms } => Outcome::Retry(Retry { reason, delay_ms }),
            host::Outcome::Reject(reason) => Outcome::Reject(reason),
        }
    }

    const NOT_INITIALISED: &str = "paloalto: called before a successful init";

    struct Plugin;

    impl Guest for Plugin {
        // Runs on every fresh instance, so once per call: it checks the
        // settings and says nothing (the host logs the load), and the
        // subscriptions, which only the host reads, are handed over, not
        // copied.
        fn init(config: String) -> Result<PluginInfo, String> {
            let mut config = Config::parse(&config).map_err(|e| e.to_string())?;
            let info = PluginInfo {
                name: "paloalto".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                subscriptions: std::mem::take(&mut config.subscriptions),
            };
            CONFIG.with(|slot| *slot.borrow_mut() = Some(config));
            Ok(info)
        }

        fn handle(events: Vec<Event>) -> Vec<Outcome> {
            let count = events.len();
            let events: Vec<host::Event> = events.into_iter().map(event).collect();
            CONFIG.with(|slot| match slot.borrow().as_ref() {
                Some(config) => crate::handler::handle(config, &mut Imports, &events)
                    .into_iter()
                    .map(outcome)
                    .collect(),
                None => (0..count)
                    .map(|_| {
                        Outcome::Retry(Retry {
                            reason: NOT_INITIALISED.to_owned(),
                            delay_ms: None,
                        })
                    })
                    .collect(),
            })
        }

        fn reconcile(cluster: String, vms: Vec<Vm>) -> Result<String, String> {
            let vms: Vec<host::Vm> = vms.into_iter().map(vm).collect();
            CONFIG.with(|slot| match slot.borrow().as_ref() {
                Some(config) => crate::handler::reconcile(config, &mut Imports, &cluster, &vms),
                None => Err(NOT_INITIALISED.to_owned()),
            })
        }
    }

    impl PagedGuest for Plugin {
        fn reconcile(cluster: String) -> Result<String, String> {
            let pages = || inventory::next_page().map(|page| page.into_iter().map(vm).collect());
            CONFIG.with(|slot| match slot.borrow().as_ref() {
                Some(config) => crate::paged::reconcile(config, &mut Imports, &cluster, pages),
                None => Err(NOT_INITIALISED.to_owned()),
            })
        }
    }

    export!(Plugin);
}
