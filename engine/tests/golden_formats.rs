//! Golden fixtures of every on-disk and wire structure (`fixtures/formats/`).
//!
//! Each check builds one structure from fixed values (the constants below, also listed
//! in `fixtures/README.md`), encodes it with the engine, and then:
//!
//! 1. compares the encoding with the committed fixture byte for byte;
//! 2. walks the fixture with a byte table written here from `docs/FORMAT.md` (offset,
//!    size, field, expected value), which must describe every byte exactly once;
//! 3. decodes the fixture with the engine's own decoder and compares the result with
//!    the values it was built from.
//!
//! So any change to a format fails here and has to be made on purpose: change the
//! format, `docs/FORMAT.md`, the byte tables below, then regenerate the fixtures with
//! `REPLICAD_BLESS_FIXTURES=1 cargo test -p replicad-engine --test golden_formats`.
//! Nothing here depends on the clock or a random number generator.

use std::path::PathBuf;

use bytes::Bytes;
use engine::checksum::{self, block_crc, zero_block_crc};
use engine::gen::{GenerationIds, JUST_CREATED};
use engine::layout::{meta_bytes_for, Geometry, MIN_JOURNAL_BYTES};
use engine::record::{self, Record, RecordHeader};
use engine::repl::{DiskState, Role};
use engine::superblock::{self, StoredDiskState, Superblock};
use engine::wire::{self, BlockData, Channel, Frame, Hello, PeerState, RecordFrame};

// ----- the fixed values every fixture is built from -----

/// 16 bytes, readable in a hex dump.
const RESOURCE_UUID: [u8; 16] = *b"replicad-golden!";
/// The store the superblock describes: 64 MiB with internal metadata and the smallest
/// journal (256 KiB).
const STORE_BYTES: u64 = 64 << 20;
const CURRENT: u64 = 0x0123_4567_89AB_CDEF;
const HISTORY_0: u64 = 0xFEDC_BA98_7654_3210;
/// Fills block 0 of the data record and of RESYNC_DATA.
const BLOCK_0_BYTE: u8 = 0x11;
/// Fills block 1.
const BLOCK_1_BYTE: u8 = 0x22;
/// CRC32 (IEEE) of 4096 bytes of 0x11, 0x22 and 0x00.
const BLOCK_0_CRC: u32 = 0xE67E_931F;
const BLOCK_1_CRC: u32 = 0x85D9_260D;
const ZERO_BLOCK_CRC: u32 = 0xC71C_0011;
/// Sequence numbers: the superblock's checkpoint, then the records after it.
const CHECKPOINT_SEQ: u64 = 4138;
const WRITE_SEQ: u64 = 4139;
const TRIM_SEQ: u64 = 4140;
/// Block 10, where the data record and RESYNC_DATA go.
const WRITE_OFFSET_BYTES: u64 = 10 * 4096;
const TRIM_OFFSET_BYTES: u64 = 1 << 20;
const TRIM_LENGTH_BYTES: u64 = 1 << 20;
const PAD_TOTAL_BYTES: u64 = 256;

/// The geometry of [`STORE_BYTES`], spelled out (the layout formulas are part of the format).
const GEOMETRY_INTERNAL_64M: Geometry = Geometry {
    data_bytes: 66_768_896,
    journal_offset: 66_768_896,
    journal_bytes: 262_144,
    checksum_offset: 67_031_040,
    checksum_bytes: 65_536,
    bitmap_offset: 67_096_576,
    bitmap_bytes: 4096,
    superblock_offsets: [67_100_672, 67_104_768],
    meta_offset: 66_768_896,
};

fn two_blocks() -> Bytes {
    let mut data = vec![BLOCK_0_BYTE; 4096];
    data.extend_from_slice(&[BLOCK_1_BYTE; 4096]);
    Bytes::from(data)
}

