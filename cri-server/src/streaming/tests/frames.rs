//! Byte layouts of SPDY/3 frames and header blocks, checked against the spec.

use bytes::{Bytes, BytesMut};
use flate2::{Decompress, FlushDecompress};

use super::super::spdy::{self, Frame, HeaderCompressor, HeaderDecompressor};

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + byte as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn wire(frame: &Frame, z: &mut HeaderCompressor) -> Vec<u8> {
    let mut out = BytesMut::new();
    spdy::encode(frame, z, &mut out).unwrap();
    out.to_vec()
}

#[test]
fn dictionary_is_the_spdy3_one() {
    let d = spdy::dictionary();
    assert_eq!(d.len(), 1423);
    // The DICTID every SPDY/3 header block's zlib header names.
    assert_eq!(adler32(d), 0xe3c6_a7c2);
}

#[test]
fn control_and_data_frame_layouts() {
    let mut z = HeaderCompressor::default();
    assert_eq!(
        wire(&Frame::Ping { id: 0x0102_0304 }, &mut z),
        [0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 1, 2, 3, 4]
    );
    let goaway = Frame::GoAway {
        last_good_stream_id: 7,
        status: 2,
    };
    assert_eq!(
        wire(&goaway, &mut z),
        [0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0, 2]
    );
    let rst = Frame::RstStream {
        stream_id: 5,
        status: spdy::RST_CANCEL,
    };
    assert_eq!(
        wire(&rst, &mut z),
        [0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 5, 0, 0, 0, 5]
    );
    let wu = Frame::WindowUpdate {
        stream_id: 3,
        delta: 0x10000,
    };
    assert_eq!(
        wire(&wu, &mut z),
        [0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 3, 0, 1, 0, 0]
    );
    let settings = Frame::Settings {
        flags: 0,
        entries: vec![(0, 7, 65536)],
    };
    assert_eq!(
        wire(&settings, &mut z),
        [0x80, 3, 0, 4, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 7, 0, 1, 0, 0]
    );
    let data = Frame::Data {
        stream_id: 5,
        flags: spdy::FLAG_FIN,
        data: Bytes::from_static(b"abc"),
    };
    assert_eq!(
        wire(&data, &mut z),
        [0, 0, 0, 5, 0x01, 0, 0, 3, b'a', b'b', b'c']
    );
}

#[test]
fn syn_stream_header_block_inflates_with_the_dictionary() {
    let mut z = HeaderCompressor::default();
    let frame = Frame::SynStream {
        stream_id: 1,
        associated_to: 0,
        priority: 0,
        flags: spdy::FLAG_FIN,
        headers: vec![("streamType".into(), "error".into())],
    };
    let bytes = wire(&frame, &mut z);
    assert_eq!(&bytes[..4], [0x80, 0x03, 0x00, 0x01]);
    assert_eq!(bytes[4], spdy::FLAG_FIN);
    let len = u32::from_be_bytes([0, bytes[5], bytes[6], bytes[7]]) as usize;
    assert_eq!(len, bytes.len() - 8);
    assert_eq!(&bytes[8..16], [0, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(&bytes[16..18], [0, 0], "priority 0, slot 0");
    let block = &bytes[18..];
    // zlib header with FDICT set, naming the SPDY/3 dictionary.
    assert_eq!(block[0] & 0x0f, 8, "deflate");
    assert_ne!(block[1] & 0x20, 0, "FDICT");
    assert_eq!(&block[2..6], [0xe3, 0xc6, 0xa7, 0xc2]);
    // An independent inflater primed with the dictionary gets the spec's raw layout back.
    let mut inflater = Decompress::new(true);
    let mut out = Vec::with_capacity(256);
    let e = inflater
        .decompress_vec(block, &mut out, FlushDecompress::Sync)
        .unwrap_err();
    assert_eq!(e.needs_dictionary(), Some(0xe3c6_a7c2));
    inflater.set_dictionary(spdy::dictionary()).unwrap();
    let used = inflater.total_in() as usize;
    inflater
        .decompress_vec(&block[used..], &mut out, FlushDecompress::Sync)
        .unwrap();
    let mut expected = vec![0, 0, 0, 1, 0, 0, 0, 10];
    expected.extend_from_slice(b"streamtype");
    expected.extend_from_slice(&[0, 0, 0, 5]);
    expected.extend_from_slice(b"error");
    assert_eq!(out, expected, "names are lowercased, lengths are 32-bit");
    // Sync flush: the block ends with the empty stored block marker.
    assert_eq!(&block[block.len() - 4..], [0, 0, 0xff, 0xff]);
}

#[tokio::test]
async fn header_contexts_are_shared_per_connection() {
    let mut z = HeaderCompressor::default();
    let headers = |t: &str| {
        vec![
            ("streamtype".to_string(), t.to_string()),
            ("port".into(), "80".into()),
        ]
    };
    let mut wire_bytes = Vec::new();
    for (id, t) in [(1, "error"), (3, "data")] {
        wire_bytes.extend(wire(
            &Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers(t),
            },
            &mut z,
        ));
    }
    let mut reader = &wire_bytes[..];
    let mut unz = HeaderDecompressor::default();
    for (id, t) in [(1, "error"), (3, "data")] {
        match spdy::read_frame(&mut reader, &mut unz)
            .await
            .unwrap()
            .unwrap()
        {
            Frame::SynStream {
                stream_id,
                headers: h,
                ..
            } => {
                assert_eq!(stream_id, id);
                assert_eq!(h, headers(t));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(spdy::read_frame(&mut reader, &mut unz)
        .await
        .unwrap()
        .is_none());
    // The second block alone (a fresh context) cannot be decoded: it has no zlib header.
    let first_len =
        8 + u32::from_be_bytes([0, wire_bytes[5], wire_bytes[6], wire_bytes[7]]) as usize;
    let mut second = &wire_bytes[first_len..];
    let mut fresh = HeaderDecompressor::default();
    assert!(spdy::read_frame(&mut second, &mut fresh).await.is_err());
}

#[tokio::test]
async fn unknown_control_frames_and_bad_versions() {
    let mut unz = HeaderDecompressor::default();
    let mut unknown: &[u8] = &[0x80, 3, 0, 0x0a, 0, 0, 0, 2, 9, 9];
    assert_eq!(
        spdy::read_frame(&mut unknown, &mut unz).await.unwrap(),
        Some(Frame::Unknown { kind: 10 })
    );
    let mut v2: &[u8] = &[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1];
    assert!(spdy::read_frame(&mut v2, &mut unz).await.is_err());
}
