//! The ABI record of pinned maps: a record of this build or an earlier build of the same
//! layout (`AbiRecord::SAME_LAYOUT`) is adopted, any other record of this version is
//! refused, before anything is reused.

use anyhow::{Context as _, Result, ensure};
use aya::maps::{Array, Map, MapData};
use filter_common::abi::{ABI_VERSION, AbiRecord, CONFIG_INDEX, map_names};
use filter_user::{Dataplane, Error, KernelTables, loader::PinLayout};

/// Overwrites the record in the pinned ABI map, as another build would have written it.
fn write_record(layout: &PinLayout, record: AbiRecord) -> Result<()> {
    let data = MapData::from_pin(layout.map(map_names::ABI)).context("opening the ABI pin")?;
    let mut abi: Array<MapData, AbiRecord> = Array::try_from(Map::Array(data))?;
    abi.set(CONFIG_INDEX, record, 0)
        .context("writing the ABI record")?;
    Ok(())
}

#[test]
fn records_of_the_same_layout_are_adopted_and_others_refused() -> Result<()> {
    let pins = p25_tests::pins::TempPins::new("abi")?;
    let layout = pins.layout();
    drop(Dataplane::open_pinned(layout).context("creating the pins")?);

    // After an ABI_VERSION bump the list holds no record of this version: nothing to adopt.
    for earlier in AbiRecord::SAME_LAYOUT
        .into_iter()
        .filter(|r| r.version == ABI_VERSION)
    {
        write_record(layout, earlier)?;
        drop(
            Dataplane::open_pinned(layout)
                .with_context(|| format!("adopting the earlier record {earlier:?}"))?,
        );
        drop(KernelTables::open_pinned(layout).context("opening the tables")?);
    }

    let foreign = AbiRecord {
        version: ABI_VERSION,
        fingerprint: AbiRecord::CURRENT.fingerprint ^ 1,
    };
    write_record(layout, foreign)?;
    match Dataplane::open_pinned(layout) {
        Err(Error::AbiMismatch { found, expected }) => {
            ensure!(found == foreign && expected == AbiRecord::CURRENT);
        }
        Err(other) => anyhow::bail!("expected an ABI mismatch, got {other}"),
        Ok(_) => anyhow::bail!("a record of another layout must be refused"),
    }
    Ok(())
}
