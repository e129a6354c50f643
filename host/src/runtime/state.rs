//! The one host state of a Store: everything a single call may touch.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::clusters::VmClusters;
use super::kv_store::{KvSession, KvStore};
use super::limits::Limits;
use super::policy::OutboundPolicy;
use super::stdio::{GuestOutput, LogBudget};

/// Who is calling: fixed for a plugin version, shared by all its calls.
#[derive(Debug)]
pub struct PluginIdentity {
    /// The name it serves under (its instance's, else its `init`'s): its
    /// kv namespace, and the plugin named in logs and metrics.
    pub name: String,
    /// The operator's name for it when it runs as an instance of its
    /// component, as the `context` import tells it.
    pub instance: Option<String>,
    pub limits: Limits,
    pub policy: OutboundPolicy,
    /// Its own client when its configuration trusts other certificates
    /// than the public roots; `None` uses the shared one.
    pub http: Option<reqwest::Client>,
    /// The session tokens of its logins, shared by its calls.
    pub sessions: Arc<super::session::Sessions>,
    /// The most any call of this load held in its linear memories
    /// together, in bytes: how close the plugin runs to its limit.
    pub memory_peak: Arc<std::sync::atomic::AtomicUsize>,
}

/// Outbound requests since start by plugin, origin and result (the HTTP
/// status, or the error kind: `denied`, `timeout`, …), for metrics.
#[derive(Debug, Default)]
pub struct OutboundCounts(
    std::sync::Mutex<std::collections::BTreeMap<(String, String, String), u64>>,
);

impl OutboundCounts {
    pub(super) fn count(&self, plugin: &str, origin: String, result: String) {
        let mut all = self.0.lock().expect("outbound counts lock");
        *all.entry((plugin.to_owned(), origin, result)).or_default() += 1;
    }

    pub fn snapshot(&self) -> std::collections::BTreeMap<(String, String, String), u64> {
        self.0.lock().expect("outbound counts lock").clone()
    }
}

/// What every call of every plugin shares, built once by the runtime: the
/// services behind the host imports. A new import that needs a shared
/// service adds it here and takes it in [`HostState::new`], and nowhere else.
pub struct CallEnv {
    pub kv: KvStore,
    /// One connection pool for the outbound requests of every plugin that
    /// trusts the public roots.
    pub http: reqwest::Client,
    /// For the clients of plugins with a trust of their own.
    pub proxy_from_env: bool,
    pub outbound: Arc<OutboundCounts>,
}

pub struct HostState {
    /// Built at the first WASI call: a call that makes none (a snapshotted
    /// plugin's often does not) saves its allocations.
    wasi: Option<WasiCtx>,
    pub(super) table: ResourceTable,
    pub(super) plugin: Arc<PluginIdentity>,
    /// Event ids of the batch in hand, for log context.
    pub(super) context: Arc<str>,
    pub(super) deadline: Instant,
    /// [`HostState::deadline`], for the task that runs the call to read
    /// while the Store is lent to it: the epoch callback stops wasm that
    /// runs past the deadline, but a guest waiting in a host call (a WASI
    /// sleep) runs no wasm, and only a timer outside the call ends it.
    pub(super) deadline_shared: Arc<std::sync::Mutex<Instant>>,
    pub(super) timed_out: bool,
    pub(super) limiter: Limiter,
    pub(super) requests_made: u32,
    /// The plugin's `max_requests_per_call`, once per page in a paged
    /// reconcile.
    pub(super) max_requests: u32,
    pub(super) log_budget: LogBudget,
    pub(super) kv: KvSession,
    /// VM uuid → its Nutanix cluster's name, for the VMs of this call.
    pub(super) vm_clusters: Arc<VmClusters>,
    /// The inventory of a paged reconcile, for `inventory.next-page`.
    pub(super) inventory: Option<super::feed::Inventory>,
    /// Pages `inventory.next-page` has handed out.
    pub(super) pages_read: u32,
    /// Why `inventory.next-page` had no page to give, when it failed.
    pub(super) inventory_failed: Option<super::feed::FeedError>,
    pub(super) http: reqwest::Client,
    /// Whether `https://` requests may go through a proxy, which resolves
    /// their names itself.
    pub(super) proxy_from_env: bool,
    pub(super) outbound: Arc<OutboundCounts>,
    /// Calls the guest made to the host, but to `log` and `context`: an
    /// `init` that made none can be captured in a snapshot
    /// (`runtime/snapshot.rs`).
    pub(super) host_calls: HostCalls,
}

