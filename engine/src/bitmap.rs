//! The out-of-sync bitmap: one bit per 4 KiB block, set while a block may differ
//! from the peer's copy. Persisted page by page at checkpoints; drives resync.
//!
//! Two levels, so memory follows what is out of sync and not the volume's size: pages
//! of 32 768 bits (one on-disk page, 128 MiB of volume) are held only while they have
//! a bit set, in an ordered map that doubles as the summary of which extents have any
//! bit set. A page is held in the smallest of three forms: full (every bit set: no
//! words), sparse (its few non-zero words, as after random writes while the peer is
//! away) or dense (4 KiB). A running count answers "how many" at once, and a scan for
//! the next set bit skips every empty page in one map lookup. An empty or a full
//! bitmap of any size costs a few dozen bytes per 128 MiB at most; only pages with
//! many scattered bits cost 4 KiB.

use std::collections::{BTreeMap, BTreeSet};

use crate::layout::{BITS_PER_PAGE, PAGE_BYTES};

const WORDS_PER_PAGE: usize = (BITS_PER_PAGE / 64) as usize;

/// The bits of one page, in the smallest of three forms.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Words {
    /// Every bit of the page (within the bitmap) is set.
    Full,
    /// The non-zero words, sorted by index: a page with few bits set (random writes
    /// while the peer is away) costs bytes, not 4 KiB.
    Sparse(Vec<(u16, u64)>),
    /// Every word.
    Dense(Box<[u64]>),
}

/// Non-zero words a sparse page holds at most before it becomes dense.
const SPARSE_MAX: usize = 64;

/// One page of bits and how many are set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Page {
    words: Words,
    ones: u32,
}

/// Word `word` of a page of `valid` bits whose every bit is set.
fn full_word(word: usize, valid: u64) -> u64 {
    let base = word as u64 * 64;
    if base >= valid {
        0
    } else if valid - base >= 64 {
        u64::MAX
    } else {
        (1u64 << (valid - base)) - 1
    }
}

impl Page {
    fn empty() -> Page {
        Page {
            words: Words::Sparse(Vec::new()),
            ones: 0,
        }
    }

    fn full(valid: u64) -> Page {
        Page {
            words: Words::Full,
            ones: valid as u32,
        }
    }

    /// A page from all its words, in the smallest form.
    fn from_words(words: &[u64], valid: u64) -> Page {
        let ones = words.iter().map(|w| w.count_ones()).sum::<u32>();
        let nonzero = words.iter().filter(|&&w| w != 0).count();
        let words = if u64::from(ones) == valid {
            Words::Full
        } else if nonzero <= SPARSE_MAX {
            Words::Sparse(
                words
                    .iter()
                    .enumerate()
                    .filter(|(_, &w)| w != 0)
                    .map(|(i, &w)| (i as u16, w))
                    .collect(),
            )
        } else {
            Words::Dense(words.into())
        };
        Page { words, ones }
    }

    fn word(&self, word: usize, valid: u64) -> u64 {
        match &self.words {
            Words::Full => full_word(word, valid),
            Words::Sparse(entries) => entries
                .binary_search_by_key(&(word as u16), |&(index, _)| index)
                .map_or(0, |at| entries[at].1),
            Words::Dense(words) => words[word],
        }
    }

    /// Sets word `word` to `value` (the caller keeps `ones`).
    fn set_word(&mut self, word: usize, value: u64, valid: u64) {
        if let Words::Full = self.words {
            let dense = (0..WORDS_PER_PAGE).map(|w| full_word(w, valid)).collect();
            self.words = Words::Dense(dense);
        }
        match &mut self.words {
            Words::Full => unreachable!("made dense above"),
            Words::Dense(words) => words[word] = value,
            Words::Sparse(entries) => {
                match entries.binary_search_by_key(&(word as u16), |&(index, _)| index) {
                    Ok(at) if value == 0 => {
                        entries.remove(at);
                    }
                    Ok(at) => entries[at].1 = value,
                    Err(_) if value == 0 => {}
                    Err(at) => {
                        entries.insert(at, (word as u16, value));
                        if entries.len() > SPARSE_MAX {
                            let mut dense = vec![0u64; WORDS_PER_PAGE].into_boxed_slice();
                            for &(index, value) in entries.iter() {
                                dense[usize::from(index)] = value;
                            }
                            self.words = Words::Dense(dense);
                        }
                    }
                }
            }
        }
    }

