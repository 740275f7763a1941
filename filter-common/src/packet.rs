//! The one abstraction the classifier needs from a packet: bounded reads.

use core::mem::size_of;

/// Types that any byte pattern is a valid value of, so they can be read straight out of a
/// packet.
///
/// # Safety
///
/// Implementors must have no padding, no invalid bit patterns and alignment 1 (reads are
/// unaligned anyway, but alignment 1 keeps `read_unaligned` trivially correct).
pub unsafe trait Plain: Copy {}

// SAFETY: every byte pattern is a valid u8 and arrays of it.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl<const N: usize> Plain for [u8; N] {}

/// Largest offset the classifier ever reads at. Offsets are masked with
/// [`OFFSET_MASK`] before use so the verifier can bound pointer arithmetic; the classifier
/// treats anything past this as truncated, which keeps the mask an identity.
pub const MAX_OFFSET: usize = OFFSET_MASK;
/// `2^14 - 1`: large enough for any real header stack (the deepest legal stack here is
/// well under 4 KiB), small enough that `offset + size_of::<T>()` cannot overflow a
/// verifier range check.
pub const OFFSET_MASK: usize = (1 << 14) - 1;

/// A packet the classifier can read from.
///
/// Implemented for the XDP and TC contexts in the eBPF crate (with explicit `data_end`
/// checks) and for `&[u8]` here, which makes the classifier its own host-side reference
/// model.
pub trait PacketBuf {
    /// Reads a `T` at byte `offset` from the start of the frame (the Ethernet header), or
    /// `None` if any byte of it lies past the end of the packet.
    fn load<T: Plain>(&self, offset: usize) -> Option<T>;
}

impl PacketBuf for &[u8] {
    #[inline(always)]
    fn load<T: Plain>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(size_of::<T>())?;
        let bytes = self.get(offset..end)?;
        // SAFETY: `bytes` is exactly size_of::<T>() long and T is Plain (any bit pattern
        // is valid, alignment 1).
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }
}

/// A packet the RST writer of reject mode can rewrite in place.
pub trait PacketBufMut: PacketBuf {
    /// Writes `value` at byte `offset`; false (and nothing written) if any byte of it lies
    /// past the end of the packet.
    fn store<T: Plain>(&mut self, offset: usize, value: T) -> bool;
}

impl PacketBuf for &mut [u8] {
    #[inline(always)]
    fn load<T: Plain>(&self, offset: usize) -> Option<T> {
        (&**self).load(offset)
    }
}

impl PacketBufMut for &mut [u8] {
    #[inline(always)]
    fn store<T: Plain>(&mut self, offset: usize, value: T) -> bool {
        let Some(end) = offset.checked_add(size_of::<T>()) else {
            return false;
        };
        let Some(bytes) = self.get_mut(offset..end) else {
            return false;
        };
        // SAFETY: `bytes` is exactly size_of::<T>() long, and T is Plain (no padding, so
        // every byte written is initialised).
        unsafe { core::ptr::write_unaligned(bytes.as_mut_ptr().cast::<T>(), value) };
        true
    }
}

/// Reads a big-endian `u16`.
#[inline(always)]
pub fn load_be16<P: PacketBuf>(pkt: &P, offset: usize) -> Option<u16> {
    pkt.load::<[u8; 2]>(offset).map(u16::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_loads_are_bounded() {
        let bytes: &[u8] = &[1, 2, 3, 4];
        assert_eq!(bytes.load::<[u8; 2]>(2), Some([3, 4]));
        assert_eq!(bytes.load::<[u8; 2]>(3), None);
        assert_eq!(bytes.load::<u8>(usize::MAX), None);
        assert_eq!(load_be16(&bytes, 0), Some(0x0102));
    }
}
