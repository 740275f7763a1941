//! `filter_user::sys::bpf` against real maps of the p25 object: the batch calls work when
//! the caller's key and value types are the map's, and refuse (before any system call) a
//! map whose sizes or per-CPU values do not match, so that the kernel never writes past
//! the caller's buffers.

use std::io;

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
};
use filter_common::abi::{CONFIG_INDEX, Config, Counter, map_names};
use filter_user::{EBPF_OBJECT, sys::bpf};

fn map_data<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a MapData> {
    match ebpf.map(name).with_context(|| format!("no map {name}"))? {
        Map::Array(data) | Map::PerCpuArray(data) => Ok(data),
        _ => bail!("{name} is not an array"),
    }
}

fn refused(batch: &bpf::Batch) -> bool {
    batch.count == 0
        && batch
            .result
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::InvalidInput)
}

#[test]
fn batches_check_the_map_layout_before_calling_the_kernel() -> Result<()> {
    p25_tests::require_root();
    // Maps only (created, not pinned); no program is loaded or attached.
    let ebpf = EbpfLoader::new()
        .load(EBPF_OBJECT)
        .context("loading the object")?;
    let config = map_data(&ebpf, map_names::CONFIG)?;
    let written = Config {
        generation: 7,
        ..Config::default()
    };

    let update = bpf::map_update_batch::<u32, Config>(config, &[CONFIG_INDEX], &[written]);
    ensure!(
        update.result.is_ok() && update.count == 1,
        "update: {update:?}"
    );
    let mut keys = [0_u32; 4];
    let mut values = [Config::default(); 4];
    let mut next = 0_u32;
    let lookup = bpf::map_lookup_batch(config, None, &mut next, &mut keys, &mut values);
    // One entry: the walk ends (ENOENT) with it read.
    ensure!(
        lookup.count == 1 && values.first() == Some(&written),
        "lookup: {lookup:?}, first value {:?}",
        values.first()
    );

    // Wrong value size, too few values, per-CPU values: refused before the kernel sees them.
    let wrong_value = bpf::map_update_batch::<u32, u64>(config, &[CONFIG_INDEX], &[7]);
    ensure!(refused(&wrong_value), "wrong value size: {wrong_value:?}");
    let short = bpf::map_update_batch::<u32, Config>(config, &[0, 0], &[written]);
    ensure!(refused(&short), "fewer values than keys: {short:?}");
    let counters = map_data(&ebpf, map_names::COUNTERS)?;
    let mut per_cpu = [Counter::default(); 4];
    let per_cpu_lookup = bpf::map_lookup_batch(counters, None, &mut next, &mut keys, &mut per_cpu);
    ensure!(refused(&per_cpu_lookup), "per-CPU map: {per_cpu_lookup:?}");
    let small_key = bpf::map_lookup_batch::<u16, Config>(
        config,
        None,
        &mut 0,
        &mut [0; 4],
        &mut [Config::default(); 4],
    );
    ensure!(refused(&small_key), "2-byte keys: {small_key:?}");
    Ok(())
}
