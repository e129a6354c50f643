//! The probe: a plugin for the host's end-to-end tests.
//!
//! It records every event it handles in `kv` (so tests can check delivery,
//! order and attempts from outside), and misbehaves on demand, chosen by the
//! event type, so that each kind of misbehaviour is a real compiled guest:
//!
//! | event type     | what the probe does                                      |
//! |----------------|----------------------------------------------------------|
//! | `TEST.LOOP`    | spins forever                                            |
//! | `TEST.SLEEP`   | sleeps `body.ms` in WASI (a host wait, no wasm running)  |
//! | `TEST.OOM`     | allocates until the host's memory limit stops it         |
//! | `TEST.TRAP`    | panics                                                   |
//! | `TEST.HTTP`    | GETs `body.url` (or `body.method`s it, with `body.headers` `[[name, value]…]` added); stores status and body or the error |
//! | `TEST.RETRY`   | returns retry with `body.delay_ms`                       |
//! | `TEST.REJECT`  | returns reject                                           |
//! | `TEST.SHOUT`   | prints `body.lines` lines to stdout                      |
//! | `TEST.CONFIG`  | returns reject with the configuration `init` was given   |
//! | `TEST.INIT`    | returns reject with what `context.instance` told `init` (`log_in_init`) |
//! | `TEST.OUTCOMES`| the fuzzing guest: the batch's answer is what its events' `body.outcomes` script, however many |
//! | anything else  | records the event and returns done                       |
//!
//! Whatever it records, it also keeps the instance it runs as (the
//! `context` import) in `kv` under `instance`. With `count_inits` in its
//! configuration, its `init` counts its own runs in `kv` under `inits`
//! (so it calls the host, and cannot be pre-initialised); with
//! `log_in_init`, it asks `context` for its instance and logs a line (which
//! does not keep it from a snapshot); otherwise `init` reads nothing but
//! its configuration.
//!
//! It reconciles a page at a time (`paged-plugin`): it records each page's
//! size as it reads it under `reconcile-page/<cluster>/<n>`, then the uuids
//! it read under `reconcile/<cluster>` and the number of pages under
//! `reconcile-pages/<cluster>`, and a cluster named `refuse` gets an error
//! after those writes. For a cluster whose name starts with `commit`, it
//! commits its writes (`kv.commit`) as each page comes, before recording it.

wit_bindgen::generate!({ path: "../../../wit", world: "paged-plugin" });

use exports::prismhook::plugin::handler::{Event, Guest, Outcome, PluginInfo, Vm};
use exports::prismhook::plugin::paged::Guest as PagedGuest;
use prismhook::plugin::types::Retry;
use prismhook::plugin::{context, http, inventory, kv, log};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};

struct Probe;

/// Set by `init`, which the host calls first on every fresh instance.
static CONFIG: std::sync::OnceLock<Value> = std::sync::OnceLock::new();

/// What `context.instance` answered `init`, with `log_in_init`.
static INIT_INSTANCE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

fn config() -> &'static Value {
    CONFIG.get().expect("init runs before any other export")
}

impl Guest for Probe {
    fn init(config: String) -> Result<PluginInfo, String> {
        let config: Value =
            serde_json::from_str(&config).map_err(|e| format!("config is not JSON: {e}"))?;
        if config.get("refuse").and_then(Value::as_bool) == Some(true) {
            return Err("refusing to start: `refuse` is set".into());
        }
        if config.get("trap_in_init").and_then(Value::as_bool) == Some(true) {
            panic!("asked to trap in init");
        }
        // The first `stall_inits` inits run out of time, as on a host too
        // busy to finish them; the count outlives them through kv.
        if let Some(stalls) = config.get("stall_inits").and_then(Value::as_u64) {
            let stalled = kv::get("stalled-inits")?
                .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            if stalled < stalls {
                kv::set("stalled-inits", (stalled + 1).to_string().as_bytes())?;
                kv::commit()?;
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
        }
        let name = config
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("probe")
            .to_owned();
        let subscriptions = match config.get("subscriptions").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            None => vec!["*".to_owned()],
        };
        let version = config
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or(env!("CARGO_PKG_VERSION"))
            .to_owned();
        if config.get("count_inits").and_then(Value::as_bool) == Some(true) {
            let runs = kv::get("inits")?
                .and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            kv::set("inits", (runs + 1).to_string().as_bytes())?;
        }
        if config.get("log_in_init").and_then(Value::as_bool) == Some(true) {
            let instance = context::instance();
            log::log(
                log::Level::Info,
                &format!("starting as {}", instance.as_deref().unwrap_or(&name)),
            );
            let _ = INIT_INSTANCE.set(instance);
        }
        let _ = CONFIG.set(config);
        Ok(PluginInfo {
            name,
            version,
            subscriptions,
        })
    }