fn generations() -> GenerationIds {
    GenerationIds {
        current: CURRENT,
        bitmap: JUST_CREATED,
        history: [HISTORY_0, 0],
    }
}

fn sample_superblock() -> Superblock {
    Superblock {
        sequence: 7,
        resource_uuid: RESOURCE_UUID,
        node_id: 1,
        node_name: "beta".into(),
        geometry: GEOMETRY_INTERNAL_64M,
        generations: generations(),
        checkpoint_seq: CHECKPOINT_SEQ,
        checkpoint_pos: 8192,
        flags: superblock::flags::CLEAN | superblock::flags::PRIMARY,
        disk_state: StoredDiskState::UpToDate,
        created_unix_secs: 1_700_000_000,
    }
}

fn write_record() -> Record {
    Record::write(WRITE_SEQ, WRITE_OFFSET_BYTES, two_blocks(), true)
}

fn trim_record() -> Record {
    Record::zeroes(
        TRIM_SEQ,
        TRIM_OFFSET_BYTES,
        TRIM_LENGTH_BYTES,
        record::flags::TRIM,
        false,
    )
}

fn record_bytes(record: &Record) -> Vec<u8> {
    [record.encoded_header.as_ref(), record.data.as_ref()].concat()
}

/// A PAD as it lies in the ring: its 64-byte header, then zeroes up to its length.
fn pad_bytes() -> Vec<u8> {
    let mut bytes = RecordHeader::pad(TRIM_SEQ, PAD_TOTAL_BYTES)
        .encode()
        .to_vec();
    bytes.resize(PAD_TOTAL_BYTES as usize, 0);
    bytes
}

// ----- helpers -----

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/formats")
        .join(name)
}

fn blessing() -> bool {
    std::env::var_os("REPLICAD_BLESS_FIXTURES").is_some_and(|value| value == "1")
}

/// Returns the committed fixture `name` after checking that `encoded` equals it byte
/// for byte (with `REPLICAD_BLESS_FIXTURES=1`, writes `encoded` as the fixture first).
fn golden(name: &str, encoded: &[u8]) -> Vec<u8> {
    let path = fixture_path(name);
    if blessing() {
        let dir = path.parent().expect("fixture path has a parent");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        std::fs::write(&path, encoded).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let fixture = std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error} (generate it with REPLICAD_BLESS_FIXTURES=1)",
            path.display()
        )
    });
    if let Some(offset) = (0..fixture.len().min(encoded.len())).find(|&i| fixture[i] != encoded[i])
    {
        panic!(
            "{name}: the encoding changed at byte {offset} (fixture {:#04x}, now {:#04x}). \
             If the format change is deliberate, update docs/FORMAT.md and this test's byte \
             tables, then regenerate with REPLICAD_BLESS_FIXTURES=1",
            fixture[offset], encoded[offset]
        );
    }
    assert_eq!(
        fixture.len(),
        encoded.len(),
        "{name}: the encoding changed length (fixture {} bytes, now {})",
        fixture.len(),
        encoded.len()
    );
    fixture
}

fn crc(bytes: &[u8]) -> u64 {
    u64::from(crc32fast::hash(bytes))
}

/// Walks a buffer with a byte table. Every byte must be described exactly once.
struct ByteTable<'a> {
    name: &'static str,
    bytes: &'a [u8],
    covered: Vec<bool>,
}

