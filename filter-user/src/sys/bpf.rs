//! The `bpf(2)` commands aya 0.14 does not wrap: batched map operations and the ifindex of
//! a pinned link. The attribute structs and command numbers come from aya-obj's generated
//! kernel bindings (`bpf_attr`, `bpf_cmd`, `bpf_link_info`), not from hand-copied ones.
//!
//! The batch functions take the map's [`MapData`] and check, before the call, that the
//! map's key and value sizes are those of `K` and `V` and that its values are not per-CPU
//! (the kernel would then read or write `value_size * CPUs` bytes per entry), so that the
//! kernel never reads or writes past the caller's slices. That makes them safe to call;
//! the one `unsafe` block is the system call itself.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::{
    Pod,
    maps::{MapData, MapType},
};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

/// Issues one `bpf(2)` command.
///
/// # Safety
///
/// Every pointer in the member of `attr` that `cmd` reads must be valid for the reads and
/// writes `cmd` makes through it (sizes as the kernel derives them from the command, the
/// map's key and value sizes and the counts in `attr`), for the duration of the call.
unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, exclusively borrowed `union bpf_attr` of the size passed;
    // the caller guarantees the pointers inside it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An all-zero `bpf_attr`: what the kernel expects in every member a command does not use.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a C union of integer fields only; all-zero is a valid value
    // (and the one `bpf(2)` requires for unused fields).
    unsafe { std::mem::zeroed() }
}

/// An `EINVAL` naming what does not fit, for the size checks below.
fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Checks that `map` stores `K` keys and `V` values, one value per key (not per CPU), and
/// that the caller passes as many values as keys (`values`: `None` for a delete).
fn check_layout<K: Pod, V: Pod>(
    map: &MapData,
    keys: usize,
    values: Option<usize>,
) -> io::Result<()> {
    if values.is_some_and(|values| values != keys) {
        return Err(invalid(format!(
            "{keys} keys but {} values",
            values.unwrap_or_default()
        )));
    }
    let info = map
        .info()
        .map_err(|e| io::Error::other(format!("reading the map's info: {e}")))?;
    let map_type = info.map_type().ok();
    if !matches!(
        map_type,
        Some(MapType::Hash | MapType::LruHash | MapType::LpmTrie | MapType::Array)
    ) {
        return Err(invalid(format!(
            "batch operations here serve maps with one value per key, not {map_type:?}"
        )));
    }
    if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
        return Err(invalid(format!(
            "the map has {}-byte keys and {}-byte values, the caller {} and {}",
            info.key_size(),
            info.value_size(),
            size_of::<K>(),
            size_of::<V>()
        )));
    }
    Ok(())
}

/// The fd number as the kernel's `__u32` field wants it.
fn map_fd(map: &MapData) -> u32 {
    // A live descriptor is never negative.
    map.fd().as_fd().as_raw_fd() as u32
}

