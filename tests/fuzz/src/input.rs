//! Reading a target's structured input out of the fuzzer's bytes: NUL-separated fields, and
//! chunk sizes drawn from a seed so that one input also fixes where a stream is cut.

/// The first `n` NUL-separated fields of `data`; the last one takes the rest (NULs included),
/// and missing fields are empty.
pub fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match memchr(rest) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + 1..];
            }
            None => {
                out.push(rest);
                rest = &[];
            }
        }
    }
    out.push(rest);
    out
}

fn memchr(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == 0)
}

/// Text for an API that takes `&str`: invalid UTF-8 replaced, as a lenient client would.
pub fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// A small deterministic generator (SplitMix64): the same seed always cuts the same chunks.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A chunk length from 1 up to `max` (at least 1), most often small: single bytes, a few
    /// bytes, network-sized pieces and, now and then, everything at once.
    pub fn chunk_len(&mut self, max: usize) -> usize {
        let r = self.next_u64();
        let scale = 1usize << (r % 21); // 1 B .. 1 MiB
        let len = 1 + (r >> 8) as usize % scale;
        len.min(max.max(1))
    }
}

/// `len` split into consecutive ranges whose lengths `rng` draws.
pub fn chunk_ranges(len: usize, rng: &mut Rng) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < len {
        let end = start + rng.chunk_len(len - start);
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_on_nul_and_the_last_takes_the_rest() {
        assert_eq!(fields(b"a\0b\0c\0d", 3), [&b"a"[..], b"b", b"c\0d"]);
        assert_eq!(fields(b"a", 3), [&b"a"[..], b"", b""]);
        assert_eq!(fields(b"", 1), [&b""[..]]);
    }

    #[test]
    fn chunk_ranges_cover_the_whole_length_in_order() {
        for seed in 0..200 {
            let ranges = chunk_ranges(1000, &mut Rng::new(seed));
            assert_eq!(ranges.first().unwrap().start, 0);
            assert_eq!(ranges.last().unwrap().end, 1000);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            assert!(ranges.iter().all(|r| !r.is_empty()));
        }
    }
}
