//! Shared between the p25 eBPF programs and userspace.
//!
//! - [`abi`]: map names, `#[repr(C)]` keys and values, counter layouts, [`abi::ABI_VERSION`].
//! - [`packet`]: the [`packet::PacketBuf`] trait the classifier reads packets through.
//! - [`classify`]: the one classifier, run by the XDP and TC hooks and, on the host, as
//!   the reference model.
//! - [`track`]: what the hooks record after a verdict (offender keys, the event rate
//!   limit), also shared with the model.
//!
//! `no_std` so the eBPF crate can use it; the `user` feature adds the `aya::Pod` impls
//! userspace needs to put these types in maps.
#![no_std]

pub mod abi;
pub mod classify;
pub mod packet;
pub mod reject;
pub mod track;

#[cfg(feature = "user")]
mod pod {
    use crate::abi::{
        AbiRecord, AllowValue, Bucket, Config, Counter, CounterKey, Event, Ipv4Key, Ipv6Key,
        OffenderKey, OffenderValue, SubscriberLengths, SubscriberValue,
    };

    // SAFETY: all of these are #[repr(C)] or #[repr(transparent)] over integers and byte
    // arrays, with explicit padding fields, so every bit pattern is valid and no byte is
    // uninitialised padding.
    unsafe impl aya::Pod for Ipv4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Ipv6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SubscriberValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AbiRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OffenderKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OffenderValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SubscriberLengths {}
}