    /// The first set bit at or after bit `start` of the page, if any.
    fn next_set(&self, start: u64) -> Option<u64> {
        let first = (start / 64) as usize;
        let masked = |index: usize, value: u64| {
            let value = if index == first {
                value & (u64::MAX << (start % 64))
            } else {
                value
            };
            (value != 0).then(|| index as u64 * 64 + u64::from(value.trailing_zeros()))
        };
        match &self.words {
            Words::Full => Some(start),
            Words::Sparse(entries) => {
                let from = entries.partition_point(|&(index, _)| usize::from(index) < first);
                entries[from..]
                    .iter()
                    .find_map(|&(index, value)| masked(usize::from(index), value))
            }
            Words::Dense(words) => (first..WORDS_PER_PAGE).find_map(|i| masked(i, words[i])),
        }
    }

    /// After a change: a page whose every bit is set drops its words.
    fn compact(&mut self, valid: u64) {
        if u64::from(self.ones) == valid {
            self.words = Words::Full;
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Bitmap {
    bits: u64,
    ones: u64,
    /// Pages with at least one bit set.
    pages: BTreeMap<u64, Page>,
    /// Pages changed since the last [`Bitmap::take_dirty_pages`].
    dirty: BTreeSet<u64>,
}

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap {
            bits,
            ..Bitmap::default()
        }
    }

    /// Bits of page `page` that lie within the bitmap.
    fn valid_bits(&self, page: u64) -> u64 {
        self.bits
            .saturating_sub(page * BITS_PER_PAGE)
            .min(BITS_PER_PAGE)
    }

    /// Loads from on-disk bytes (little-endian u64 words); bits past the end are ignored.
    pub fn from_bytes(bits: u64, bytes: &[u8]) -> Bitmap {
        let mut bitmap = Bitmap::new(bits);
        for (page, chunk) in bytes.chunks(PAGE_BYTES as usize).enumerate() {
            bitmap.load_page(page as u64, chunk);
        }
        bitmap.dirty.clear();
        bitmap
    }

    /// Loads page `page` from its on-disk bytes (at most one page; bits past the end of
    /// the bitmap are ignored), replacing what memory held for it. Not marked dirty.
    pub fn load_page(&mut self, page: u64, bytes: &[u8]) {
        if let Some(old) = self.pages.remove(&page) {
            self.ones -= u64::from(old.ones);
        }
        let valid = self.valid_bits(page);
        if valid == 0 {
            return;
        }
        let mut words = vec![0u64; WORDS_PER_PAGE];
        for (index, (word, chunk)) in words.iter_mut().zip(bytes.chunks_exact(8)).enumerate() {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(chunk);
            *word = u64::from_le_bytes(raw) & full_word(index, valid);
        }
        let loaded = Page::from_words(&words, valid);
        if loaded.ones > 0 {
            self.ones += u64::from(loaded.ones);
            self.pages.insert(page, loaded);
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

    /// Pages with any bit set, in order (the summary).
    pub fn nonzero_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.keys().copied()
    }

    /// Bytes of memory the pages take (the summary aside).
    pub fn memory_bytes(&self) -> u64 {
        self.pages
            .values()
            .map(|page| match &page.words {
                Words::Full => 64,
                Words::Sparse(entries) => 64 + 16 * entries.capacity() as u64,
                Words::Dense(_) => 64 + PAGE_BYTES,
            })
            .sum()
    }

    pub fn test(&self, bit: u64) -> bool {
        bit < self.bits
            && self.pages.get(&(bit / BITS_PER_PAGE)).is_some_and(|page| {
                let at = bit % BITS_PER_PAGE;
                page.word((at / 64) as usize, BITS_PER_PAGE) & (1 << (at % 64)) != 0
            })
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
            let page_index = bit / BITS_PER_PAGE;
            let page_start = page_index * BITS_PER_PAGE;
            let valid = self.valid_bits(page_index);
            let page_end = (page_start + valid).min(end);
            let whole = bit == page_start && page_end == page_start + valid;
            let before = self.pages.get(&page_index).map_or(0, |page| page.ones);
            let page_changed = if whole {
                // The whole page: no words needed either way.
                if set {
                    self.pages.insert(page_index, Page::full(valid));
                    valid as u32 - before
                } else {
                    self.pages.remove(&page_index);
                    before
                }
            } else if !set && before == 0 {
                0
            } else {
                let page = self.pages.entry(page_index).or_insert_with(Page::empty);
                let mut page_changed = 0u32;
                while bit < page_end {
                    let at = bit - page_start;
                    let word = (at / 64) as usize;
                    let low = at % 64;
                    let span = (64 - low).min(page_end - bit);
                    let mask = if span == 64 {
                        u64::MAX
                    } else {
                        ((1u64 << span) - 1) << low
                    };
                    let old = page.word(word, valid);
                    let new = if set { old | mask } else { old & !mask };
                    if new != old {
                        page.set_word(word, new, valid);
                        page_changed += (old ^ new).count_ones();
                    }
                    bit += span;
                }
                if set {
                    page.ones += page_changed;
                } else {
                    page.ones -= page_changed;
                }
                page.compact(valid);
                if page.ones == 0 {
                    self.pages.remove(&page_index);
                }
                page_changed
            };
            bit = page_end;
            if page_changed > 0 {
                self.dirty.insert(page_index);
            }
            changed += u64::from(page_changed);
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

    /// First set bit at or after `from`. Skips empty pages in one lookup.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        self.pages
            .range(from / BITS_PER_PAGE..)
            .find_map(|(&index, page)| {
                let base = index * BITS_PER_PAGE;
                page.next_set(from.saturating_sub(base)).map(|at| base + at)
            })
            .filter(|&bit| bit < self.bits)
    }

    /// First clear bit at or after `from` (or `bits()` if none).
    pub fn next_clear(&self, from: u64) -> u64 {
        let mut bit = from;
        while bit < self.bits {
            let index = bit / BITS_PER_PAGE;
            let Some(page) = self.pages.get(&index) else {
                return bit;
            };
            if !matches!(page.words, Words::Full) {
                let valid = self.valid_bits(index);
                let at = bit % BITS_PER_PAGE;
                let first = (at / 64) as usize;
                for word in first..WORDS_PER_PAGE {
                    let mut value = !page.word(word, valid);
                    if word == first {
                        value &= u64::MAX << (at % 64);
                    }
                    if value != 0 {
                        let found = index * BITS_PER_PAGE
                            + word as u64 * 64
                            + u64::from(value.trailing_zeros());
                        return found.min(self.bits);
                    }
                }
            }
            bit = (index + 1) * BITS_PER_PAGE;
        }
        self.bits
    }

    /// The run of set bits starting at the first set bit at or after `from`, at most
    /// `max_len` long: `(start, len)`.
    pub fn next_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let start = self.next_set(from)?;
        let end = self.next_clear(start).min(start.saturating_add(max_len));
        Some((start, end - start))
    }

    /// Sets every bit that is set in `other` (bits past our end are ignored).
    pub fn union_with(&mut self, other: &Bitmap) {
        for (&index, page) in &other.pages {
            if let Words::Full = page.words {
                self.set_range(index * BITS_PER_PAGE, BITS_PER_PAGE);
                continue;
            }
            let valid = other.valid_bits(index);
            for word_index in 0..WORDS_PER_PAGE {
                let word = page.word(word_index, valid);
                if word != 0 {
                    self.or_word(index * WORDS_PER_PAGE as u64 + word_index as u64, word);
                }
            }
        }
    }

    /// ORs `value` into word `word` (bits past the end are ignored); returns how many
    /// bits changed.
    pub fn or_word(&mut self, word: u64, value: u64) -> u64 {
        let Some(base) = word.checked_mul(64).filter(|&base| base < self.bits) else {
            return 0;
        };
        let mut value = value;
        if self.bits - base < 64 {
            value &= (1u64 << (self.bits - base)) - 1;
        }
        if value == 0 {
            return 0;
        }
        let index = base / BITS_PER_PAGE;
        let valid = self.valid_bits(index);
        let word_in_page = (word % WORDS_PER_PAGE as u64) as usize;
        if self
            .pages
            .get(&index)
            .is_some_and(|page| page.word(word_in_page, valid) & value == value)
        {
            return 0;
        }
        let page = self.pages.entry(index).or_insert_with(Page::empty);
        let old = page.word(word_in_page, valid);
        let changed = (value & !old).count_ones();
        page.set_word(word_in_page, old | value, valid);
        page.ones += changed;
        page.compact(valid);
        self.ones += u64::from(changed);
        self.dirty.insert(index);
        u64::from(changed)
    }

    /// Number of words (`ceil(bits / 64)`).
    pub fn word_count(&self) -> u64 {
        self.bits.div_ceil(64)
    }

    /// `count` words from word `first` (clamped to the bitmap); zero words cost no
    /// lookups beyond one per page.
    pub fn words_at(&self, first: u64, count: u64) -> Vec<u64> {
        let end = first.saturating_add(count).min(self.word_count());
        if first >= end {
            return Vec::new();
        }
        let mut out = vec![0u64; (end - first) as usize];
        let per_page = WORDS_PER_PAGE as u64;
        for (&index, page) in self.pages.range(first / per_page..=(end - 1) / per_page) {
            let page_first = index * per_page;
            let from = first.max(page_first);
            let to = end.min(page_first + per_page);
            let valid = self.valid_bits(index);
            for (slot, word) in out[(from - first) as usize..(to - first) as usize]
                .iter_mut()
                .zip((from - page_first) as usize..)
            {
                *slot = page.word(word, valid);
            }
        }
        out
    }

    /// Every word (for shipping to the peer): a vector of `ceil(bits / 64)` words.
    /// Allocated zeroed and filled only where pages have bits, so the untouched parts
    /// of a large, mostly empty copy cost no resident memory. Prefer
    /// [`Bitmap::words_at`] or [`Bitmap::nonzero_pages`] to stream instead.
    pub fn words(&self) -> Vec<u64> {
        self.words_at(0, self.word_count())
    }

    /// Pages changed since the last call (and clears their marks), in order, as they
    /// are now: a copy that costs what each page holds in memory (a full page a few
    /// bytes), encoded only as it is written (see [`DirtyPages::write_runs`]).
    pub fn take_dirty(&mut self) -> DirtyPages {
        let pages = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|page| (page, self.valid_bits(page), self.pages.get(&page).cloned()))
            .collect();
        DirtyPages { pages }
    }

