//! Reading a notification: `parse_notification` (only the members decoding
//! reads are built) against `parse_notification_whole` (the whole body as a
//! `serde_json::Value`, as the listener read it until 2026-12-06), on every
//! notification fixture, alternating, with the heap allocations each makes.
//! Then the same for a page of Prism's VM listing (500 VMs, the fixtures'
//! intents), read into VMs as the Prism client reads it for a reconcile:
//! with `v3::VM_LIST`, or whole.
//!
//! `cargo bench -p prismhook-core --bench payload`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prismhook_core::nutanix::payload::{parse_notification, parse_notification_whole, parse_vm};
use prismhook_core::nutanix::pruned::{self, Keep};
use prismhook_core::nutanix::v3::{Listing, VM_LIST};
use serde_json::{json, Value};

/// Counts allocations, so the table can say what each read allocates.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Read =
    fn(
        &[u8],
    )
        -> Result<prismhook_core::event::Decoded, prismhook_core::nutanix::payload::PayloadError>;

const ROUNDS: usize = 15;
const PER_ROUND: u32 = 2_000;

/// Microseconds per read over one round of `times`.
fn round(times: u32, mut read: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..times {
        read();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(times)
}

fn allocations(read: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    read();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

/// A page's VMs as the Prism client reads them, the page read as `keep` says.
fn vms_of(page: &[u8], keep: &'static Keep) -> usize {
    let answer = pruned::read(page, keep).expect("the page is JSON");
    let page = Listing::new(500).add(answer).expect("a listing page");
    page.entities.iter().filter_map(parse_vm).count()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nutanix");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("the fixtures directory")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.ends_with(".json").then_some(name)
        })
        .collect();
    names.sort();
    println!("# prismhook-core bench: reading a notification");
    println!(
        "{ROUNDS} rounds of {PER_ROUND} reads per fixture, the two reads alternating; medians\n"
    );
    println!("| fixture | bytes | whole body: µs / allocations | **members read: µs / allocations** | time ratio |");
    println!("|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut intents = Vec::new();
    for name in &names {
        let body = std::fs::read(dir.join(name)).expect("a fixture");
        let body = &body;
        let parse = |read: Read| {
            move || {
                black_box(read(black_box(body)).expect("a fixture parses"));
            }
        };
        let (mut whole, mut quick) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            whole.push(round(PER_ROUND, parse(parse_notification_whole)));
            quick.push(round(PER_ROUND, parse(parse_notification)));
        }
        let (whole, quick) = (median(whole), median(quick));
        ratios.push(quick / whole);
        println!(
            "| {name} | {} | {whole:.2} / {} | **{quick:.2} / {}** | **{:.2}×** |",
            body.len(),
            allocations(parse(parse_notification_whole)),
            allocations(parse(parse_notification)),
            quick / whole
        );
        let notification: Value = serde_json::from_slice(body).expect("a fixture");
        if notification["entity_reference"]["kind"] == "vm" {
            intents.push(notification["data"]["metadata"].clone());
        }
    }
    println!(
        "\nmedian ratio, members read / whole body: {:.2}×",
        median(ratios)
    );

    // 500 VMs, the fixtures' intents in turn, each with a uuid of its own.
    let entities: Vec<Value> = (0..500)
        .map(|i| {
            let mut intent = intents[i % intents.len()].clone();
            intent["metadata"]["uuid"] = json!(format!("00000000-0000-4000-8000-{i:012}"));
            intent
        })
        .collect();
    let page = serde_json::to_vec(&json!({
        "api_version": "3.1",
        "metadata": { "kind": "vm", "offset": 0, "length": 500, "total_matches": 500 },
        "entities": entities,
    }))
    .expect("a page serialises");
    let read = |keep: &'static Keep| {
        let page = &page;
        move || {
            assert_eq!(black_box(vms_of(black_box(page), keep)), 500);
        }
    };
    let (mut whole, mut quick) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        whole.push(round(20, read(&Keep::All)));
        quick.push(round(20, read(&VM_LIST)));
    }
    let (whole, quick) = (median(whole) / 1e3, median(quick) / 1e3);
    println!("\n| a `/vms/list` page of 500 VMs, read into VMs | bytes | whole page: ms / allocations | **`VM_LIST`: ms / allocations** | time ratio |");
    println!("|---|---|---|---|---|");
    println!(
        "| {ROUNDS} rounds of 20 reads, alternating | {} | {whole:.2} / {} | **{quick:.2} / {}** | **{:.2}×** |",
        page.len(),
        allocations(read(&Keep::All)),
        allocations(read(&VM_LIST)),
        quick / whole
    );
}
