//! The Wasm build's allocator: small blocks from size-class free lists,
//! everything else from wasi-libc's `malloc`.
//!
//! Every call runs in a fresh instance whose memory the host resets
//! afterwards, so what a general-purpose allocator does to keep a
//! long-lived heap compact (coalescing neighbours, sorted bins, splitting)
//! is work no call needs for the small blocks it allocates by the thousand
//! (B-tree nodes, IPs, tags, keys). wasi-libc's dlmalloc spent about 7 % of
//! a batch's samples on them (BENCHMARKS.md, "Per event, the guest's
//! allocator, `memcmp` and B-trees built in bulk"). Here a small allocation pops its class's list or is carved
//! off a chunk, and its free pushes it back: a few instructions each.
//!
//! Blocks above [`SMALL`] bytes (notification bodies, firewall requests,
//! the event list) and any alignment above 16 go to the backing allocator
//! as before: rounding those up to a class would cost more memory than the
//! saving is worth, and more memory is more pages for the host to reset
//! after the call. What a class keeps on its list is only reused by that
//! class; classes are 16 bytes apart up to 256 (a block wastes at most 15
//! bytes) and a quarter of a power of two above (at most a fifth of it).

use std::alloc::{GlobalAlloc, Layout};

/// The largest block served from the classes.
pub const SMALL: usize = 2048;
/// Every class's size is a multiple of this, and so is every block's
/// address within a chunk: the alignment `malloc` gives.
const GRAIN: usize = 16;
/// 16 classes of 16 … 256 bytes, then four per power of two up to `SMALL`.
const CLASSES: usize = 16 + 4 * 3;
/// What the classes take from the backing allocator at a time: the first
/// chunk is small, so a call that allocates little does not grow the
/// memory (each page grown is a page the host resets), and each next one
/// twice the last, up to the largest.
const FIRST_CHUNK: usize = 4 * 1024;
const CHUNK: usize = 64 * 1024;

pub struct Classes<B> {
    /// Head of each class's free list, null when empty; each free block
    /// holds the address of the next in its first word.
    free: [*mut u8; CLASSES],
    /// The uncarved rest of the last chunk: `next..end`.
    next: *mut u8,
    end: *mut u8,
    /// The size of the next chunk.
    chunk: usize,
    backing: B,
}

/// The class serving `size` bytes (1 ..= `SMALL`).
fn class_of(size: usize) -> usize {
    if size <= 256 {
        return (size.max(1) - 1) / GRAIN;
    }
    // 257..=512 is 320, 384, 448, 512; then 640 … 1024; 1280 … 2048.
    let octave = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize; // 8, 9, 10
    let quarter = ((size - 1) >> (octave - 2)) - 4; // 0..=3
    16 + (octave - 8) * 4 + quarter
}

fn size_of(class: usize) -> usize {
    if class < 16 {
        return (class + 1) * GRAIN;
    }
    let (octave, quarter) = (8 + (class - 16) / 4, (class - 16) % 4);
    (5 + quarter) << (octave - 2)
}

/// Whether the classes serve `layout`.
fn small(layout: Layout) -> bool {
    layout.size() <= SMALL && layout.align() <= GRAIN
}

impl<B: GlobalAlloc> Classes<B> {
    pub const fn new(backing: B) -> Self {
        Self {
            free: [std::ptr::null_mut(); CLASSES],
            next: std::ptr::null_mut(),
            end: std::ptr::null_mut(),
            chunk: FIRST_CHUNK,
            backing,
        }
    }

    /// # Safety
    /// As `GlobalAlloc::alloc`.
    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        if !small(layout) {
            return unsafe { self.backing.alloc(layout) };
        }
        let class = class_of(layout.size());
        let head = self.free[class];
        if !head.is_null() {
            // SAFETY: a free block starts with its successor's address.
            self.free[class] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        unsafe { self.carve(size_of(class)) }
    }

    /// # Safety
    /// As `GlobalAlloc::alloc_zeroed`.
    pub unsafe fn alloc_zeroed(&mut self, layout: Layout) -> *mut u8 {
        if !small(layout) {
            // `calloc` knows when its memory is fresh and needs no zeroing.
            return unsafe { self.backing.alloc_zeroed(layout) };
        }
        let block = unsafe { self.alloc(layout) };
        if !block.is_null() {
            unsafe { block.write_bytes(0, layout.size()) };
        }
        block
    }

