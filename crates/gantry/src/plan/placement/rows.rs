//! Strided runs of bytes: how a slice along any dimension lies in a tensor's bytes, and how
//! one staged piece of it is copied.
//!
//! A slice along dimension `k` of a C-order tensor is, once the dimensions before `k` are
//! flattened, `count` rows of `width` bytes, `pitch` bytes apart in the file, packed one after
//! the other at the destination. A whole tensor or a slice along dimension 0 is one row. So
//! one [`Rows`] describes any share, whatever its number of rows: planning is linear in the
//! number of tensors, never in rows.
//!
//! A staged extent may cut the rows anywhere, mid-row included. [`Rows::pieces`] splits the
//! part of a share inside an extent into at most three copies: the tail of a row cut at the
//! extent's start, the block of whole rows (one 2-D copy: `cuMemcpy2DAsync` on a GPU, a loop
//! of row copies in host memory), and the head of a row cut at the extent's end.

/// `count` rows of `width` bytes: row `r` starts `first + r * pitch` bytes into its source
/// (a tensor or an atom of a placed load) and lands `r * width` bytes after its destination's
/// first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rows {
    /// Source offset of row 0's first byte.
    pub first: u64,
    /// Bytes per row.
    pub width: u64,
    /// Source bytes from one row's start to the next; at least `width`.
    pub pitch: u64,
    /// Rows.
    pub count: u64,
}

/// One copy of a piece of [`Rows`]: `rows` rows of `width` bytes from `source` (an offset in
/// the caller's source range), `source_pitch` apart, to `dest` (an offset from the rows'
/// destination), packed (`width` apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset of the first byte in the source range handed to [`Rows::pieces`].
    pub source: u64,
    /// Offset of the first byte from the destination's first byte.
    pub dest: u64,
    /// Bytes per row.
    pub width: u64,
    /// Source bytes between row starts (equal to `width` for a one-row piece).
    pub source_pitch: u64,
    /// Rows.
    pub rows: u64,
}

impl Piece {
    /// Bytes copied.
    pub fn len(&self) -> u64 {
        self.width * self.rows
    }

    /// True for a piece of no bytes (never returned by [`Rows::pieces`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Rows {
    /// `len` contiguous bytes at `first`: one row (rows of no bytes become no rows).
    pub fn contiguous(first: u64, len: u64) -> Self {
        Rows { first, width: len, pitch: len, count: u64::from(len > 0) }
    }

    /// `count` rows of `width`, `pitch` apart; rows that touch (`pitch == width`) become one.
    pub fn strided(first: u64, width: u64, pitch: u64, count: u64) -> Self {
        assert!(pitch >= width, "rows overlap");
        if count <= 1 || pitch == width || width == 0 {
            return Rows::contiguous(first, if count == 0 { 0 } else { width * count });
        }
        Rows { first, width, pitch, count }
    }

    /// Bytes at the destination.
    pub fn len(&self) -> u64 {
        self.width * self.count
    }

    /// True when there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// End of the last row in the source: the rows lie in `first..end()`.
    pub fn end(&self) -> u64 {
        if self.count == 0 {
            self.first
        } else {
            self.first + (self.count - 1) * self.pitch + self.width
        }
    }

    /// The same rows, `by` bytes earlier in the source.
    pub fn shifted_back(self, by: u64) -> Self {
        assert!(by <= self.first);
        Rows { first: self.first - by, ..self }
    }