/// How many calls a guest made to the host that a snapshot could not
/// replay, by kind. `log` and `context` are not counted: what they answer
/// is fixed for a load (in `init`, `context` has no VMs to name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct HostCalls {
    pub(super) wasi: u32,
    /// `kv`, `http`, `inventory`: what they answer may differ next time.
    pub(super) stateful: u32,
}

impl HostCalls {
    /// Why an `init` that made these calls cannot be captured in a
    /// snapshot; `None` if it can. Said apart, as the cure differs: a kv
    /// read or a request is the plugin's own doing, WASI is mostly its
    /// language runtime starting.
    pub(super) fn keep_init_from_snapshot(self) -> Option<&'static str> {
        match (self.wasi > 0, self.stateful > 0) {
            (false, false) => None,
            (false, true) => Some("its `init` calls the host's kv, http or inventory imports, so the state it leaves is not kept"),
            (true, false) => Some("its `init` calls WASI (clocks, random or environment, as language runtimes do when they start), so the state it leaves is not kept"),
            (true, true) => Some("its `init` calls WASI and the host's kv, http or inventory imports, so the state it leaves is not kept"),
        }
    }
}

/// Resources (streams, pollables) a call may hold at once: language
/// runtimes hold a few.
const MAX_RESOURCES: usize = 4096;

/// The most one `get-random-bytes` may ask for; a guest asking for more
/// traps.
const MAX_RANDOM_BYTES: u64 = 1 << 20;

impl HostState {
    /// Holds the timer around the call while the host, not the plugin,
    /// takes its time; [`HostState::extend_deadline`] sets it again.
    pub(super) fn hold_deadline(&mut self) {
        const A_DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
        *self
            .deadline_shared
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now() + A_DAY;
    }

    /// Moves the call's deadline `by` later.
    pub(super) fn extend_deadline(&mut self, by: std::time::Duration) {
        self.deadline += by;
        *self
            .deadline_shared
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.deadline;
    }

    /// The state of one call of `plugin` (`context`: the event ids of the
    /// batch in hand, for log lines).
    pub(super) fn new(
        plugin: Arc<PluginIdentity>,
        context: Arc<str>,
        vm_clusters: Arc<VmClusters>,
        env: &CallEnv,
    ) -> HostState {
        let limits = plugin.limits;
        let deadline = Instant::now() + limits.deadline;
        // Each handle may hold host memory beyond the plugin's limit (a
        // stdout stream buffers a line): wasmtime's default of a million
        // would let a call hold gigabytes.
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        HostState {
            wasi: None,
            table,
            context,
            deadline,
            deadline_shared: Arc::new(std::sync::Mutex::new(deadline)),
            timed_out: false,
            limiter: Limiter::new(limits.memory_bytes),
            requests_made: 0,
            max_requests: limits.max_requests_per_call,
            log_budget: LogBudget::new(limits.max_log_bytes),
            kv: env
                .kv
                .session(&plugin.name, limits.kv_bytes)
                .listing_at_most(limits.memory_bytes),
            vm_clusters,
            inventory: None,
            pages_read: 0,
            inventory_failed: None,
            http: plugin.http.clone().unwrap_or_else(|| env.http.clone()),
            proxy_from_env: env.proxy_from_env,
            outbound: env.outbound.clone(),
            host_calls: HostCalls::default(),
            plugin,
        }
    }
}