impl<'a> ByteTable<'a> {
    fn new(name: &'static str, bytes: &'a [u8]) -> ByteTable<'a> {
        ByteTable {
            name,
            bytes,
            covered: vec![false; bytes.len()],
        }
    }

    fn take(&mut self, offset: usize, size: usize, field: &str) -> &'a [u8] {
        let end = offset + size;
        assert!(
            end <= self.bytes.len(),
            "{}: {field} at {offset}+{size} lies past the end ({} bytes)",
            self.name,
            self.bytes.len()
        );
        for (index, covered) in self.covered[offset..end].iter_mut().enumerate() {
            assert!(
                !*covered,
                "{}: byte {} described twice ({field})",
                self.name,
                offset + index
            );
            *covered = true;
        }
        &self.bytes[offset..end]
    }

    /// A little-endian unsigned integer of `size` bytes (1, 2, 4 or 8).
    fn uint(&mut self, offset: usize, size: usize, field: &str, expected: u64) {
        let raw = self.take(offset, size, field);
        let mut word = [0u8; 8];
        word[..size].copy_from_slice(raw);
        let value = u64::from_le_bytes(word);
        assert_eq!(
            value, expected,
            "{}: {field} at offset {offset} is {value:#x}, expected {expected:#x}",
            self.name
        );
    }

    fn bytes(&mut self, offset: usize, field: &str, expected: &[u8]) {
        let raw = self.take(offset, expected.len(), field);
        assert!(raw == expected, "{}: {field} at offset {offset}", self.name);
    }

    fn zeros(&mut self, offset: usize, size: usize, field: &str) {
        let raw = self.take(offset, size, field);
        assert!(
            raw.iter().all(|&b| b == 0),
            "{}: {field} at {offset}+{size} is not zero",
            self.name
        );
    }

    fn finish(self) {
        if let Some(first) = self.covered.iter().position(|covered| !covered) {
            panic!("{}: byte {first} is not described by any field", self.name);
        }
    }
}

/// The fixed 64 bytes every journal record header starts with.
struct FixedRecordHeader {
    seq: u64,
    offset_bytes: u64,
    length_bytes: u64,
    flags: u64,
    block_count: u64,
    header_bytes: usize,
}

/// Checks bytes 0..64 of a record; the header CRC covers bytes 8..`header_bytes`.
fn record_fixed_header(table: &mut ByteTable<'_>, record: &[u8], fixed: FixedRecordHeader) {
    table.bytes(0, "magic", b"RJR1");
    table.uint(4, 4, "header CRC", crc(&record[8..fixed.header_bytes]));
    table.uint(8, 8, "seq", fixed.seq);
    table.uint(16, 8, "offset bytes", fixed.offset_bytes);
    table.uint(24, 8, "length bytes", fixed.length_bytes);
    table.uint(32, 2, "flags", fixed.flags);
    table.zeros(34, 2, "reserved");
    table.uint(36, 4, "block count", fixed.block_count);
    table.uint(40, 4, "header bytes", fixed.header_bytes as u64);
    table.zeros(44, 20, "reserved");
}

/// Checks the 24-byte frame header and returns the body.
fn frame_header<'a>(
    name: &'static str,
    frame: &'a [u8],
    frame_type: u64,
    covered_body_bytes: usize,
) -> &'a [u8] {
    let body = &frame[24..];
    let mut table = ByteTable::new(name, &frame[..24]);
    table.bytes(0, "magic", b"RPLW");
    table.uint(4, 2, "frame type", frame_type);
    table.zeros(6, 2, "reserved");
    table.uint(8, 4, "body length", body.len() as u64);
    table.uint(12, 4, "body CRC", crc(&body[..covered_body_bytes]));
    table.zeros(16, 4, "reserved");
    table.uint(20, 4, "header CRC", crc(&frame[..20]));
    table.finish();
    body
}

/// Checks a decoded frame against the frame it was built from.
fn decodes_to(name: &str, fixture: &[u8], expected: &Frame) {
    let (frame, used) = wire::decode(fixture).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(used, fixture.len(), "{name}: decoded length");
    assert_eq!(&frame, expected, "{name}: decoded frame");
}

// ----- the checks -----

#[test]
fn crc32_is_the_ieee_polynomial() {
    // The standard check value of CRC-32 (ISO-HDLC, as zlib and crc32fast compute it).
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    assert_eq!(block_crc(&[BLOCK_0_BYTE; 4096]), BLOCK_0_CRC);
    assert_eq!(block_crc(&[BLOCK_1_BYTE; 4096]), BLOCK_1_CRC);
    assert_eq!(zero_block_crc(), ZERO_BLOCK_CRC);
}

