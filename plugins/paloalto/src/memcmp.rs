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
    // Plain index loops: at the guest's `opt-level = "s"` iterator adapters
    // stay calls of their own, which cost more than the comparing.
    let word =
        |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("eight bytes"));
    let mut at = 0;
    while at + 8 <= a.len() {
        let (x, y) = (word(a, at), word(b, at));
        if x != y {
            // Little-endian: the lowest differing bit is in the first
            // differing byte, which decides.
            at += (x ^ y).trailing_zeros() as usize / 8;
            return i32::from(a[at]) - i32::from(b[at]);
        }
        at += 8;
    }
    while at < a.len() {
        if a[at] != b[at] {
            return i32::from(a[at]) - i32::from(b[at]);
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
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, n),
            std::slice::from_raw_parts(b, n),
        )
    };
    compare(a, b)
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
