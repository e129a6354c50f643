//! `memcmp` eight bytes at a time, for the Wasm build.
//!
//! wasi-libc's `memcmp` compares one byte per turn of its loop, and this
//! plugin's state is B-trees keyed by strings that share long prefixes (IP
//! addresses, VM keys, tag names): in a profile of a batch of 256 events it
//! was a tenth of the whole call (BENCHMARKS.md, "Wasm runtime"). A native
//! build keeps the platform's own, vectorised one.

/// What `memcmp` answers for two slices of one length: below, at or above
/// zero as `a` sorts before, with or after `b`, byte by byte unsigned.
pub fn compare(a: &[u8], b: &[u8]) -> i32 {
    assert_eq!(a.len(), b.len(), "memcmp compares equal lengths");
    // SAFETY: both slices hold `a.len()` bytes.
    unsafe { compare_raw(a.as_ptr(), b.as_ptr(), a.len()) }
}

/// `compare` over raw pointers, inlined into `memcmp` itself: a B-tree
/// lookup makes a dozen compares, and through slices each paid a call and
/// a bounds check per word.
///
/// # Safety
/// `a` and `b` each point to `n` readable bytes.
#[inline(always)]
unsafe fn compare_raw(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY (all reads): `at + 8 <= n`, or `at < n`, and the caller's promise.
    let word = |p: *const u8, at: usize| unsafe { p.add(at).cast::<u64>().read_unaligned() };
    let byte = |p: *const u8, at: usize| i32::from(unsafe { p.add(at).read() });
    let mut at = 0;
    while at + 8 <= n {
        let (x, y) = (word(a, at), word(b, at));
        if x != y {
            // Little-endian: the lowest differing bit is in the first
            // differing byte, which decides.
            at += (u64::from_le(x) ^ u64::from_le(y)).trailing_zeros() as usize / 8;
            return byte(a, at) - byte(b, at);
        }
        at += 8;
    }
    while at < n {
        if byte(a, at) != byte(b, at) {
            return byte(a, at) - byte(b, at);
        }
        at += 1;
    }
    0
}

/// Takes the place of wasi-libc's: the linker only pulls a library's
/// `memcmp` in when nothing defines it.
#[cfg(target_family = "wasm")]
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: `memcmp`'s contract: both point to `n` readable bytes.
    unsafe { compare_raw(a, b, n) }
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn it_orders_as_the_platforms_memcmp_does() {
        let samples: [&[u8]; 9] = [
            b"",
            b"10.20.0.1",
            b"10.20.0.2",
            b"10.20.1.1",
            b"vm/lab/0c4a-aaaa-bbbb-cccc",
            b"vm/lab/0c4a-aaaa-bbbb-cccd",
            b"\xff\x00\x00\x00\x00\x00\x00\x00\x01",
            b"\x00\x00\x00\x00\x00\x00\x00\x00\xff",
            b"ntnx.AppType.Web",
        ];
        for a in samples {
            for b in samples {
                let n = a.len().min(b.len());
                let (a, b) = (&a[..n], &b[..n]);
                assert_eq!(compare(a, b).signum(), a.cmp(b) as i32, "{a:?} {b:?}");
                // Each byte position decides on its own, in and after the words.
                for i in 0..n {
                    let mut c = b.to_vec();
                    c[i] ^= 0x80;
                    assert_eq!(compare(b, &c).signum(), b.cmp(&c[..]) as i32);
                }
            }
        }
    }
}