#[test]
fn layout_formulas() {
    assert_eq!(
        Geometry::internal(STORE_BYTES, MIN_JOURNAL_BYTES).unwrap(),
        GEOMETRY_INTERNAL_64M
    );
    // External metadata: the whole data store is exported; the areas end at the end
    // of the metadata store, here exactly as large as they need.
    let data_blocks = STORE_BYTES / 4096;
    let meta_store_bytes = meta_bytes_for(data_blocks, MIN_JOURNAL_BYTES);
    assert_eq!(meta_store_bytes, 262_144 + 65_536 + 4096 + 8192);
    assert_eq!(
        Geometry::external(STORE_BYTES, meta_store_bytes, MIN_JOURNAL_BYTES).unwrap(),
        Geometry {
            data_bytes: STORE_BYTES,
            journal_offset: 0,
            journal_bytes: 262_144,
            checksum_offset: 262_144,
            checksum_bytes: 65_536,
            bitmap_offset: 327_680,
            bitmap_bytes: 4096,
            superblock_offsets: [331_776, 335_872],
            meta_offset: 0,
        }
    );
}

#[test]
fn superblock_copy() {
    let superblock = sample_superblock();
    let fixture = golden("superblock.bin", &superblock.encode());
    let mut table = ByteTable::new("superblock.bin", &fixture);
    table.bytes(0, "magic", b"RPLCD-SB");
    table.uint(8, 4, "format version", 2);
    table.uint(12, 4, "header bytes", 256);
    table.uint(16, 8, "sequence", 7);
    table.bytes(24, "resource UUID", &RESOURCE_UUID);
    table.uint(40, 4, "node id", 1);
    table.uint(44, 4, "block bytes", 4096);
    table.uint(48, 8, "data bytes", 66_768_896);
    table.uint(56, 8, "journal offset", 66_768_896);
    table.uint(64, 8, "journal bytes", 262_144);
    table.uint(72, 8, "checksum offset", 67_031_040);
    table.uint(80, 8, "checksum bytes", 65_536);
    table.uint(88, 8, "bitmap offset", 67_096_576);
    table.uint(96, 8, "bitmap bytes", 4096);
    table.uint(104, 8, "current generation", CURRENT);
    table.uint(112, 8, "bitmap generation", JUST_CREATED);
    table.uint(120, 8, "history 0", HISTORY_0);
    table.uint(128, 8, "history 1", 0);
    table.uint(136, 8, "checkpoint seq", CHECKPOINT_SEQ);
    table.uint(144, 8, "checkpoint pos", 8192);
    table.uint(152, 8, "flags (CLEAN | PRIMARY)", 3);
    table.uint(160, 1, "disk state (UpToDate)", 1);
    table.zeros(161, 7, "reserved");
    table.uint(168, 8, "created (unix seconds)", 1_700_000_000);
    table.bytes(176, "node name", b"beta");
    table.zeros(180, 60, "node name NUL padding");
    table.zeros(240, 12, "reserved");
    table.uint(252, 4, "CRC of bytes 0..252", crc(&fixture[..252]));
    table.zeros(256, 4096 - 256, "rest of the copy");
    table.finish();

    let decoded = Superblock::decode(&fixture).expect("fixture decodes");
    let mut expected = sample_superblock();
    // Placement is not stored: `open` recomputes it from the store's size.
    expected.geometry.superblock_offsets = [0, 0];
    expected.geometry.meta_offset = 0;
    assert_eq!(decoded, expected);
    // Copies alternate by sequence parity: odd sequences live in copy A.
    assert_eq!(superblock.next_copy(), 0);
}

