//! A loaded plugin version and its calls: each call a fresh `Store` and
//! instance of the version's `InstancePre`, dropped when the call ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{ComponentExportIndex, InstancePre};
use wasmtime::{Engine, Store, UpdateDeadline};

use super::bindings::{self, Event, Outcome, PluginIndices, PluginInfo, Vm};
use super::feed::{self, Inventory};
use super::state::{CallEnv, HostCalls, HostState, PluginIdentity};
use super::{kv_store, tier_of, CallError, KvFailure, Limits, LoadError, Source, Tier, VmClusters};

/// A component linked against the host's world, its exports found once:
/// bindgen's `Plugin::new` looks them up by name in every call (and its
/// `PluginPre` keeps the indices to itself).
#[derive(Clone)]
pub(super) struct Linked {
    pub(super) instance_pre: InstancePre<HostState>,
    pub(super) exports: PluginIndices,
}

/// A loaded plugin version: cheap to clone, safe to call concurrently.
#[derive(Clone)]
pub struct Plugin {
    /// What its calls share with every other plugin's.
    pub(super) env: Arc<CallEnv>,
    pub(super) identity: Arc<PluginIdentity>,
    pub(super) info: PluginInfo,
    pub(super) config: String,
    /// The engine that compiled `pre`'s code: its Stores come from it.
    pub(super) engine: Engine,
    pub(super) pre: Linked,
    /// Whether `pre` is the snapshot of an instance after `init` (see
    /// `snapshot.rs`): calls then start from that state and do not run
    /// `init` again; what it returned is `info`.
    pub(super) pre_initialised: bool,
    /// The calls to the host its `init` made when it last ran at a load:
    /// with any, it cannot be snapshotted.
    pub(super) init_calls: HostCalls,
    /// Why no snapshot could be made of this load, once one was tried: its
    /// calls run `init` (operators see it in `/api/plugins`).
    pub(super) init_every_call: Option<Arc<str>>,
    /// Its paged reconcile, when it exports one (`paged-plugin`).
    pub(super) paged: Option<ComponentExportIndex>,
    /// The file's bytes while the code is Winch's (for Cranelift).
    pub(super) source: Option<Arc<[u8]>>,
    pub(super) sha256: String,
    pub(super) file: PathBuf,
    pub(super) size: usize,
    pub(super) from_cache: bool,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.identity.name)
            .field("version", &self.info.version)
            .field("file", &self.file)
            .field("tier", &self.tier())
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The name it serves under: its instance's, or its `init`'s.
    pub fn name(&self) -> &str {
        &self.identity.name
    }

    /// The operator's name for this instance of the component, if it runs
    /// as one.
    pub fn instance(&self) -> Option<&str> {
        self.identity.instance.as_deref()
    }

    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether the compiled code came from the on-disk cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    pub fn tier(&self) -> Tier {
        tier_of(&self.source)
    }

    /// Whether its calls start from a snapshot of its instance after
    /// `init` rather than running `init` first.
    pub fn pre_initialised(&self) -> bool {
        self.pre_initialised
    }

    /// Whether a snapshot after `init` may still be made of it: it serves
    /// Cranelift's code, and none was made or refused yet.
    pub fn awaits_snapshot(&self) -> bool {
        self.tier() == Tier::Optimized && !self.pre_initialised && self.init_every_call.is_none()
    }

    /// Why its calls run `init` though a snapshot after `init` was tried
    /// ([`Runtime::pre_initialise`](super::Runtime::pre_initialise)); `None`
    /// if none was, or one serves.
    pub fn init_every_call(&self) -> Option<&str> {
        self.init_every_call.as_deref()
    }

    /// What Cranelift needs to compile this plugin; `None` once it runs
    /// Cranelift's code.
    pub fn source(&self) -> Option<Source> {
        self.source.as_ref().map(|bytes| Source {
            file: self.file.clone(),
            sha256: self.sha256.clone(),
            bytes: bytes.clone(),
        })
    }

    /// Whether both are the same load of a file (with the same settings),
    /// whichever compiler made their code.
    pub fn same_load(&self, other: &Plugin) -> bool {
        Arc::ptr_eq(&self.identity, &other.identity)
    }

    pub fn limits(&self) -> Limits {
        self.identity.limits
    }

    /// The largest linear memory a call of this load has reached, in bytes
    /// (at most the limit: a call that asked for more failed).
    pub fn memory_peak(&self) -> usize {
        self.identity
            .memory_peak
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `init` alone, as a load does before the plugin serves (for a
    /// snapshot, only instantiates it); and tells which calls to the host
    /// `init` made.
    pub(super) async fn init(&self) -> Result<(PluginInfo, HostCalls), LoadError> {
        let file = self.file.clone();
        match self.call(Call::Init, "init", Arc::default()).await {
            Ok(Returned::Init { info, calls }) => Ok((info, calls)),
            Ok(_) => unreachable!("init returns the plugin's info"),
            Err(CallError::Init { message, .. }) => Err(LoadError::InitRefused { file, message }),
            Err(source) => Err(LoadError::Init { file, source }),
        }
    }

    /// Delivers a batch; one outcome per event, in order.
    pub async fn handle(&self, events: Vec<Event>) -> Result<Vec<Outcome>, CallError> {
        self.handle_in(&events, Arc::default()).await
    }

    /// Waits until a read of the plugin's kv sees every write this host
    /// made (see [`kv_store::KvBackend::settle`]); a call made before then
    /// fails at once.
    pub async fn settle_kv(&self) -> Result<(), kv_store::KvError> {
        self.env.kv.settle().await
    }

    /// [`Plugin::handle`], telling the plugin which Nutanix cluster each of
    /// the batch's VMs belongs to. The batch is only borrowed: the
    /// dispatcher keeps it to try its events one by one if the call fails.
    pub async fn handle_in(
        &self,
        events: &[Event],
        vm_clusters: Arc<VmClusters>,
    ) -> Result<Vec<Outcome>, CallError> {
        let expected = events.len();
        let context = events
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let Returned::Handle(outcomes) = self
            .call(Call::Handle(events), &context, vm_clusters)
            .await?
        else {
            unreachable!("handle returns outcomes")
        };
        if outcomes.len() != expected {
            return Err(CallError::OutcomeCount {
                plugin: self.name().to_owned(),
                expected,
                got: outcomes.len(),
            });
        }
        Ok(outcomes)
    }

    /// Whether it exports the paged reconcile, and so can be handed an
    /// inventory as it is listed ([`Plugin::reconcile_fed`]).
    pub fn is_paged(&self) -> bool {
        self.paged.is_some()
    }

    /// Hands the plugin one cluster's whole inventory, and which Nutanix
    /// cluster each VM belongs to: in one list, or a page at a time when it
    /// exports the paged reconcile (the cluster names then come from the
    /// VMs, as in [`Plugin::reconcile_fed`]).
    pub async fn reconcile(
        &self,
        cluster: &str,
        vms: Arc<Vec<crate::event::Vm>>,
        vm_clusters: Arc<VmClusters>,
    ) -> Result<Result<String, String>, CallError> {
        if self.is_paged() {
            let (feed, inventory) = Inventory::fed();
            let send = feed::send_list(feed, &vms);
            return tokio::join!(send, self.reconcile_fed(cluster, inventory)).1;
        }
        let call = Call::Reconcile(cluster.to_owned(), vms.iter().map(Vm::from).collect());
        self.reconcile_call(cluster, call, vm_clusters).await
    }

    /// Hands a plugin that [`is_paged`](Plugin::is_paged) an inventory
    /// that `inventory` receives while the call runs; which Nutanix cluster
    /// each VM belongs to is taken from its pages. Panics for a plugin
    /// that is not paged: its caller chooses by `is_paged`.
    pub async fn reconcile_fed(
        &self,
        cluster: &str,
        inventory: Inventory,
    ) -> Result<Result<String, String>, CallError> {
        assert!(self.is_paged(), "only a paged reconcile reads a feed");
        let call = Call::ReconcilePaged(cluster.to_owned(), Some(inventory));
        self.reconcile_call(cluster, call, Arc::default()).await
    }

    async fn reconcile_call(
        &self,
        cluster: &str,
        call: Call<'_>,
        vm_clusters: Arc<VmClusters>,
    ) -> Result<Result<String, String>, CallError> {
        let context = format!("reconcile:{cluster}");
        let Returned::Reconcile(result) = self.call(call, &context, vm_clusters).await? else {
            unreachable!("reconcile returns a result")
        };
        Ok(result)
    }

    /// One bounded call: a fresh Store and instance, `init`, then the
    /// export asked for; kv writes are committed only if all of it returns.
    async fn call(
        &self,
        mut call: Call<'_>,
        context: &str,
        vm_clusters: Arc<VmClusters>,
    ) -> Result<Returned, CallError> {
        // A call that may write must read what this host wrote before. The
        // dispatcher waits for that before it claims (`settle_kv`): a call
        // never waits, as what it claimed is leased for a limited time.
        // Not made, it is no conflict of this plugin's: any plugin's write
        // that failed since the claim (a node down) unsettles the store.
        if !matches!(call, Call::Init) && !self.env.kv.settled() {
            return Err(CallError::Kv {
                plugin: self.identity.name.clone(),
                message: "this host has not read back its own last kv writes yet".into(),
                failure: KvFailure::Unavailable,
            });
        }
        let state = HostState::new(
            self.identity.clone(),
            context.into(),
            vm_clusters,
            &self.env,
        );
        let mut store = Store::new(&self.engine, state);
        if let Call::ReconcilePaged(_, inventory) = &mut call {
            // Moved into the Store, where `inventory.next-page` hands it
            // out and grows the deadline and the request budget by the
            // plugin's own with each page after the first.
            store.data_mut().inventory = inventory.take();
        }
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if Instant::now() >= state.deadline {
                state.timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            // Yield to the executor at every tick, so a busy guest shares
            // its thread with the listener and other plugins. Through tokio's
            // own `yield_now`: tokio defers that task behind timers, I/O and
            // every other ready task, where wasmtime's generic yield wakes it
            // at once and a spinning guest is polled again before the rest.
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });

        let export = call.export();
        // A paged reconcile's error discards its kv writes (wit/paged.wit):
        // it has written the inventory's records before it knows whether
        // the outside took the change.
        let writes_need_success = matches!(call, Call::ReconcilePaged(..));
        let deadline = store.data().deadline_shared.clone();
        let running = async {
            let instance = self.pre.instance_pre.instantiate_async(&mut store).await?;
            let plugin = self.pre.exports.load(&mut store, &instance)?;
            let handler = plugin.prismhook_plugin_handler();
            let info = if self.pre_initialised {
                matches!(call, Call::Init).then(|| self.info.clone())
            } else {
                match handler.call_init(&mut store, &self.config).await? {
                    Ok(info) => Some(info),
                    Err(message) => return Ok(Err(message)),
                }
            };
            let paged = |store: &mut Store<HostState>| {
                let index = self.paged.as_ref().expect("checked by the caller");
                instance
                    .get_typed_func::<(&str,), (Result<String, String>,)>(store, index)
                    .map_err(|e| {
                        e.context(format!(
                            "its export {} is not the function of {}",
                            bindings::PAGED,
                            bindings::PACKAGE
                        ))
                    })
            };
            let returned = match call {
                // A paged reconcile of the wrong type fails the load, not
                // the first reconcile.
                Call::Init => {
                    if self.paged.is_some() {
                        paged(&mut store)?;
                    }
                    Returned::Init {
                        info: info.expect("init's answer, or the snapshot's"),
                        calls: HostCalls::default(),
                    }
                }
                Call::Handle(events) => {
                    Returned::Handle(handler.call_handle(&mut store, events).await?)
                }
                Call::Reconcile(cluster, vms) => {
                    Returned::Reconcile(handler.call_reconcile(&mut store, &cluster, &vms).await?)
                }
                Call::ReconcilePaged(cluster, _) => {
                    let reconcile = paged(&mut store)?;
                    Returned::Reconcile(reconcile.call_async(&mut store, (&cluster,)).await?.0)
                }
            };
            Ok::<_, wasmtime::Error>(Ok(returned))
        };
        let result = past_its_deadline(running, &deadline).await;
        if result.is_none() {
            store.data_mut().timed_out = true;
        }
        let result = result.unwrap_or_else(|| Err(wasmtime::Error::msg("deadline")));
        let state = store.into_data();
        self.identity.memory_peak.fetch_max(
            state.limiter.memory_peak(),
            std::sync::atomic::Ordering::Relaxed,
        );

        let plugin = self.identity.name.clone();
        // The plugin may have been told of the failed file (a `kv.get`
        // answered `err`) and answered accordingly: whatever it answered,
        // its events wait for the host to be started again, unharmed.
        if let Some(why) = self.env.kv.failure() {
            return Err(CallError::Kv {
                plugin,
                message: why,
                failure: KvFailure::Unavailable,
            });
        }
        match result {
            Ok(Ok(mut ok)) => {
                if let Returned::Init { calls, .. } = &mut ok {
                    *calls = state.host_calls;
                }
                let session = state.kv;
                let failed = matches!(ok, Returned::Reconcile(Err(_)));
                if session.has_writes() && !(writes_need_success && failed) {
                    match tokio::task::spawn_blocking(move || session.commit()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(CallError::kv(plugin, &e)),
                        // A panic storing them is a bug that would meet the
                        // same writes again, so it costs their attempts; a
                        // task cancelled (the runtime shutting down) does not.
                        Err(e) => {
                            let failure = if e.is_panic() {
                                KvFailure::Refused
                            } else {
                                KvFailure::Unavailable
                            };
                            return Err(CallError::Kv {
                                plugin,
                                message: e.to_string(),
                                failure,
                            });
                        }
                    }
                }
                Ok(ok)
            }
            Ok(Err(message)) => Err(CallError::Init { plugin, message }),
            Err(_) if state.inventory_failed.is_some() => Err(CallError::Inventory {
                plugin,
                reason: state.inventory_failed.expect("checked"),
            }),
            Err(_) if state.timed_out => Err(CallError::Timeout {
                plugin,
                export,
                deadline: self.identity.limits.deadline,
            }),
            Err(_) if state.limiter.memory_exceeded.is_some() => Err(CallError::Memory {
                plugin,
                export,
                limit_mib: self.identity.limits.memory_bytes >> 20,
            }),
            Err(e) => Err(CallError::Trap {
                plugin,
                export,
                message: trap_message(&e),
            }),
        }
    }
}

