//! Reading a notification: `parse_notification` (only the members decoding
//! reads are built) against `parse_notification_whole` (the whole body as a
//! `serde_json::Value`, as the listener read it until 2026-12-06), on every
//! notification fixture, alternating, with the heap allocations each makes.
//!
//! `cargo bench -p prismhook-core --bench payload`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prismhook_core::nutanix::payload::{parse_notification, parse_notification_whole};

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

/// Microseconds per read over one round.
fn round(read: Read, body: &[u8]) -> f64 {
    let start = Instant::now();
    for _ in 0..PER_ROUND {
        black_box(read(black_box(body)).expect("a fixture parses"));
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(PER_ROUND)
}

fn allocations(read: Read, body: &[u8]) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    black_box(read(body).expect("a fixture parses"));
    ALLOCATIONS.load(Ordering::Relaxed) - before
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
    for name in &names {
        let body = std::fs::read(dir.join(name)).expect("a fixture");
        let (mut whole, mut quick) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            whole.push(round(parse_notification_whole, &body));
            quick.push(round(parse_notification, &body));
        }
        let (whole, quick) = (median(whole), median(quick));
        ratios.push(quick / whole);
        println!(
            "| {name} | {} | {whole:.2} / {} | **{quick:.2} / {}** | **{:.2}×** |",
            body.len(),
            allocations(parse_notification_whole, &body),
            allocations(parse_notification, &body),
            quick / whole
        );
    }
    println!(
        "\nmedian ratio, members read / whole body: {:.2}×",
        median(ratios)
    );
}