/// A checksum-table page for blocks 0 (0x11…), 1 (0x22…) and 2 (zeroes) of a volume
/// of three blocks: each entry is the block's CRC32 XOR the zero block's, so zero
/// blocks, and the entries past the volume's end, are zero bytes.
#[test]
fn checksum_table_page() {
    let crcs = [BLOCK_0_CRC, BLOCK_1_CRC, ZERO_BLOCK_CRC];
    let fixture = golden("checksum-page.bin", &checksum::encode_page(&crcs));
    let mut table = ByteTable::new("checksum-page.bin", &fixture);
    table.uint(
        0,
        4,
        "block 0: CRC ^ zero-block CRC",
        u64::from(BLOCK_0_CRC ^ ZERO_BLOCK_CRC),
    );
    table.uint(
        4,
        4,
        "block 1: CRC ^ zero-block CRC",
        u64::from(BLOCK_1_CRC ^ ZERO_BLOCK_CRC),
    );
    table.uint(8, 4, "block 2 (a zero block)", 0);
    table.zeros(12, 4096 - 12, "entries past the volume's end");
    table.finish();

    let decoded = checksum::decode_page(&fixture);
    assert_eq!(&decoded[..3], &crcs);
    assert!(decoded[3..].iter().all(|&crc| crc == zero_block_crc()));
    // A page never written (zero bytes) describes zero blocks.
    assert!(checksum::decode_page(&[0u8; 4096])
        .iter()
        .all(|&crc| crc == ZERO_BLOCK_CRC));
}

#[test]
fn data_record_with_fua() {
    let record = write_record();
    let fixture = golden("record-write-fua.bin", &record_bytes(&record));
    let mut table = ByteTable::new("record-write-fua.bin", &fixture);
    let fixed = FixedRecordHeader {
        seq: WRITE_SEQ,
        offset_bytes: WRITE_OFFSET_BYTES,
        length_bytes: 8192,
        flags: 1, // FUA
        block_count: 2,
        header_bytes: 128,
    };
    record_fixed_header(&mut table, &fixture, fixed);
    table.uint(64, 4, "CRC of block 0", u64::from(BLOCK_0_CRC));
    table.uint(68, 4, "CRC of block 1", u64::from(BLOCK_1_CRC));
    table.zeros(72, 56, "header padding to 64 bytes");
    table.bytes(128, "block 0", &[BLOCK_0_BYTE; 4096]);
    table.bytes(128 + 4096, "block 1", &[BLOCK_1_BYTE; 4096]);
    table.finish();

    let parsed = Record::parse(Bytes::from(fixture)).expect("fixture parses");
    assert_eq!(parsed.header, record.header);
    assert_eq!(parsed.data, record.data);
    assert!(parsed.is_fua());
    assert_eq!(parsed.total_bytes(), 8320);
}

#[test]
fn trim_record_without_data() {
    let record = trim_record();
    let fixture = golden("record-trim.bin", &record_bytes(&record));
    let mut table = ByteTable::new("record-trim.bin", &fixture);
    let fixed = FixedRecordHeader {
        seq: TRIM_SEQ,
        offset_bytes: TRIM_OFFSET_BYTES,
        length_bytes: TRIM_LENGTH_BYTES,
        flags: 2,       // TRIM
        block_count: 0, // no data, no CRCs
        header_bytes: 64,
    };
    record_fixed_header(&mut table, &fixture, fixed);
    table.finish();

    let parsed = Record::parse(Bytes::from(fixture)).expect("fixture parses");
    assert_eq!(parsed.header, record.header);
    assert!(parsed.data.is_empty());
    assert_eq!(parsed.header.block_count(), 256);
}