    /// The copies that take the bytes of these rows found in the source range
    /// `begin..begin + len`: at most three (a row cut at `begin`, the whole rows, a row cut at
    /// the end), in source order. Offsets of the pieces' sources are relative to `begin`.
    pub fn pieces(&self, begin: u64, len: u64) -> impl Iterator<Item = Piece> {
        let end = begin + len;
        let mut out: [Option<Piece>; 3] = [None; 3];
        if self.count == 0 || self.width == 0 || end <= self.first || begin >= self.end() {
            return out.into_iter().flatten();
        }
        // Rows touched: the first whose end passes `begin`, up to the last starting before `end`.
        let row_of = |at: u64| (at.max(self.first) - self.first) / self.pitch;
        let mut r0 = row_of(begin);
        if begin > self.first && (begin - self.first) % self.pitch >= self.width {
            r0 += 1; // `begin` falls in the gap after row r0
        }
        let r1 = (row_of(end - 1) + 1).min(self.count); // exclusive
        if r0 >= r1 {
            return out.into_iter().flatten();
        }
        let start_of = |r: u64| self.first + r * self.pitch;
        let one_row = |r: u64| {
            let (s, e) = (start_of(r).max(begin), (start_of(r) + self.width).min(end));
            Piece {
                source: s - begin,
                dest: r * self.width + (s - start_of(r)),
                width: e - s,
                source_pitch: e - s,
                rows: 1,
            }
        };
        let (mut whole0, mut whole1) = (r0, r1);
        if start_of(r0) < begin {
            out[0] = Some(one_row(r0));
            whole0 = r0 + 1;
        }
        if whole0 < r1 && start_of(r1 - 1) + self.width > end {
            out[2] = Some(one_row(r1 - 1));
            whole1 = r1 - 1;
        }
        if whole0 < whole1 {
            let rows = whole1 - whole0;
            out[1] = Some(Piece {
                source: start_of(whole0) - begin,
                dest: whole0 * self.width,
                width: self.width,
                source_pitch: if rows == 1 { self.width } else { self.pitch },
                rows,
            });
        }
        out.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Destination offset of every source byte of `rows` in `begin..begin + len`, by brute force.
    fn brute(rows: &Rows, begin: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for r in 0..rows.count {
            for b in 0..rows.width {
                let at = rows.first + r * rows.pitch + b;
                if at >= begin && at < begin + len {
                    out.push((at - begin, r * rows.width + b));
                }
            }
        }
        out
    }

    fn expand(pieces: impl Iterator<Item = Piece>) -> (Vec<(u64, u64)>, usize) {
        let mut out = Vec::new();
        let mut n = 0;
        for p in pieces {
            n += 1;
            assert!(p.rows > 0 && p.width > 0, "{p:?}");
            assert!(p.rows == 1 || p.source_pitch >= p.width);
            for r in 0..p.rows {
                for b in 0..p.width {
                    out.push((p.source + r * p.source_pitch + b, p.dest + r * p.width + b));
                }
            }
        }
        (out, n)
    }

    #[test]
    fn table() {
        let rows = Rows::strided(10, 4, 16, 3); // bytes 10..14, 26..30, 42..46
                                                // (begin, len, pieces)
        for (begin, len, n) in [
            (0, 100, 1),  // all three rows: one 2-D block
            (0, 10, 0),   // before the first row
            (46, 10, 0),  // after the last row
            (14, 12, 0),  // inside a gap
            (12, 100, 2), // cut mid-row 0: its tail, then rows 1..3
            (0, 28, 2),   // rows 0, then the head of row 1
            (12, 16, 2),  // tail of row 0, head of row 1
            (11, 2, 1),   // inside one row
            (12, 32, 3),  // tail of row 0, row 1, head of row 2
            (26, 4, 1),   // exactly row 1
        ] {
            let (got, count) = expand(rows.pieces(begin, len));
            assert_eq!(got, brute(&rows, begin, len), "{begin}+{len}");
            assert_eq!(
                count,
                n,
                "{begin}+{len}: {:?}",
                rows.pieces(begin, len).collect::<Vec<_>>()
            );
        }
        assert_eq!(Rows::strided(5, 4, 4, 3), Rows::contiguous(5, 12));
        assert_eq!(Rows::strided(5, 4, 9, 1), Rows::contiguous(5, 4));
        assert_eq!(Rows::contiguous(7, 0).pieces(0, 100).count(), 0);
        assert_eq!(rows.end(), 46);
        assert_eq!(rows.len(), 12);
    }

    proptest::proptest! {
        #[test]
        fn pieces_cover_the_rows_in_range_exactly(
            first in 0u64..64,
            width in 1u64..24,
            gap in 0u64..24,
            count in 0u64..12,
            begin in 0u64..400,
            len in 1u64..400,
        ) {
            let rows = Rows::strided(first, width, width + gap, count);
            let (got, n) = expand(rows.pieces(begin, len));
            proptest::prop_assert_eq!(got, brute(&rows, begin, len));
            proptest::prop_assert!(n <= 3);
        }
    }
}
