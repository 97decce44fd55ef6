//! The socket protocol's decoder (`usm_proto::wire::decode`) on any bytes a tagged
//! program could send: never a panic; whatever it accepts passes `validate`, encodes
//! again, and decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usm_proto::wire;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = wire::decode(data) else {
        return;
    };
    msg.validate()
        .unwrap_or_else(|e| panic!("decoded {msg:?} but it does not validate: {e}"));
    let bytes = wire::encode_to_vec(&msg)
        .unwrap_or_else(|e| panic!("decoded {msg:?} but it does not encode: {e}"));
    let again = wire::decode(&bytes).expect("an encoded message decodes");
    assert_eq!(again, msg);
});