#[test]
fn pad_record() {
    let fixture = golden("record-pad.bin", &pad_bytes());
    let mut table = ByteTable::new("record-pad.bin", &fixture);
    let fixed = FixedRecordHeader {
        seq: TRIM_SEQ, // the record before the pad
        offset_bytes: 0,
        length_bytes: PAD_TOTAL_BYTES, // the whole pad, header included
        flags: 8,                      // PAD
        block_count: 0,
        header_bytes: 64,
    };
    record_fixed_header(&mut table, &fixture, fixed);
    table.zeros(64, PAD_TOTAL_BYTES as usize - 64, "filler");
    table.finish();

    let header = RecordHeader::decode(&fixture).expect("fixture decodes");
    assert_eq!(header, RecordHeader::pad(TRIM_SEQ, PAD_TOTAL_BYTES));
    assert!(header.is_pad());
    assert_eq!(header.total_bytes(), PAD_TOTAL_BYTES);
    // A PAD is journal-only: the replication stream refuses it.
    assert!(Record::parse(Bytes::from(fixture)).is_err());
}

/// The dialer's and the acceptor's HELLO challenges (32 readable bytes each).
const DIALER_CHALLENGE: [u8; 32] = *b"golden challenge of the dialer.!";
const ACCEPTOR_CHALLENGE: [u8; 32] = *b"golden challenge, the acceptor.!";
/// The shared secret the AUTH fixture's proof is computed with.
const SECRET: &[u8] = b"golden secret";

#[test]
fn hello_frame() {
    let frame = Frame::Hello(Hello {
        protocol_version: 5,
        channel: Channel::Data,
        resource_uuid: RESOURCE_UUID,
        node_id: 0,
        resource: "r0".into(),
        node: "alpha".into(),
        authenticates: true,
        challenge: DIALER_CHALLENGE,
        proof: [0; 32],
    });
    let fixture = golden("frame-hello.bin", &frame.encode_to_vec());
    let body = frame_header("frame-hello.bin", &fixture, 1, fixture.len() - 24);
    let mut table = ByteTable::new("frame-hello.bin body", body);
    table.uint(0, 4, "protocol version", 5);
    table.uint(4, 1, "channel (data)", 1);
    table.bytes(5, "resource UUID", &RESOURCE_UUID);
    table.uint(21, 4, "node id", 0);
    table.uint(25, 2, "resource name length", 2);
    table.bytes(27, "resource name", b"r0");
    table.uint(29, 2, "node name length", 5);
    table.bytes(31, "node name", b"alpha");
    table.uint(36, 1, "authenticates", 1);
    table.bytes(37, "challenge", &DIALER_CHALLENGE);
    table.zeros(69, 32, "proof (none in the dialer's HELLO)");
    table.finish();
    decodes_to("frame-hello.bin", &fixture, &frame);
}

/// The dialer's AUTH for the HELLOs above: also pins the authenticated transcript
/// (FORMAT.md §9.1), since the proof is computed from it.
#[test]
fn auth_frame() {
    use engine::auth::{prove, Prover, Secret, Transcript};
    let secret = Secret::new(SECRET.to_vec()).expect("secret");
    let transcript = Transcript {
        resource: "r0",
        resource_uuid: RESOURCE_UUID,
        channel: Channel::Data,
        dialer_node_id: 0,
        acceptor_node_id: 1,
        dialer_challenge: DIALER_CHALLENGE,
        acceptor_challenge: ACCEPTOR_CHALLENGE,
    };
    let proof = prove(&secret, Prover::Dialer, &transcript);
    let frame = Frame::Auth(proof);
    let fixture = golden("frame-auth.bin", &frame.encode_to_vec());
    let body = frame_header("frame-auth.bin", &fixture, 26, 32);
    let mut table = ByteTable::new("frame-auth.bin body", body);
    table.bytes(0, "proof: HMAC-SHA256 of the transcript", &proof);
    table.finish();
    decodes_to("frame-auth.bin", &fixture, &frame);
    // The transcript, byte by byte as FORMAT.md lists it: the same HMAC over it.
    use hmac::{Hmac, Mac};
    let mut message = Vec::new();
    message.extend_from_slice(b"replicad peer authentication\0");
    message.extend_from_slice(&6u32.to_le_bytes());
    message.extend_from_slice(&[1, 1]);
    message.extend_from_slice(&RESOURCE_UUID);
    message.extend_from_slice(&2u64.to_le_bytes());
    message.extend_from_slice(b"r0");
    message.extend_from_slice(&0u32.to_le_bytes());
    message.extend_from_slice(&1u32.to_le_bytes());
    message.extend_from_slice(&DIALER_CHALLENGE);
    message.extend_from_slice(&ACCEPTOR_CHALLENGE);
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(SECRET).expect("key");
    mac.update(&message);
    assert_eq!(
        proof,
        <[u8; 32]>::from(mac.finalize().into_bytes()),
        "the transcript differs from FORMAT.md"
    );
}

