//! A plugin as its `init` leaves it, made once per load: the component
//! rewritten (wasmtime-wizer) so that its memories and globals start where
//! `init(config)` left them, and a call runs `handle` or `reconcile` on a
//! fresh instance of that image without running `init` again.
//!
//! Only an `init` that computes from its configuration alone can be
//! captured: what it got from the host (kv, a sign-in, a WASI stream whose
//! handle would not exist in the next call's Store) must not be frozen into
//! the image. So the runtime tries only when the load's own `init` called
//! nothing but `log` and `context` (`HostState::host_calls`), whose answers
//! are fixed for the load, and the instance here answers those two as the
//! load did and has every other import stubbed as a trap besides. A plugin
//! that cannot be captured keeps running `init` in every call, as before.

use std::time::Instant;

use wasmtime::component::{Component, HasSelf, Instance, Lift, Linker, WasmList};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

use super::bindings::{self, context, log, PluginInfo};
use super::Limits;

/// Why a plugin has no snapshot; it then runs `init` in every call.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("wizer cannot instrument the component: {0}")]
    Instrument(String),
    #[error("the component instrumented for its snapshot does not compile or link: {0}")]
    Compile(String),
    #[error("`init` failed in the instance for the snapshot, which it did not at load: {0}")]
    Init(String),
    #[error("`init` refused its configuration in the instance for the snapshot, which it did not at load: {0}")]
    Refused(String),
    #[error("wizer cannot rewrite the component from its instance: {0}")]
    Rewrite(String),
}

struct State {
    limits: StoreLimits,
    deadline: Instant,
    /// What `context.instance` answers: the load's instance name.
    instance: Option<String>,
}

/// The load's `init` logged these lines already.
impl log::Host for State {
    fn log(&mut self, _: log::Level, _: String) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// As for the load; `init` has no VMs to name.
impl context::Host for State {
    fn instance(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self.instance.clone())
    }

    fn vm_cluster_name(&mut self, _: String) -> wasmtime::Result<Option<String>> {
        Ok(None)
    }
}

/// Runs `init(config)` in an instance whose imports all trap but `log`
/// and `context` (answered as at the load), and returns the component
/// rewritten to start from that instance's state, with what `init`
/// returned. `instance` is the name the load runs under, if an instance.
pub(super) async fn snapshot(
    engine: &Engine,
    bytes: &[u8],
    config: &str,
    instance: Option<String>,
    limits: Limits,
    compile: impl Fn(&[u8]) -> Result<Component, SnapshotError>,
) -> Result<(Vec<u8>, PluginInfo), SnapshotError> {
    let wizer = Wizer::new();
    let (cx, instrumented) = wizer
        .instrument_component(bytes)
        .map_err(|e| SnapshotError::Instrument(format!("{e:#}")))?;
    let component = compile(&instrumented)?;
    let mut linker = Linker::<State>::new(engine);
    log::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
        .and_then(|()| context::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s))
        .map_err(|e| SnapshotError::Compile(format!("{e:#}")))?;
    linker
        .define_unknown_imports_as_traps(&component)
        .map_err(|e| SnapshotError::Compile(format!("{e:#}")))?;

    let mut store = Store::new(
        engine,
        State {
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .build(),
            deadline: Instant::now() + limits.deadline,
            instance,
        },
    );
    store.limiter(|s| &mut s.limits);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| {
        if Instant::now() >= ctx.data().deadline {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
    let init = async {
        let instance = linker.instantiate_async(&mut store, &component).await?;
        let plugin = bindings::Plugin::new(&mut store, &instance)?;
        let info = plugin
            .prismhook_plugin_handler()
            .call_init(&mut store, config)
            .await?;
        Ok::<_, wasmtime::Error>((instance, info))
    };
    let (instance, info) = init
        .await
        .map_err(|e| SnapshotError::Init(format!("{e:#}")))?;
    let info = info.map_err(SnapshotError::Refused)?;
    let bytes = wizer
        .snapshot_component(
            &cx,
            &mut Access {
                store: &mut store,
                instance,
            },
        )
        .await
        .map_err(|e| SnapshotError::Rewrite(format!("{e:#}")))?;
    Ok((bytes, info))
}

/// What wizer reads the instance's state through: the accessor functions
/// its instrumentation exported. Its trait has no room for an error, and
/// these only read globals and memories it added itself, so a failure is a
/// bug in wizer: a panic, which the runtime catches and logs, and the plugin
/// runs `init` in every call.
struct Access<'a> {
    store: &'a mut Store<State>,
    instance: Instance,
}

impl Access<'_> {
    async fn call<R: Lift + Send + Sync + 'static, O>(
        &mut self,
        instance: &str,
        func: &str,
        then: impl FnOnce(&Store<State>, R) -> O,
    ) -> O {
        let export = self
            .instance
            .get_export_index(&mut *self.store, None, instance)
            .and_then(|i| {
                self.instance
                    .get_export_index(&mut *self.store, Some(&i), func)
            })
            .expect("wizer's instrumentation exports its accessors");
        let func = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, export)
            .expect("wizer's accessors have the types wizer asks for");
        let (ret,) = func
            .call_async(&mut *self.store, ())
            .await
            .expect("wizer's accessors only read state");
        then(self.store, ret)
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        self.call(instance, func, |store, list: WasmList<u8>| {
            contents(list.as_le_slice(store))
        })
        .await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, r: f32| r.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, r: f64| r.to_bits()).await
    }
}