/// A minimal WASI: no environment, arguments, preopened directories or
/// sockets. What a plugin needs from outside comes through the prismhook
/// imports, where policy applies.
fn minimal_wasi(plugin: &str, events: &Arc<str>, log_budget: &LogBudget) -> WasiCtx {
    let output = |stream| GuestOutput::new(plugin, events.clone(), stream, log_budget.clone());
    WasiCtx::builder()
        .stdout(output("stdout"))
        .stderr(output("stderr"))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        // The host allocates what a guest asks for before its memory limit
        // sees it: wasmtime's default lets each call take 64 MiB.
        .max_random_size(MAX_RANDOM_BYTES)
        .build()
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        // Every WASI import reaches its context through here.
        self.host_calls.wasi += 1;
        let (plugin, events, log_budget) = (&self.plugin.name, &self.context, &self.log_budget);
        WasiCtxView {
            ctx: self
                .wasi
                .get_or_insert_with(|| minimal_wasi(plugin, events, log_budget)),
            table: &mut self.table,
        }
    }
}

/// What a call's instances may grow to: the plugin's `memory_mib` counts
/// all of its linear memories together (a component may declare several,
/// each of which the pool would otherwise let reach the limit).
#[derive(Debug)]
pub(super) struct Limiter {
    memory_limit: usize,
    /// Bytes of every linear memory granted so far (memories never
    /// shrink, so this is also the most they held).
    memory_total: usize,
    /// What the refused grow would have made the total.
    pub(super) memory_exceeded: Option<usize>,
}

impl Limiter {
    pub(super) fn new(memory_limit: usize) -> Limiter {
        Limiter {
            memory_limit,
            memory_total: 0,
            memory_exceeded: None,
        }
    }

    /// The most this call's memories held together; its limit once a grow
    /// past it was refused.
    pub(super) fn memory_peak(&self) -> usize {
        match self.memory_exceeded {
            Some(_) => self.memory_limit,
            None => self.memory_total,
        }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    /// Also asked, with `current` 0, for each memory an instance creates.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .memory_total
            .saturating_add(desired.saturating_sub(current));
        if total > self.memory_limit {
            // Trap rather than fail the grow: a guest allocator that sees
            // a failed grow aborts anyway, and the trap carries the reason.
            self.memory_exceeded = Some(total);
            wasmtime::bail!(
                "memory limit of {} MiB exceeded (its memories would hold {} MiB)",
                self.memory_limit >> 20,
                total.div_ceil(1 << 20)
            );
        }
        self.memory_total = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= TABLE_ELEMENTS)
    }

    // The pool holds Cranelift's instances to these per component; Winch's
    // are allocated on demand, where only the limiter does (wasmtime's
    // defaults are 10,000 of each, and every memory reserves 4 GiB of
    // address space).
    fn instances(&self) -> usize {
        CORE_INSTANCES_PER_COMPONENT
    }

    fn tables(&self) -> usize {
        TABLES_PER_COMPONENT
    }

    fn memories(&self) -> usize {
        MEMORIES_PER_COMPONENT
    }
}