/// `call`, or `None` once the call's `deadline` (which a paged reconcile
/// moves as it reads pages) has passed by [`OUTER_GRACE`]: dropped then,
/// wherever the guest is waiting. Wasm that runs is stopped at the deadline
/// by the epoch callback; this ends a guest that waits in a host call (a
/// WASI sleep of an hour or for ever), which runs no wasm to stop.
async fn past_its_deadline<T>(
    call: impl std::future::Future<Output = T>,
    deadline: &std::sync::Mutex<Instant>,
) -> Option<T> {
    let now = || *deadline.lock().unwrap_or_else(|e| e.into_inner());
    tokio::pin!(call);
    loop {
        let until = now() + OUTER_GRACE;
        tokio::select! {
            done = &mut call => return Some(done),
            () = tokio::time::sleep_until(until.into()) => {
                if now() + OUTER_GRACE <= Instant::now() {
                    return None;
                }
            }
        }
    }
}

/// How long past its deadline a call waiting in the host is let be: the
/// epoch callback, which stops running wasm with a clearer account, comes
/// first when it can.
const OUTER_GRACE: Duration = Duration::from_millis(500);

pub(super) enum Call<'a> {
    Init,
    Handle(&'a [Event]),
    Reconcile(String, Vec<Vm>),
    /// The cluster, and the inventory `inventory.next-page` hands out
    /// (taken into the Store when the call starts).
    ReconcilePaged(String, Option<Inventory>),
}

impl Call<'_> {
    fn export(&self) -> &'static str {
        match self {
            Call::Init => "init",
            Call::Handle(_) => "handle",
            Call::Reconcile(..) => "reconcile",
            Call::ReconcilePaged(..) => "paged.reconcile",
        }
    }
}

pub(super) enum Returned {
    Init {
        info: PluginInfo,
        /// The calls the instance made to the host before it answered.
        calls: HostCalls,
    },
    Handle(Vec<Outcome>),
    Reconcile(Result<String, String>),
}

/// The guest's panic message (printed to stderr and already logged) is not
/// in the error; the trap code and the innermost wasm frames are.
fn trap_message(e: &wasmtime::Error) -> String {
    let mut msg = format!("{e}");
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        msg = format!("{trap}");
    }
    if let Some(bt) = e.downcast_ref::<wasmtime::WasmBacktrace>() {
        if let Some(frame) = bt.frames().iter().find_map(|f| f.func_name()) {
            msg.push_str(&format!(" (in {frame})"));
        }
    }
    msg
}