/// A slice length as the kernel's `__u32` count. Longer slices are cut to `u32::MAX`
/// entries: the kernel then processes fewer than the caller passed, never more.
fn count(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// What a batch command did: how many entries the kernel processed (it reports partial
/// progress on failure too) and how it ended.
#[derive(Debug)]
pub struct Batch {
    /// Entries processed.
    pub count: u32,
    /// The command's outcome.
    pub result: io::Result<()>,
}

impl Batch {
    fn failed(error: io::Error) -> Self {
        Self {
            count: 0,
            result: Err(error),
        }
    }
}

/// `BPF_MAP_UPDATE_BATCH`: inserts or replaces `keys[i] → values[i]`.
pub fn map_update_batch<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Batch {
    if let Err(e) = check_layout::<K, V>(map, keys.len(), Some(values.len())) {
        return Batch::failed(e);
    }
    let mut attr = zeroed_attr();
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = count(keys.len());
    attr.batch.map_fd = map_fd(map);
    run_batch(bpf_cmd::BPF_MAP_UPDATE_BATCH, attr)
}

/// `BPF_MAP_DELETE_BATCH`: deletes `keys`. The kernel stops at the first missing key
/// (`ENOENT`), with `count` the keys deleted before it.
pub fn map_delete_batch<K: Pod, V: Pod>(map: &MapData, keys: &[K]) -> Batch {
    if let Err(e) = check_layout::<K, V>(map, keys.len(), None) {
        return Batch::failed(e);
    }
    let mut attr = zeroed_attr();
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.count = count(keys.len());
    attr.batch.map_fd = map_fd(map);
    run_batch(bpf_cmd::BPF_MAP_DELETE_BATCH, attr)
}

/// `BPF_MAP_LOOKUP_BATCH`: reads up to `keys.len()` entries into `keys` and `values`,
/// starting after `cursor` (`None`: from the start), and leaves the position to continue
/// from in `next`. `ENOENT` means the walk reached the end (with `count` entries read).
pub fn map_lookup_batch<K: Pod, V: Pod>(
    map: &MapData,
    cursor: Option<&K>,
    next: &mut K,
    keys: &mut [K],
    values: &mut [V],
) -> Batch {
    if let Err(e) = check_layout::<K, V>(map, keys.len(), Some(values.len())) {
        return Batch::failed(e);
    }
    // A hash map's batch position is a `u32` bucket index, a trie's or an array's a key.
    if size_of::<K>() < size_of::<u32>() {
        return Batch::failed(invalid(format!(
            "{}-byte keys cannot hold a batch position",
            size_of::<K>()
        )));
    }
    let mut attr = zeroed_attr();
    attr.batch.in_batch = cursor.map_or(0, |cursor| std::ptr::from_ref(cursor) as u64);
    attr.batch.out_batch = std::ptr::from_mut(next) as u64;
    attr.batch.keys = keys.as_mut_ptr() as u64;
    attr.batch.values = values.as_mut_ptr() as u64;
    attr.batch.count = count(keys.len());
    attr.batch.map_fd = map_fd(map);
    run_batch(bpf_cmd::BPF_MAP_LOOKUP_BATCH, attr)
}

fn run_batch(cmd: bpf_cmd, mut attr: bpf_attr) -> Batch {
    // SAFETY: the callers filled `attr.batch` from live slices of (at least) `count` keys
    // and values of the map's key and value sizes (checked by `check_layout`), and the
    // in/out batch positions from live `K`s, at least as large as the position the kernel
    // copies (a `u32` bucket index for a hash, a key otherwise); all outlive the call.
    let result = unsafe { bpf(cmd, &mut attr) }.map(drop);
    // SAFETY: the `batch` member is the one written above (and by the kernel).
    let count = unsafe { attr.batch.count };
    Batch { count, result }
}

/// The interface index the XDP or tcx link pinned at `path` is attached to, from
/// `bpf_link_info`; `None` once the interface is gone (the link is then defunct), if the
/// pin is no such link, or if it cannot be read. aya's `LinkInfo` does not expose the
/// ifindex, nor `FdLink` its fd, hence `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` here.
pub fn pinned_link_ifindex(path: &Path) -> Option<u32> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = c_path.as_ptr() as u64;
    // SAFETY: `pathname` points at a NUL-terminated string that outlives the call; the
    // command reads nothing else through a pointer.
    let fd = unsafe { bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }.ok()?;
    let fd = i32::try_from(fd).ok()?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it;
    // the OwnedFd closes it on drop.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: `bpf_link_info` is a C struct of integers and a union of integer structs;
    // all-zero is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = u32::try_from(fd.as_raw_fd()).ok()?;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: `info` points at a writable `bpf_link_info` of `info_len` bytes that outlives
    // the call; the kernel writes at most that much.
    unsafe { bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.ok()?;
    // SAFETY: the kernel filled the union member that `type_` names; both members read
    // here are plain integers, so any bytes are a valid value anyway.
    let ifindex = unsafe {
        match info.type_ {
            t if t == bpf_link_type::BPF_LINK_TYPE_XDP as u32 => info.__bindgen_anon_1.xdp.ifindex,
            t if t == bpf_link_type::BPF_LINK_TYPE_TCX as u32 => info.__bindgen_anon_1.tcx.ifindex,
            _ => return None,
        }
    };
    (ifindex != 0).then_some(ifindex)
}
