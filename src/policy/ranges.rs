//! Ranges over the 24-bit (protocol, port) space of a policy key, resolved
//! into disjoint pieces and split into prefix blocks for an LPM trie.
//!
//! A point is `proto << 16 | port`: "every protocol" is the whole space,
//! "TCP, every port" is `6 << 16 ..= 6 << 16 | 0xffff`, a port range is a
//! sub-range of its protocol. Any inclusive range splits into at most
//! 2 * 24 aligned power-of-two blocks, each one LPM entry.

/// Bits of the (protocol, port) space.
pub const SPACE_BITS: u32 = 24;
pub const SPACE_MAX: u32 = (1 << SPACE_BITS) - 1;

/// An aligned block: the `len` high bits of `start` (of [`SPACE_BITS`]) are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub start: u32,
    /// Prefix length within the space, 0..=24.
    pub len: u8,
}

impl Block {
    pub fn end(self) -> u32 {
        self.start + ((1u32 << (SPACE_BITS - u32::from(self.len))) - 1)
    }

    pub fn contains(self, point: u32) -> bool {
        (self.start..=self.end()).contains(&point)
    }
}

/// Splits `lo..=hi` into the fewest aligned blocks, in ascending order.
pub fn blocks(lo: u32, hi: u32) -> Vec<Block> {
    let mut out = Vec::new();
    if lo > hi || hi > SPACE_MAX {
        return out;
    }
    let mut cur = lo;
    loop {
        // The largest block that starts at `cur` (alignment) and ends by `hi`.
        let mut size_bits = if cur == 0 {
            SPACE_BITS
        } else {
            cur.trailing_zeros().min(SPACE_BITS)
        };
        while size_bits > 0 && cur + ((1u32 << size_bits) - 1) > hi {
            size_bits -= 1;
        }
        out.push(Block {
            start: cur,
            len: (SPACE_BITS - size_bits) as u8,
        });
        let end = cur + ((1u32 << size_bits) - 1);
        if end >= hi {
            return out;
        }
        cur = end + 1;
    }
}

/// A candidate verdict on `lo..=hi`; higher `rank` wins, ties go to the
/// lower `tag` (so the result does not depend on input order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span<T> {
    pub lo: u32,
    pub hi: u32,
    pub rank: u8,
    pub tag: T,
}

/// Resolves overlapping spans into disjoint, maximal `(lo, hi, winner)`
/// pieces in ascending order. Points no span covers are absent.
pub fn resolve<T: Copy + Ord>(spans: &[Span<T>]) -> Vec<(u32, u32, u8, T)> {
    // Elementary boundaries: every span start and every point after an end.
    let mut cuts: Vec<u64> = Vec::with_capacity(spans.len() * 2);
    for s in spans {
        cuts.push(u64::from(s.lo));
        cuts.push(u64::from(s.hi) + 1);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u32, u32, u8, T)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0] as u32, (w[1] - 1) as u32);
        let best = spans
            .iter()
            .filter(|s| s.lo <= lo && hi <= s.hi)
            .max_by(|a, b| a.rank.cmp(&b.rank).then(b.tag.cmp(&a.tag)));
        let Some(best) = best else { continue };
        match out.last_mut() {
            Some(last) if last.1 + 1 == lo && last.2 == best.rank && last.3 == best.tag => {
                last.1 = hi
            }
            _ => out.push((lo, hi, best.rank, best.tag)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(bs: &[Block]) -> Vec<u32> {
        bs.iter().flat_map(|b| b.start..=b.end()).collect()
    }

    #[test]
    fn blocks_cover_exactly_the_range() {
        for (lo, hi) in [
            (0, SPACE_MAX),
            (6 << 16, (6 << 16) | 0xffff),
            ((6 << 16) | 80, (6 << 16) | 80),
            ((6 << 16) | 1000, (6 << 16) | 2000),
            ((17 << 16) | 1, (17 << 16) | 65535),
            (5, 1 << 20),
        ] {
            let bs = blocks(lo, hi);
            assert!(
                bs.len() <= 2 * SPACE_BITS as usize,
                "{lo}..{hi}: {}",
                bs.len()
            );
            if hi - lo < 100_000 {
                assert_eq!(covered(&bs), (lo..=hi).collect::<Vec<_>>());
            }
            assert_eq!(bs.first().unwrap().start, lo);
            assert_eq!(bs.last().unwrap().end(), hi);
            for w in bs.windows(2) {
                assert_eq!(w[0].end() + 1, w[1].start);
            }
            for b in &bs {
                // Aligned: the free low bits of start are zero.
                let free = SPACE_BITS - u32::from(b.len);
                assert_eq!(b.start & ((1u64 << free) - 1) as u32, 0, "{b:?}");
            }
        }
        assert_eq!(blocks(0, SPACE_MAX), vec![Block { start: 0, len: 0 }]);
        assert_eq!(
            blocks(6 << 16, (6 << 16) | 0xffff),
            vec![Block {
                start: 6 << 16,
                len: 8
            }]
        );
        assert!(blocks(3, 2).is_empty());
    }

    #[test]
    fn resolve_picks_the_highest_rank_and_splits() {
        let spans = [
            Span {
                lo: 0,
                hi: 100,
                rank: 1,
                tag: 7u32,
            },
            Span {
                lo: 40,
                hi: 60,
                rank: 3,
                tag: 9,
            },
            Span {
                lo: 50,
                hi: 200,
                rank: 1,
                tag: 5,
            },
        ];
        assert_eq!(
            resolve(&spans),
            vec![(0, 39, 1, 7), (40, 60, 3, 9), (61, 200, 1, 5)]
        );
        // Order of input does not matter.
        let mut rev = spans;
        rev.reverse();
        assert_eq!(resolve(&rev), resolve(&spans));
        assert!(resolve::<u32>(&[]).is_empty());
    }
}