    fn handle(events: Vec<Event>) -> Vec<Outcome> {
        if events.iter().any(|e| e.event_type == "TEST.OUTCOMES") {
            // Every event's script, concatenated: a batch may get more or
            // fewer outcomes than it has events, as a buggy plugin's would.
            return events.iter().flat_map(scripted).collect();
        }
        events.iter().map(handle_one).collect()
    }

    fn reconcile(cluster: String, vms: Vec<Vm>) -> Result<String, String> {
        let uuids: Vec<&str> = vms.iter().map(|vm| vm.uuid.as_str()).collect();
        kv::set(
            &format!("reconcile/{cluster}"),
            serde_json::to_vec(&uuids).unwrap().as_slice(),
        )?;
        Ok(format!("{} vms", vms.len()))
    }
}

impl PagedGuest for Probe {
    fn reconcile(cluster: String) -> Result<String, String> {
        let mut uuids: Vec<String> = Vec::new();
        let mut pages = 0u32;
        while let Some(page) = inventory::next_page() {
            pages += 1;
            if cluster.starts_with("commit") {
                kv::commit()?;
            }
            kv::set(
                &format!("reconcile-page/{cluster}/{pages}"),
                page.len().to_string().as_bytes(),
            )?;
            uuids.extend(page.into_iter().map(|vm| vm.uuid));
        }
        kv::set(
            &format!("reconcile/{cluster}"),
            serde_json::to_vec(&uuids).unwrap().as_slice(),
        )?;
        kv::set(
            &format!("reconcile-pages/{cluster}"),
            pages.to_string().as_bytes(),
        )?;
        if cluster == "refuse" {
            return Err(format!("refused after recording {} vms", uuids.len()));
        }
        Ok(format!("{} vms", uuids.len()))
    }
}

static IMAGE_MARK: AtomicU64 = AtomicU64::new(7);
static ZEROED: [AtomicU64; 512] = [const { AtomicU64::new(0) }; 512];

fn body(event: &Event) -> Value {
    serde_json::from_str(&event.body).unwrap_or(Value::Null)
}

