//! A heap buffer whose start address is aligned, for O_DIRECT I/O.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A zero-initialised byte buffer aligned to a power of two.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads, like &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zero bytes aligned to `alignment` (a power of two).
    ///
    /// Panics if `alignment` is not a power of two or the size overflows: both are
    /// programming errors, never driven by input.
    pub fn zeroed(len: usize, alignment: usize) -> AlignedBuf {
        let layout = Self::layout(len, alignment);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// Copies `data` into a new buffer aligned to `alignment` (without zeroing the
    /// bytes first: the bounce buffers of O_DIRECT writes are on the hot path).
    pub fn copy_from(data: &[u8], alignment: usize) -> AlignedBuf {
        let layout = Self::layout(data.len(), alignment);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: the allocation holds layout.size() >= data.len() bytes and does not
        // overlap `data`; after the copy and the fill every byte is initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len());
            std::ptr::write_bytes(ptr.as_ptr().add(data.len()), 0, layout.size() - data.len());
        }
        AlignedBuf {
            ptr,
            len: data.len(),
            layout,
        }
    }

    fn layout(len: usize, alignment: usize) -> Layout {
        assert!(
            alignment.is_power_of_two(),
            "alignment must be a power of two"
        );
        let size = len.max(1).next_multiple_of(alignment);
        Layout::from_size_align(size, alignment).expect("valid layout")
    }

    pub fn alignment(&self) -> usize {
        self.layout.align()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation of at least len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AlignedBuf({} bytes, align {})",
            self.len,
            self.alignment()
        )
    }
}

/// Whether `buf` starts at an address that is a multiple of `alignment`.
pub fn is_aligned(buf: &[u8], alignment: usize) -> bool {
    (buf.as_ptr() as usize) % alignment == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_sized() {
        for alignment in [1, 512, 4096] {
            let buf = AlignedBuf::zeroed(10_000, alignment);
            assert_eq!(buf.len(), 10_000);
            assert!(is_aligned(&buf, alignment));
            assert!(buf.iter().all(|&b| b == 0));
        }
        let copy = AlignedBuf::copy_from(b"hello", 4096);
        assert_eq!(&copy[..], b"hello");
    }
}
