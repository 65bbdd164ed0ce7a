//! A seeded xorshift64 generator for unit tests that replay the same pseudo-random workload on
//! every run (Marsaglia, "Xorshift RNGs", 2003: shifts 13, 7, 17). Not for anything but tests.

/// A generator seeded with `seed` (not 0): each call with `n` gives a number in `0..n`.
pub fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}
