//! Feeds arbitrary bytes, in arbitrary chunk sizes, to both decoder roles:
//! decoding must never panic, and every decoded frame must re-encode to a
//! frame that decodes to itself.
#![no_main]

use bytes::BytesMut;
use derpd::proto::{Frame, FrameDecoder, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    for role in [Role::Server, Role::Client] {
        let mut dec = FrameDecoder::new(role);
        dec.allow_mesh_frames(split & 1 == 0);
        let mut buf = BytesMut::new();
        'feed: for piece in rest.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(Frame::Ignored { .. })) => {}
                    Ok(Some(f)) => {
                        let mut again = FrameDecoder::new(role);
                        let mut b = BytesMut::from(&f.to_bytes()[..]);
                        assert_eq!(again.decode(&mut b).unwrap(), Some(f));
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
});
