//! The capture bench's floor object (`capture-floor.o`, never embedded in the
//! agent) has every program and map the bench looks up by the names in
//! `itw_common::floor`, for both architectures, and none of the agent's
//! programs: a rename on either side fails here rather than in a bench run.

use aya_obj::Object;
use itw_common::{floor, programs};

static X86_64: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/x86_64/capture-floor.o"
));
static AARCH64: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/aarch64/capture-floor.o"
));

#[test]
fn the_floor_object_has_the_benchs_programs_and_maps_and_no_agent_program() {
    for (arch, bytes) in [("x86_64", X86_64), ("aarch64", AARCH64)] {
        let obj = Object::parse(bytes).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let mut names: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                floor::CONNECT4_COUNTER,
                floor::CONNECT4_EMPTY,
                floor::CONNECT4_IDENTITY,
                floor::CONNECT4_IDENTITY_TABLE,
                floor::CONNECT4_SECOND_LOOKUP,
                floor::CONNECT4_TABLE,
                floor::CONNECT4_TASK,
                floor::SET_STATE_COUNTER,
                floor::SET_STATE_EMPTY,
            ],
            "{arch}"
        );
        assert!(!names.contains(&programs::CONNECT4), "{arch}");
        for map in [floor::WATCHED, floor::COUNTS, floor::ATTEMPTS, floor::TABLE] {
            assert!(obj.maps.contains_key(map), "{arch}: no map {map}");
        }
    }
}