    /// Whether any page changed since the last [`Bitmap::take_dirty_pages`].
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn mark_page_dirty(&mut self, page: usize) {
        self.dirty.insert(page as u64);
    }

    /// Number of on-disk pages.
    pub fn pages(&self) -> usize {
        self.bits.div_ceil(BITS_PER_PAGE) as usize
    }

    /// Encodes page `page` (4 KiB).
    pub fn encode_page(&self, page: usize) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE_BYTES as usize];
        if let Some(held) = self.pages.get(&(page as u64)) {
            let valid = self.valid_bits(page as u64);
            for (index, slot) in buf.chunks_exact_mut(8).enumerate() {
                slot.copy_from_slice(&held.word(index, valid).to_le_bytes());
            }
        }
        buf
    }

    /// Encodes every page (small bitmaps: tests and tools).
    pub fn encode_all(&self) -> Vec<u8> {
        (0..self.pages())
            .flat_map(|page| self.encode_page(page))
            .collect()
    }
}

/// Pages taken dirty ([`Bitmap::take_dirty`]), as they were then.
#[derive(Debug, Default)]
pub struct DirtyPages {
    /// (page, bits of it within the bitmap, what it held: `None` = no bit set).
    pages: Vec<(u64, u64, Option<Page>)>,
}

impl DirtyPages {
    /// The page indexes, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.iter().map(|&(page, _, _)| page)
    }

    /// Writes the pages through `write(first_page, bytes)`, consecutive pages together,
    /// at most `max_pages` per call: memory for one call's bytes, however many pages
    /// changed (a full sync of 15 TiB dirties 131 072). On an error, the first page of
    /// the failed call and the error: that page and the later ones were not written.
    pub fn write_runs<E>(
        &self,
        max_pages: usize,
        mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), (u64, E)> {
        let page_bytes = PAGE_BYTES as usize;
        let mut buf = Vec::with_capacity(page_bytes * max_pages.clamp(1, self.pages.len().max(1)));
        let mut index = 0;
        while index < self.pages.len() {
            let first = self.pages[index].0;
            buf.clear();
            while let Some((page, valid, held)) = self.pages.get(index) {
                let consecutive = *page == first + (buf.len() / page_bytes) as u64;
                if !consecutive || buf.len() / page_bytes >= max_pages.max(1) {
                    break;
                }
                for word in 0..WORDS_PER_PAGE {
                    let value = held.as_ref().map_or(0, |held| held.word(word, *valid));
                    buf.extend_from_slice(&value.to_le_bytes());
                }
                index += 1;
            }
            write(first, &buf).map_err(|error| (first, error))?;
        }
        Ok(())
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
        let dirty: Vec<u64> = bitmap.take_dirty().pages().collect();
        assert_eq!(dirty, vec![0, 2]);
    }

    /// Dirty pages are written in runs of consecutive pages, at most `max_pages` a
    /// call, each page's bytes as `encode_page` gives them when taken; a failed call
    /// names its first page (it and the later ones stay to be written).
    #[test]
    fn dirty_pages_are_written_in_bounded_runs_of_consecutive_pages() {
        let bits = 700 * BITS_PER_PAGE - 5;
        let mut bitmap = Bitmap::new(bits);
        for page in [0, 1, 2, 5] {
            bitmap.set_range(page * BITS_PER_PAGE + 7, 3);
        }
        bitmap.set_range(300 * BITS_PER_PAGE, 301 * BITS_PER_PAGE); // pages 300..=600
        bitmap.clear_range(2 * BITS_PER_PAGE, BITS_PER_PAGE); // dirty, now empty
        let expected: Vec<u8> = (0..bitmap.pages())
            .flat_map(|p| bitmap.encode_page(p))
            .collect();
        let dirty = bitmap.take_dirty();
        let mut calls = Vec::new();
        let mut image = vec![0xAAu8; expected.len()];
        dirty
            .write_runs(256, |page, bytes| {
                calls.push((page, bytes.len() / PAGE_BYTES as usize));
                let at = (page * PAGE_BYTES) as usize;
                image[at..at + bytes.len()].copy_from_slice(bytes);
                Ok::<(), ()>(())
            })
            .expect("no error");
        assert_eq!(calls, vec![(0, 3), (5, 1), (300, 256), (556, 45)]);
        for page in dirty.pages() {
            let at = (page * PAGE_BYTES) as usize;
            let end = at + PAGE_BYTES as usize;
            assert_eq!(image[at..end], expected[at..end], "page {page}");
        }
        let failed = dirty.write_runs(256, |page, _| if page == 300 { Err("EIO") } else { Ok(()) });
        assert_eq!(failed, Err((300, "EIO")));
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

    #[test]
    fn a_huge_bitmap_costs_only_its_set_pages() {
        let bits = (15u64 << 40) / 4096;
        let mut bitmap = Bitmap::new(bits);
        assert_eq!(bitmap.memory_bytes(), 0);
        bitmap.set_range(bits - 1, 1);
        bitmap.set_range(5, 3);
        assert_eq!(bitmap.count_ones(), 4);
        assert_eq!(bitmap.nonzero_pages().count(), 2);
        assert_eq!(bitmap.next_run(8, 100), Some((bits - 1, 1)));
        assert_eq!(bitmap.next_clear(5), 8);
        assert_eq!(bitmap.words_at(0, 1), vec![0b1110_0000]);
        assert_eq!(bitmap.words_at(bitmap.word_count() - 1, 5).len(), 1);
        // Random single blocks: a few dozen bytes per page touched, not 4 KiB.
        for block in (0..10_000u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % bits) {
            bitmap.set_range(block, 1);
        }
        assert!(bitmap.memory_bytes() < 10_000 * 200);
        bitmap.clear_range(0, bits);
        assert!(bitmap.is_empty() && bitmap.memory_bytes() == 0);
        // A full sync of 15 TiB: a few dozen bytes per 128 MiB.
        bitmap.set_all();
        assert_eq!(bitmap.count_ones(), bits);
        assert!(bitmap.memory_bytes() < 64 * bitmap.pages() as u64 + 1);
        assert_eq!(bitmap.next_clear(0), bits);
        bitmap.clear_range(0, 10);
        assert_eq!(bitmap.next_run(0, 100), Some((10, 100)));
        assert_eq!(bitmap.count_ones(), bits - 10);
    }

    /// Applies `ops` (set or clear, start, count) to a bitmap and to a vector of bools,
    /// and compares them every `step` bits (and the last three) and after a round trip.
    fn check_against_model(
        ops: &[(bool, u64, u64)],
        step: usize,
    ) -> Result<(u64, Bitmap), TestCaseError> {
        let size = 70_000u64;
        let mut bitmap = Bitmap::new(size);
        let mut model = vec![false; size as usize];
        for &(set, start, count) in ops {
            if set {
                bitmap.set_range(start, count);
            } else {
                bitmap.clear_range(start, count);
            }
            for bit in start..(start + count).min(size) {
                model[bit as usize] = set;
            }
        }
        prop_assert_eq!(
            bitmap.count_ones(),
            model.iter().filter(|&&b| b).count() as u64
        );
        for bit in (0..size).step_by(step).chain(size - 3..size) {
            prop_assert_eq!(bitmap.test(bit), model[bit as usize]);
            prop_assert_eq!(
                bitmap.next_set(bit),
                (bit..size).find(|&b| model[b as usize])
            );
            let expected_clear = (bit..size).find(|&b| !model[b as usize]).unwrap_or(size);
            prop_assert_eq!(bitmap.next_clear(bit), expected_clear);
        }
        let round_trip = Bitmap::from_bytes(size, &bitmap.encode_all());
        prop_assert_eq!(round_trip.words(), bitmap.words());
        prop_assert_eq!(round_trip.count_ones(), bitmap.count_ones());
        Ok((size, bitmap))
    }

    proptest! {
        #[test]
        fn short_runs_match_a_vec_of_bools(ops in proptest::collection::vec((any::<bool>(), 0u64..70_000, 0u64..300), 1..400)) {
            check_against_model(&ops, 61)?;
        }

        #[test]
        fn matches_a_vec_of_bools(ops in proptest::collection::vec((any::<bool>(), 0u64..70_000, 0u64..40_000), 1..50)) {
            let (size, bitmap) = check_against_model(&ops, 97)?;
            let mut merged = Bitmap::new(size);
            for (index, word) in bitmap.words().into_iter().enumerate() {
                merged.or_word(index as u64, word);
            }
            prop_assert_eq!(merged.words(), bitmap.words());
            prop_assert_eq!(merged.count_ones(), bitmap.count_ones());
        }
    }
}
