//! The decoder never panics and refuses what it does not understand.

use proptest::prelude::*;
use usm_proto::wire::{self, MAX_MESSAGE_LEN, MAX_TEXT_LEN};
use usm_proto::{Message, PROTOCOL_VERSION, RangeKind, RefusalReason};

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9 ._=-]{{1,{max}}}")).unwrap()
}

fn message() -> impl Strategy<Value = Message> {
    let page = 4096u64;
    prop_oneof![
        (1u32.., text(255)).prop_map(|(pid, name)| Message::Hello {
            version: PROTOCOL_VERSION,
            pid,
            name
        }),
        (any::<u64>(), text(255)).prop_map(|(features, policy)| Message::Ack { features, policy }),
        text(MAX_TEXT_LEN).prop_map(|text| Message::Refused {
            reason: RefusalReason::Busy,
            text
        }),
        (0u64..1 << 35, 1u64..1 << 20, any::<bool>()).prop_map(move |(s, l, heap)| {
            Message::RegisterRange {
                start: s * page,
                len: l * page,
                kind: if heap {
                    RangeKind::Heap
                } else {
                    RangeKind::Mmap
                },
            }
        }),
        (0u64..1 << 35, 1u64..1 << 20).prop_map(move |(s, l)| Message::UnregisterRange {
            start: s * page,
            len: l * page
        }),
        (0u64..1 << 47, 1u64..1 << 30, text(MAX_TEXT_LEN))
            .prop_map(|(addr, len, text)| Message::Hint { addr, len, text }),
        any::<u64>().prop_map(|swapped_pages| Message::SwapState { swapped_pages }),
        Just(Message::CoverageRequest),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Message::Coverage {
            managed_anon_bytes: a.min(b),
            anon_bytes: a.max(b)
        }),
        Just(Message::Bye),
        (1u32..=usm_proto::agent::MAX_STAGING_PAGES, 0u32..=16).prop_map(|(staging_pages, e)| {
            Message::StartAgent {
                staging_pages,
                ring_entries: 1 << e,
            }
        }),
        (0u64..1 << 30, 1u32..=1024, 0u32..=16).prop_map(|(s, staging_pages, e)| {
            Message::AgentReady {
                staging_start: s * 4096,
                staging_pages,
                ring_entries: 1 << e,
            }
        }),
        text(MAX_TEXT_LEN).prop_map(|text| Message::AgentUnavailable { text }),
        (any::<u64>(), text(255))
            .prop_map(|(features, policy)| Message::Adopted { features, policy }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..MAX_MESSAGE_LEN + 8)) {
        let _ = wire::decode(&bytes);
    }

    #[test]
    fn random_payload_behind_a_valid_header_never_panics(
        kind in 0u16..15,
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"USMP");
        bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&payload);
        if let Ok(msg) = wire::decode(&bytes) {
            // Whatever is accepted re-encodes to the very same bytes: no lenient parsing.
            prop_assert_eq!(wire::encode_to_vec(&msg).unwrap(), bytes);
        }
    }

    #[test]
    fn valid_messages_round_trip(msg in message()) {
        let bytes = wire::encode_to_vec(&msg).unwrap();
        prop_assert!(bytes.len() <= MAX_MESSAGE_LEN);
        prop_assert_eq!(wire::decode(&bytes).unwrap(), msg);
    }

    #[test]
    fn mutated_messages_are_refused_or_canonical(msg in message(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = wire::encode_to_vec(&msg).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        // A refused mutation is the expected outcome; an accepted one must be canonical.
        if let Ok(decoded) = wire::decode(&bytes) {
            prop_assert_eq!(wire::encode_to_vec(&decoded).unwrap(), bytes);
        }
    }
}