/// Linear memories one call's component may have: guest components built
/// with the WASI adapter hold two, Python's and JavaScript's a few more.
pub(super) const MEMORIES_PER_COMPONENT: usize = 8;
/// Core instances one call's component may create.
pub(super) const CORE_INSTANCES_PER_COMPONENT: usize = 64;
/// Tables one call's component may have.
pub(super) const TABLES_PER_COMPONENT: usize = 16;
/// Elements a table may grow to (8 bytes each): what wasmtime's pool
/// allows by default, which every shipped guest fits.
pub(super) const TABLE_ELEMENTS: usize = 20_000;

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::component::{Component, Linker};
    use wasmtime::{Engine, Store};

    #[test]
    fn a_guest_asking_for_more_random_bytes_than_the_bound_is_refused_before_the_host_allocates_them(
    ) {
        use wasmtime_wasi::p2::bindings::random::random::Host;
        let mut wasi = minimal_wasi("p", &Arc::from("1"), &LogBudget::new(0));
        let random = wasi.random();
        assert_eq!(random.get_random_bytes(64).unwrap().len(), 64);
        let err = random
            .get_random_bytes(MAX_RANDOM_BYTES + 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds limit"), "{err}");
    }

    /// A component whose core modules each declare a memory of `mib`.
    fn memories(count: usize, mib: usize) -> Component {
        let module = |i: usize| {
            format!(
                "(core module $m{i} (memory {})) (core instance (instantiate $m{i}))",
                mib * 16
            )
        };
        let body: String = (0..count).map(module).collect();
        let engine = Engine::default();
        Component::new(
            &engine,
            wat::parse_str(format!("(component {body})")).unwrap(),
        )
        .unwrap()
    }

    fn instantiate(component: &Component, limit_mib: usize) -> (Limiter, wasmtime::Result<()>) {
        let mut store = Store::new(component.engine(), Limiter::new(limit_mib << 20));
        store.limiter(|l| l);
        let made = Linker::new(component.engine())
            .instantiate(&mut store, component)
            .map(drop);
        (store.into_data(), made)
    }

    /// A component of `count` core instances, each of a module with one
    /// table of `elements` and nothing else.
    fn tables(count: usize, elements: usize) -> Component {
        let module = |i: usize| {
            format!("(core module $m{i} (table {elements} funcref)) (core instance (instantiate $m{i}))")
        };
        let body: String = (0..count).map(module).collect();
        Component::new(
            &Engine::default(),
            wat::parse_str(format!("(component {body})")).unwrap(),
        )
        .unwrap()
    }

    /// On demand (how Winch's code runs), only the limiter bounds how many
    /// instances, tables and memories a call makes, and how large a table.
    #[test]
    fn a_call_is_held_to_the_pools_counts_of_instances_tables_and_memories_and_table_size() {
        instantiate(&tables(TABLES_PER_COMPONENT, TABLE_ELEMENTS), 64)
            .1
            .expect("what the pool allows");
        let refused = |component: &Component| {
            let (_, made) = instantiate(component, 64);
            format!("{:#}", made.expect_err("refused"))
        };
        let many = refused(&tables(TABLES_PER_COMPONENT + 1, 1));
        assert!(many.contains("table"), "{many}");
        let large = refused(&tables(1, TABLE_ELEMENTS + 1));
        assert!(large.contains("table"), "{large}");
        let memories = refused(&memories(MEMORIES_PER_COMPONENT + 1, 1));
        assert!(memories.contains("memor"), "{memories}");
        let instances = {
            let body: String = (0..=CORE_INSTANCES_PER_COMPONENT)
                .map(|i| format!("(core module $m{i}) (core instance (instantiate $m{i}))"))
                .collect();
            let component = Component::new(
                &Engine::default(),
                wat::parse_str(format!("(component {body})")).unwrap(),
            )
            .unwrap();
            refused(&component)
        };
        assert!(instances.contains("instance"), "{instances}");
    }

    #[test]
    fn a_plugins_memory_limit_counts_all_its_memories_together() {
        let (limiter, made) = instantiate(&memories(2, 15), 32);
        made.expect("two memories of 15 MiB fit in 32");
        assert_eq!(limiter.memory_peak(), 30 << 20);

        // Each of three fits alone; together they do not.
        let (limiter, made) = instantiate(&memories(3, 15), 32);
        let error = format!("{:#}", made.unwrap_err());
        assert!(error.contains("memory limit of 32 MiB exceeded"), "{error}");
        assert_eq!(limiter.memory_exceeded, Some(45 << 20));
        assert_eq!(
            limiter.memory_peak(),
            32 << 20,
            "the peak says it reached the limit"
        );
    }
}
