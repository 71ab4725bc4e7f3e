//! The out-of-sync bitmap: one bit per 4 KiB block, set while a block may differ
//! from the peer's copy. Persisted page by page at checkpoints; drives resync.

use crate::layout::{BITS_PER_PAGE, PAGE_BYTES};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
    ones: u64,
    dirty_pages: Vec<bool>,
}

const WORDS_PER_PAGE: u64 = BITS_PER_PAGE / 64;

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
            ones: 0,
            dirty_pages: vec![false; bits.div_ceil(BITS_PER_PAGE) as usize],
        }
    }

    /// Loads from on-disk bytes (little-endian u64 words); bits past the end are ignored.
    pub fn from_bytes(bits: u64, bytes: &[u8]) -> Bitmap {
        let mut bitmap = Bitmap::new(bits);
        for (word, chunk) in bitmap.words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(chunk);
            *word = u64::from_le_bytes(raw);
        }
        bitmap.mask_tail();
        bitmap.ones = bitmap.words.iter().map(|w| u64::from(w.count_ones())).sum();
        bitmap
    }

    fn mask_tail(&mut self) {
        let tail_bits = self.bits % 64;
        if tail_bits != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail_bits) - 1;
            }
        }
    }

    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    pub fn is_empty(&self) -> bool {
        self.ones == 0
    }

    pub fn test(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn touch(&mut self, word: usize) {
        self.dirty_pages[word / WORDS_PER_PAGE as usize] = true;
    }

    /// Sets `[start, start+count)` (clamped to the bitmap); returns how many bits changed.
    pub fn set_range(&mut self, start: u64, count: u64) -> u64 {
        self.update_range(start, count, true)
    }

    /// Clears `[start, start+count)` (clamped); returns how many bits changed.
    pub fn clear_range(&mut self, start: u64, count: u64) -> u64 {
        self.update_range(start, count, false)
    }

    fn update_range(&mut self, start: u64, count: u64, set: bool) -> u64 {
        let end = start.saturating_add(count).min(self.bits);
        let mut bit = start;
        let mut changed = 0;
        while bit < end {
            let word = (bit / 64) as usize;
            let low = bit % 64;
            let span = (64 - low).min(end - bit);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << low
            };
            let before = self.words[word];
            let after = if set { before | mask } else { before & !mask };
            if after != before {
                self.words[word] = after;
                let delta = u64::from((before ^ after).count_ones());
                changed += delta;
                self.touch(word);
            }
            bit += span;
        }
        if set {
            self.ones += changed;
        } else {
            self.ones -= changed;
        }
        changed
    }

    pub fn set_all(&mut self) {
        self.set_range(0, self.bits);
    }

    /// First set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut word = (from / 64) as usize;
        let mut value = self.words[word] & (u64::MAX << (from % 64));
        loop {
            if value != 0 {
                let bit = word as u64 * 64 + u64::from(value.trailing_zeros());
                return (bit < self.bits).then_some(bit);
            }
            word += 1;
            if word >= self.words.len() {
                return None;
            }
            value = self.words[word];
        }
    }

    /// First clear bit at or after `from` (or `bits()` if none).
    pub fn next_clear(&self, from: u64) -> u64 {
        if from >= self.bits {
            return self.bits;
        }
        let mut word = (from / 64) as usize;
        let mut value = !self.words[word] & (u64::MAX << (from % 64));
        loop {
            if value != 0 {
                return (word as u64 * 64 + u64::from(value.trailing_zeros())).min(self.bits);
            }
            word += 1;
            if word >= self.words.len() {
                return self.bits;
            }
            value = !self.words[word];
        }
    }

    /// The run of set bits starting at the first set bit at or after `from`, at most
    /// `max_len` long: `(start, len)`.
    pub fn next_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let start = self.next_set(from)?;
        let end = self.next_clear(start).min(start.saturating_add(max_len));
        Some((start, end - start))
    }

    /// Sets every bit that is set in `other` (same size).
    pub fn union_with(&mut self, other: &Bitmap) {
        for (index, (word, theirs)) in self.words.iter_mut().zip(&other.words).enumerate() {
            let merged = *word | theirs;
            if merged != *word {
                self.ones += u64::from((merged ^ *word).count_ones());
                *word = merged;
                self.dirty_pages[index / WORDS_PER_PAGE as usize] = true;
            }
        }
    }

    /// The raw words (for shipping to the peer).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Pages changed since the last call.
    pub fn take_dirty_pages(&mut self) -> Vec<usize> {
        let pages = self
            .dirty_pages
            .iter()
            .enumerate()
            .filter(|(_, &d)| d)
            .map(|(p, _)| p)
            .collect();
        self.dirty_pages.iter_mut().for_each(|d| *d = false);
        pages
    }

    /// Whether any page changed since the last [`Bitmap::take_dirty_pages`].
    pub fn has_dirty(&self) -> bool {
        self.dirty_pages.iter().any(|&dirty| dirty)
    }

    pub fn mark_page_dirty(&mut self, page: usize) {
        self.dirty_pages[page] = true;
    }

    pub fn pages(&self) -> usize {
        self.dirty_pages.len()
    }

    /// Encodes page `page` (4 KiB).
    pub fn encode_page(&self, page: usize) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE_BYTES as usize];
        let first = page * WORDS_PER_PAGE as usize;
        let last = (first + WORDS_PER_PAGE as usize).min(self.words.len());
        for (slot, word) in buf.chunks_exact_mut(8).zip(&self.words[first..last]) {
            slot.copy_from_slice(&word.to_le_bytes());
        }
        buf
    }

    pub fn encode_all(&self) -> Vec<u8> {
        (0..self.pages())
            .flat_map(|page| self.encode_page(page))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_are_found_and_counted() {
        let mut bitmap = Bitmap::new(100_000);
        assert_eq!(bitmap.set_range(10, 5), 5);
        assert_eq!(bitmap.set_range(12, 10), 7);
        bitmap.set_range(70_000, 200);
        assert_eq!(bitmap.count_ones(), 12 + 200);
        assert_eq!(bitmap.next_run(0, u64::MAX), Some((10, 12)));
        assert_eq!(bitmap.next_run(22, u64::MAX), Some((70_000, 200)));
        assert_eq!(bitmap.next_run(70_000, 64), Some((70_000, 64)));
        assert_eq!(bitmap.next_run(70_200, u64::MAX), None);
        assert_eq!(bitmap.clear_range(0, 100_000), 212);
        assert!(bitmap.is_empty());
        let dirty = bitmap.take_dirty_pages();
        assert_eq!(dirty, vec![0, 2]);
    }

    #[test]
    fn tail_bits_are_masked_and_ranges_clamped() {
        let mut bitmap = Bitmap::new(70);
        bitmap.set_range(60, 1000);
        assert_eq!(bitmap.count_ones(), 10);
        let loaded = Bitmap::from_bytes(70, &[0xff; 4096]);
        assert_eq!(loaded.count_ones(), 70);
        assert_eq!(loaded.next_clear(0), 70);
    }

    proptest! {
        #[test]
        fn matches_a_vec_of_bools(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 0u64..200), 1..50)) {
            let mut bitmap = Bitmap::new(300);
            let mut model = vec![false; 300];
            for (set, start, count) in ops {
                if set { bitmap.set_range(start, count); } else { bitmap.clear_range(start, count); }
                for bit in start..(start + count).min(300) { model[bit as usize] = set; }
            }
            prop_assert_eq!(bitmap.count_ones(), model.iter().filter(|&&b| b).count() as u64);
            for bit in 0..300u64 {
                prop_assert_eq!(bitmap.test(bit), model[bit as usize]);
                let expected_next = (bit..300).find(|&b| model[b as usize]);
                prop_assert_eq!(bitmap.next_set(bit), expected_next);
            }
            let round_trip = Bitmap::from_bytes(300, &bitmap.encode_all());
            prop_assert_eq!(round_trip.words(), bitmap.words());
        }
    }
}
