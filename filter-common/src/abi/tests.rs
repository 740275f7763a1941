//! Layout fingerprint and enumeration macro tests.

use super::*;

/// Pins the fingerprint. If this fails, a map layout or an enumeration constant
/// changed: bump [`ABI_VERSION`] (pinned maps of the old layout must be migrated, not
/// misread), then update the value here.
#[test]
fn layout_fingerprint_is_pinned() {
    assert_eq!(
        (ABI_VERSION, LAYOUT_FINGERPRINT),
        (4, 0x4e8e_86a7),
        "the map layout changed: bump ABI_VERSION, then update this test"
    );
}

/// What ABI v4 builds before this fingerprint wrote: sizes and counts only. Same
/// layout, so their pinned maps stay usable (see [`AbiRecord::SAME_LAYOUT`]).
#[test]
fn the_earlier_v4_record_describes_this_layout() {
    let sizes_and_counts = Fingerprint::EMPTY.parts(&[
        size_of::<Ipv4Key>() as u32,
        size_of::<Ipv6Key>() as u32,
        size_of::<SubscriberValue>() as u32,
        size_of::<AllowValue>() as u32,
        size_of::<Config>() as u32,
        size_of::<Counter>() as u32,
        size_of::<CounterKey>() as u32,
        size_of::<AbiRecord>() as u32,
        size_of::<OffenderKey>() as u32,
        size_of::<OffenderValue>() as u32,
        size_of::<Event>() as u32,
        size_of::<Bucket>() as u32,
        COUNTER_SLOTS,
        IFACE_SLOTS,
        EventStat::COUNT as u32,
        ParseOutcome::COUNT as u32,
        size_of::<BlockAction>() as u32,
        RejectFallback::COUNT as u32,
        Verdict::COUNT as u32,
    ]);
    let [earlier] = AbiRecord::SAME_LAYOUT;
    assert_eq!(earlier.fingerprint, sizes_and_counts.0);
    assert!(earlier.is_compatible());
    assert!(AbiRecord::CURRENT.is_compatible());
    assert!(!AbiRecord::default().is_compatible());
    assert!(
        !AbiRecord {
            version: ABI_VERSION,
            fingerprint: LAYOUT_FINGERPRINT ^ 1,
        }
        .is_compatible()
    );
}

#[repr(C)]
struct Before {
    a: u8,
    b: u8,
    c: u16,
}

/// `Before` with two fields swapped: same size, same field types.
#[repr(C)]
struct Swapped {
    b: u8,
    a: u8,
    c: u16,
}

#[test]
fn reordering_fields_changes_the_fingerprint() {
    let before = layout_of!(Before { a, b, c });
    let swapped = layout_of!(Swapped { a, b, c });
    assert_eq!(size_of::<Before>(), size_of::<Swapped>());
    assert_ne!(
        Fingerprint::EMPTY.parts(&before),
        Fingerprint::EMPTY.parts(&swapped)
    );
    // Sizes alone (the earlier fingerprint) could not tell them apart.
    assert_eq!(before[0], swapped[0]);
    let _ = (Before { a: 0, b: 0, c: 0 }, Swapped { a: 0, b: 0, c: 0 });
}

abi_enum! {
    /// Two values.
    pub struct Numbered(u8), sparse, unknown "unknown" {
        /// One.
        ONE = 1 => "one",
        /// Two.
        TWO = 2 => "two",
    }
}

abi_enum! {
    /// `Numbered` with `TWO` renumbered.
    pub struct Renumbered(u8), sparse, unknown "unknown" {
        /// One.
        ONE = 1 => "one",
        /// Two, renumbered.
        TWO = 3 => "two",
    }
}

#[test]
fn renumbering_a_constant_changes_the_fingerprint() {
    assert_eq!(Numbered::COUNT, Renumbered::COUNT);
    assert_eq!(Numbered::TWO.name(), Renumbered::TWO.name());
    assert_ne!(
        Numbered::fingerprint(Fingerprint::EMPTY),
        Renumbered::fingerprint(Fingerprint::EMPTY)
    );
}

#[test]
fn changing_any_part_of_the_descriptor_changes_the_fingerprint() {
    let parts = layout_of!(Event {
        ts_ns,
        ifindex,
        direction,
        family,
        verdict,
        hook,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        _pad
    });
    let original = Fingerprint::EMPTY.parts(&parts);
    for i in 0..parts.len() {
        let mut changed = parts;
        if let Some(part) = changed.get_mut(i) {
            *part += 1;
        }
        assert_ne!(Fingerprint::EMPTY.parts(&changed), original, "part {i}");
    }
}

#[test]
fn enumerations_list_count_and_name_their_values() {
    assert_eq!(Verdict::COUNT, 7);
    assert_eq!(Verdict::ALL.last(), Some(&Verdict::WOULD_RATE_LIMIT));
    assert_eq!(ParseOutcome::COUNT, 10);
    assert_eq!(EventStat::COUNT, 3);
    assert_eq!(RejectFallback::COUNT, 5);
    assert_eq!(COUNTER_SLOTS, 28);
    assert_eq!(Verdict(200).name(), "unknown");
    assert_eq!(RejectFallback::UNSUPPORTED.name(), "unsupported_header");
    // Unknown values are labelled as the dataplane treats them.
    assert_eq!(Mode(9).name(), "enforce");
    assert_eq!(BlockAction(9).name(), "drop");
    assert_eq!(FragmentPolicy(9).name(), "pass");
    assert_eq!(UnreadableTcp(9).name(), "port25");
    assert_eq!(Origin::default().name(), "unknown");
    assert_eq!(Origin::ALL, [Origin::POLICY, Origin::RUNTIME]);
    for (i, outcome) in ParseOutcome::ALL.iter().enumerate() {
        assert_eq!(outcome.index() as usize, i);
    }
}

#[test]
fn the_ring_buffer_holds_4096_events() {
    assert_eq!(EVENTS_RING_EVENTS, 4096);
}