    /// # Safety
    /// As `GlobalAlloc::dealloc`.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        if small(layout) {
            unsafe { self.push(class_of(layout.size()), ptr) };
        } else {
            unsafe { self.backing.dealloc(ptr, layout) };
        }
    }

    /// # Safety
    /// As `GlobalAlloc::realloc`.
    pub unsafe fn realloc(&mut self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's promise that this layout is valid.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (small(layout), small(new)) {
            // Within its class (a `String` a byte longer) it stays.
            (true, true) if class_of(layout.size()) == class_of(new_size) => ptr,
            (false, false) => unsafe { self.backing.realloc(ptr, layout, new_size) },
            _ => {
                let moved = unsafe { self.alloc(new) };
                if !moved.is_null() {
                    // SAFETY: both hold the smaller size, and a block in
                    // use is on no list, so they are apart.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                moved
            }
        }
    }

    /// A new block of `size` bytes off the current chunk, or a new chunk.
    unsafe fn carve(&mut self, size: usize) -> *mut u8 {
        if (self.end as usize) - (self.next as usize) < size {
            let len = self.chunk;
            // SAFETY: a valid, non-zero layout.
            let chunk = unsafe {
                self.backing
                    .alloc(Layout::from_size_align_unchecked(len, GRAIN))
            };
            if chunk.is_null() {
                return chunk;
            }
            // What is left of the old chunk goes to the lists.
            unsafe { self.give_back(self.next, self.end) };
            self.next = chunk;
            // SAFETY: the chunk is `len` bytes long.
            self.end = unsafe { chunk.add(len) };
            self.chunk = (len * 2).min(CHUNK);
        }
        let block = self.next;
        // SAFETY: `size` fits in `next..end`.
        self.next = unsafe { block.add(size) };
        block
    }

    /// Puts `from..to` (a multiple of `GRAIN` long) on the lists, largest
    /// class first.
    unsafe fn give_back(&mut self, mut from: *mut u8, to: *mut u8) {
        loop {
            let left = (to as usize) - (from as usize);
            if left < GRAIN {
                return;
            }
            let mut class = class_of(left.min(SMALL));
            if size_of(class) > left {
                class -= 1;
            }
            unsafe {
                self.push(class, from);
                from = from.add(size_of(class));
            }
        }
    }

    unsafe fn push(&mut self, class: usize, block: *mut u8) {
        // SAFETY: the block is the allocator's again and at least a word.
        unsafe { block.cast::<*mut u8>().write(self.free[class]) };
        self.free[class] = block;
    }
}

#[cfg(target_family = "wasm")]
mod global {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::UnsafeCell;

    use super::Classes;

    struct Allocator(UnsafeCell<Classes<System>>);

    // SAFETY: a wasm32-wasip1 instance runs one thread.
    unsafe impl Sync for Allocator {}

    #[global_allocator]
    static ALLOCATOR: Allocator = Allocator(UnsafeCell::new(Classes::new(System)));

    // SAFETY (all three): one thread, and the allocator allocates nothing
    // through itself, so no call runs inside another.
    unsafe impl GlobalAlloc for Allocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { (*self.0.get()).dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            unsafe { (*self.0.get()).realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::System;
    use std::cell::Cell;

    use super::*;

    /// The system allocator, counting what is asked of it.
    #[derive(Default)]
    struct Counted {
        allocs: Cell<usize>,
        fail: Cell<bool>,
    }

    unsafe impl GlobalAlloc for Counted {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if self.fail.get() {
                return std::ptr::null_mut();
            }
            self.allocs.set(self.allocs.get() + 1);
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[test]
    fn each_size_has_the_smallest_class_that_holds_it() {
        let mut last = 0;
        for class in 0..CLASSES {
            let size = size_of(class);
            assert!(
                size > last && size.is_multiple_of(GRAIN),
                "class {class}: {size}"
            );
            // Every size in (last, size] maps to this class, and it wastes
            // at most a fifth of the block.
            for asked in last + 1..=size {
                assert_eq!(class_of(asked), class, "{asked} bytes");
                assert!(size - asked <= size / 5 || size <= 256, "{asked} in {size}");
            }
            last = size;
        }
        assert_eq!(last, SMALL);
    }

    /// A small, fixed pseudo-random sequence: the test is the same every run.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    struct Live {
        ptr: *mut u8,
        layout: Layout,
        fill: u8,
    }

    fn intact(block: &Live, len: usize) -> bool {
        // SAFETY: the block is live and at least `len` long.
        let bytes = unsafe { std::slice::from_raw_parts(block.ptr, len) };
        bytes.iter().all(|b| *b == block.fill)
    }