#[test]
fn state_frame() {
    let frame = Frame::State(PeerState {
        role: Role::Secondary,
        disk: DiskState::Outdated,
        generations: generations(),
        crashed_primary: true,
        discard_my_data: false,
        dirty_blocks: 3,
        next_seq: TRIM_SEQ + 1,
        size_bytes: GEOMETRY_INTERNAL_64M.data_bytes,
    });
    let fixture = golden("frame-state.bin", &frame.encode_to_vec());
    let body = frame_header("frame-state.bin", &fixture, 3, fixture.len() - 24);
    let mut table = ByteTable::new("frame-state.bin body", body);
    table.uint(0, 1, "role (Secondary)", 2);
    table.uint(1, 1, "disk (Outdated)", 3);
    table.uint(2, 1, "flags (crashed primary)", 1);
    table.zeros(3, 1, "reserved");
    table.uint(4, 8, "current generation", CURRENT);
    table.uint(12, 8, "bitmap generation", JUST_CREATED);
    table.uint(20, 8, "history 0", HISTORY_0);
    table.uint(28, 8, "history 1", 0);
    table.uint(36, 8, "dirty blocks", 3);
    table.uint(44, 8, "next seq", TRIM_SEQ + 1);
    table.uint(52, 8, "size bytes", 66_768_896);
    table.finish();
    decodes_to("frame-state.bin", &fixture, &frame);
}

#[test]
fn record_frame() {
    let record = write_record();
    let frame = Frame::Record(RecordFrame(record.clone()));
    let fixture = golden("frame-record.bin", &frame.encode_to_vec());
    // The body CRC covers the record header only; the data is covered by the
    // per-block CRCs inside it.
    let body = frame_header("frame-record.bin", &fixture, 5, 128);
    // The body is the journal record, byte for byte (`record-write-fua.bin`).
    assert!(
        body == record_bytes(&record).as_slice(),
        "the RECORD body differs from the journaled record"
    );
    decodes_to("frame-record.bin", &fixture, &frame);
}

#[test]
fn resync_data_frame() {
    let frame = Frame::ResyncData(BlockData {
        first_block: WRITE_OFFSET_BYTES / 4096,
        blocks: 2,
        crcs: vec![BLOCK_0_CRC, BLOCK_1_CRC],
        data: Some(two_blocks()),
    });
    let fixture = golden("frame-resync-data.bin", &frame.encode_to_vec());
    let body = frame_header("frame-resync-data.bin", &fixture, 10, 24);
    let mut table = ByteTable::new("frame-resync-data.bin body", body);
    table.uint(0, 8, "first block", 10);
    table.uint(8, 4, "blocks", 2);
    table.uint(12, 4, "zero flag", 0);
    table.uint(16, 4, "CRC of block 0", u64::from(BLOCK_0_CRC));
    table.uint(20, 4, "CRC of block 1", u64::from(BLOCK_1_CRC));
    table.bytes(24, "block 0", &[BLOCK_0_BYTE; 4096]);
    table.bytes(24 + 4096, "block 1", &[BLOCK_1_BYTE; 4096]);
    table.finish();
    decodes_to("frame-resync-data.bin", &fixture, &frame);
}