fn handle_one(event: &Event) -> Outcome {
    match event.event_type.as_str() {
        "TEST.LOOP" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "TEST.SLEEP" => {
            let ms = body(event).get("ms").and_then(Value::as_u64).unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            record(event);
            Outcome::Done
        }
        "TEST.OOM" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "TEST.TRAP" => panic!("probe asked to trap by event {}", event.id),
        "TEST.HTTP" => {
            let text_of = |key: &str| {
                body(event)
                    .get(key)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let url = text_of("url").unwrap_or_default();
            // `headers`: further `[name, value]` pairs to send.
            let mut headers = vec![("x-probe".into(), event.id.clone())];
            if let Some(extra) = body(event).get("headers").and_then(Value::as_array) {
                headers.extend(extra.iter().filter_map(|pair| {
                    let (name, value) = (pair.get(0)?.as_str()?, pair.get(1)?.as_str()?);
                    Some((name.to_owned(), value.to_owned()))
                }));
            }
            let result = http::send(&http::Request {
                method: text_of("method").unwrap_or_else(|| "GET".into()),
                url,
                headers,
                body: None,
                timeout_ms: Some(2_000),
            });
            let text = match result {
                Ok(resp) => format!(
                    "status={} body={}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                ),
                Err(e) => format!("error={e:?}"),
            };
            // Tests read it back, and the probe's own memory is what a
            // curious plugin could inspect: the result is all it ever has.
            let _ = kv::set(&format!("http/{}", event.id), text.as_bytes());
            record(event);
            Outcome::Done
        }
        // `body.bytes` of kv under `blob/<event id>`.
        "TEST.KV" => {
            let bytes = body(event).get("bytes").and_then(Value::as_u64);
            let blob = vec![b'k'; bytes.unwrap_or(0) as usize];
            if let Err(e) = kv::set(&format!("blob/{}", event.id), &blob) {
                return Outcome::Reject(format!("kv set failed: {e}"));
            }
            record(event);
            Outcome::Done
        }
        "TEST.RETRY" => Outcome::Retry(Retry {
            reason: "probe asked to retry".into(),
            delay_ms: body(event).get("delay_ms").and_then(Value::as_u64),
        }),
        "TEST.REJECT" => Outcome::Reject("probe asked to reject".into()),
        "TEST.CONFIG" => Outcome::Reject(config().to_string()),
        "TEST.INIT" => Outcome::Reject(format!("{:?}", INIT_INSTANCE.get())),
        // What the last call left in memory: a static with a value in the
        // image (.data), one in the zeroed rest (.bss) and a heap block.
        // Each is changed, so a call that sees anything but 7, 0 and 0
        // started from another call's memory.
        "TEST.MEMORY" => {
            let data = IMAGE_MARK.fetch_add(1, Ordering::Relaxed);
            let bss = ZEROED[300].fetch_add(1, Ordering::Relaxed);
            let mut block = vec![0u64; 512];
            let heap = block.iter().fold(0, |a, b| a | b);
            block.fill(0x5a5a);
            std::hint::black_box(&block);
            Outcome::Reject(format!("data={data} bss={bss} heap={heap}"))
        }
        "TEST.SHOUT" => {
            let lines = body(event)
                .get("lines")
                .and_then(Value::as_u64)
                .unwrap_or(10);
            for i in 0..lines {
                println!("shout {i} of {lines}");
            }
            record(event);
            Outcome::Done
        }
        _ => {
            record(event);
            Outcome::Done
        }
    }
}

/// `body.outcomes`: `[{"kind": "done" | "retry" | "reject", "reason": s,
/// "repeat": n, "delay_ms": d}]`; the reason is `s` repeated `n` times, so a
/// small body can script a reason of megabytes.
fn scripted(event: &Event) -> Vec<Outcome> {
    let body = body(event);
    let Some(script) = body.get("outcomes").and_then(Value::as_array) else {
        return Vec::new();
    };
    script
        .iter()
        .map(|o| {
            let text = o.get("reason").and_then(Value::as_str).unwrap_or_default();
            let repeat = o.get("repeat").and_then(Value::as_u64).unwrap_or(1);
            let reason = text.repeat(repeat as usize);
            match o.get("kind").and_then(Value::as_str) {
                Some("retry") => Outcome::Retry(Retry {
                    reason,
                    delay_ms: o.get("delay_ms").and_then(Value::as_u64),
                }),
                Some("reject") => Outcome::Reject(reason),
                _ => Outcome::Done,
            }
        })
        .collect()
}

/// Appends the event to its entity's record: `seen/<cluster>/<uuid>` holds
/// `id:attempt:event-type` entries in the order the probe handled them.
/// A notification that names its entity's version (`entity_version`, as
/// Prism's do) is also appended to `changes/<cluster>/<uuid>` as
/// `event-type@version`: which change of the entity it was, for tests whose
/// notifications are sent by Prism's simulator and whose ids they never see.
fn record(event: &Event) {
    let instance = context::instance().unwrap_or_else(|| "(itself)".into());
    let _ = kv::set("instance", instance.as_bytes());
    let key = format!("seen/{}/{}", event.cluster, event.entity_uuid);
    let mut seen = kv::get(&key).ok().flatten().unwrap_or_default();
    if !seen.is_empty() {
        seen.push(b'\n');
    }
    seen.extend_from_slice(
        format!("{}:{}:{}", event.id, event.attempt, event.event_type).as_bytes(),
    );
    if let Err(e) = kv::set(&key, &seen) {
        log::log(log::Level::Error, &format!("kv set failed: {e}"));
    }
    if let Some(version) = entity_version(event) {
        let key = format!("changes/{}/{}", event.cluster, event.entity_uuid);
        let mut changes = kv::get(&key).ok().flatten().unwrap_or_default();
        if !changes.is_empty() {
            changes.push(b'\n');
        }
        changes.extend_from_slice(format!("{}@{version}", event.event_type).as_bytes());
        if let Err(e) = kv::set(&key, &changes) {
            log::log(log::Level::Error, &format!("kv set failed: {e}"));
        }
    }
    if config().get("verbose").and_then(Value::as_bool) == Some(true) {
        log::log(
            log::Level::Info,
            &format!("handled {} {}", event.event_type, event.id),
        );
    }
}

/// The intent's `entity_version`: a string since AOS 5.x, a number before.
fn entity_version(event: &Event) -> Option<u64> {
    let v = body(event)
        .pointer("/data/metadata/metadata/entity_version")?
        .clone();
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

export!(Probe);
