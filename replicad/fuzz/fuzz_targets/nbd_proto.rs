//! Feeds arbitrary bytes to every NBD parser. No parser may panic, and whatever a parser
//! accepts must encode back to exactly the bytes it came from.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replicad::nbd::proto::{
    self, ClientFlags, Greeting, Info, InfoRequest, OptionHeader, OptionReplyHeader,
    RequestHeader, SimpleReplyHeader,
};

/// Asserts that `encode` reproduces `input`.
fn assert_round_trip(input: &[u8], encode: impl FnOnce(&mut Vec<u8>)) {
    let mut output = Vec::with_capacity(input.len());
    encode(&mut output);
    assert_eq!(output, input, "parsed value does not encode back to its input");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(greeting) = Greeting::parse(data) {
        assert_round_trip(data, |out| greeting.encode(out));
    }
    if let Ok(flags) = ClientFlags::parse(data) {
        assert_round_trip(data, |out| flags.encode(out));
    }
    if let Ok(header) = OptionHeader::parse(data, u32::MAX) {
        assert_round_trip(data, |out| header.encode(out));
        assert!(
            OptionHeader::parse(data, proto::MAX_OPTION_DATA_BYTES).is_ok()
                == (header.length <= proto::MAX_OPTION_DATA_BYTES)
        );
    }
    if let Ok(header) = OptionReplyHeader::parse(data) {
        assert_round_trip(data, |out| header.encode(out));
    }
    if let Ok(request) = InfoRequest::parse(data) {
        assert_round_trip(data, |out| request.encode(out));
    }
    if let Ok(info) = Info::parse(data) {
        assert_round_trip(data, |out| info.encode(out));
    }
    if let Ok(header) = RequestHeader::parse(data) {
        assert_round_trip(data, |out| header.encode(out));
    }
    if let Ok(header) = SimpleReplyHeader::parse(data) {
        assert_round_trip(data, |out| header.encode(out));
    }
    let _ = proto::parse_rep_server(data);
    let _ = proto::parse_string(data);
});