#[test]
fn resync_data_frame_of_zero_blocks() {
    let frame = Frame::ResyncData(BlockData {
        first_block: 12,
        blocks: 3,
        crcs: vec![ZERO_BLOCK_CRC; 3],
        data: None,
    });
    let fixture = golden("frame-resync-zero.bin", &frame.encode_to_vec());
    let body = frame_header("frame-resync-zero.bin", &fixture, 10, fixture.len() - 24);
    let mut table = ByteTable::new("frame-resync-zero.bin body", body);
    table.uint(0, 8, "first block", 12);
    table.uint(8, 4, "blocks", 3);
    table.uint(12, 4, "zero flag", 1);
    for index in 0..3 {
        table.uint(
            16 + 4 * index,
            4,
            "CRC of a zero block",
            u64::from(ZERO_BLOCK_CRC),
        );
    }
    table.finish();
    decodes_to("frame-resync-zero.bin", &fixture, &frame);
}

#[test]
fn bitmap_run_frame() {
    let frame = Frame::BitmapRun {
        first_block: 16_384,
        blocks: 4_026_531_840,
        last: true,
    };
    let fixture = golden("frame-bitmap-run.bin", &frame.encode_to_vec());
    let body = frame_header("frame-bitmap-run.bin", &fixture, 27, fixture.len() - 24);
    let mut table = ByteTable::new("frame-bitmap-run.bin body", body);
    table.uint(0, 8, "first block", 16_384);
    table.uint(8, 8, "blocks", 4_026_531_840);
    table.uint(16, 4, "last", 1);
    table.finish();
    decodes_to("frame-bitmap-run.bin", &fixture, &frame);
}

#[test]
fn snapshot_frame() {
    let frame = Frame::Snapshot {
        name: "nightly".into(),
        point: 812,
    };
    let fixture = golden("frame-snapshot.bin", &frame.encode_to_vec());
    let body = frame_header("frame-snapshot.bin", &fixture, 28, fixture.len() - 24);
    let mut table = ByteTable::new("frame-snapshot.bin body", body);
    table.uint(0, 8, "point (sequence number)", 812);
    table.uint(8, 2, "name length", 7);
    table.bytes(10, "name", b"nightly");
    table.finish();
    decodes_to("frame-snapshot.bin", &fixture, &frame);
}

#[test]
fn snapshot_reply_frame() {
    let frame = Frame::SnapshotReply {
        name: "nightly".into(),
        error: Some("full".into()),
    };
    let fixture = golden("frame-snapshot-reply.bin", &frame.encode_to_vec());
    let body = frame_header("frame-snapshot-reply.bin", &fixture, 29, fixture.len() - 24);
    let mut table = ByteTable::new("frame-snapshot-reply.bin body", body);
    table.uint(0, 1, "taken (1) or not (0)", 0);
    table.uint(1, 2, "name length", 7);
    table.bytes(3, "name", b"nightly");
    table.uint(10, 2, "error length", 4);
    table.bytes(12, "error", b"full");
    table.finish();
    decodes_to("frame-snapshot-reply.bin", &fixture, &frame);
}

#[test]
fn snapshot_cow_entry() {
    let data = [BLOCK_0_BYTE; 4096];
    let entry = engine::snapshot::encode_entry(10, 812, &data);
    let fixture = golden("snapshot-cow-entry.bin", &entry);
    let mut table = ByteTable::new("snapshot-cow-entry.bin", &fixture);
    table.bytes(0, "magic", b"RSNP");
    table.uint(4, 4, "CRC32 of bytes 8..32", crc(&fixture[8..32]));
    table.uint(8, 8, "block", 10);
    table.uint(16, 8, "trigger (sequence number that overwrote it)", 812);
    table.uint(24, 4, "CRC32 of the block", u64::from(BLOCK_0_CRC));
    table.zeros(28, 4, "reserved");
    table.bytes(32, "the block as of the snapshot", &data);
    table.finish();
}