    #[test]
    fn blocks_in_use_never_overlap_and_keep_their_alignment_and_contents() {
        let mut heap = Classes::new(Counted::default());
        let mut live: Vec<Live> = Vec::new();
        let mut seed = 7;
        for round in 0..40_000u32 {
            if live.len() < 50 || (live.len() < 600 && lcg(&mut seed).is_multiple_of(2)) {
                let size = match lcg(&mut seed) % 12 {
                    0 => 1 + (lcg(&mut seed) % 9000) as usize,
                    1..=4 => 1 + (lcg(&mut seed) % 2100) as usize,
                    _ => 1 + (lcg(&mut seed) % 300) as usize,
                };
                let layout = Layout::from_size_align(size, 1 << (lcg(&mut seed) % 7)).unwrap();
                let ptr = unsafe { heap.alloc(layout) };
                assert!(!ptr.is_null(), "out of memory at round {round}");
                assert!(
                    (ptr as usize).is_multiple_of(layout.align()),
                    "misaligned: {layout:?}"
                );
                let fill = round as u8;
                unsafe { ptr.write_bytes(fill, size) };
                live.push(Live { ptr, layout, fill });
                continue;
            }
            let at = (lcg(&mut seed) as usize) % live.len();
            let block = live.swap_remove(at);
            assert!(
                intact(&block, block.layout.size()),
                "a block was overwritten"
            );
            if lcg(&mut seed).is_multiple_of(2) {
                unsafe { heap.dealloc(block.ptr, block.layout) };
                continue;
            }
            // Reallocate instead: the contents move with it.
            let new_size = 1 + (lcg(&mut seed) % 3000) as usize;
            let ptr = unsafe { heap.realloc(block.ptr, block.layout, new_size) };
            assert!(!ptr.is_null());
            let moved = Live {
                ptr,
                layout: Layout::from_size_align(new_size, block.layout.align()).unwrap(),
                fill: block.fill,
            };
            assert!(
                intact(&moved, block.layout.size().min(new_size)),
                "realloc lost bytes"
            );
            unsafe { ptr.write_bytes(block.fill, new_size) };
            live.push(moved);
        }
        for block in live {
            assert!(
                intact(&block, block.layout.size()),
                "a block was overwritten"
            );
            unsafe { heap.dealloc(block.ptr, block.layout) };
        }
    }

    #[test]
    fn a_freed_small_block_serves_the_next_request_of_its_class() {
        let mut heap = Classes::new(Counted::default());
        let small = Layout::from_size_align(40, 8).unwrap();
        unsafe {
            let a = heap.alloc(small);
            heap.dealloc(a, small);
            // 33..=48 bytes share a class.
            let b = heap.alloc(Layout::from_size_align(48, 4).unwrap());
            assert_eq!(a, b);
            // Growing within the class stays in place; past it, moves.
            assert_eq!(heap.realloc(b, small, 45), b);
            let c = heap.realloc(b, small, 49);
            assert_ne!(c, b);
            // A reused block asked for zeroed comes zeroed.
            c.write_bytes(0xAA, 49);
            heap.dealloc(c, Layout::from_size_align(49, 8).unwrap());
            let z = heap.alloc_zeroed(Layout::from_size_align(60, 8).unwrap());
            assert_eq!(z, c);
            assert!(std::slice::from_raw_parts(z, 60).iter().all(|b| *b == 0));
            // One chunk served all of it.
            assert_eq!(heap.backing.allocs.get(), 1);
            heap.dealloc(z, Layout::from_size_align(60, 8).unwrap());
        }
    }

    #[test]
    fn large_or_overaligned_blocks_and_a_refusal_come_from_the_backing_allocator() {
        let mut heap = Classes::new(Counted::default());
        unsafe {
            let big = Layout::from_size_align(SMALL + 1, 8).unwrap();
            let aligned = Layout::from_size_align(64, 64).unwrap();
            let (a, b) = (heap.alloc(big), heap.alloc(aligned));
            assert!((b as usize).is_multiple_of(64));
            assert_eq!(heap.backing.allocs.get(), 2);
            heap.dealloc(a, big);
            heap.dealloc(b, aligned);
            heap.backing.fail.set(true);
            assert!(heap.alloc(big).is_null());
            assert!(heap
                .alloc(Layout::from_size_align(16, 8).unwrap())
                .is_null());
        }
    }
}
