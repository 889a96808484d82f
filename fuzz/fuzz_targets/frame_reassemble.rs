//! The frame reassembler: the same bytes, cut at fuzzer-chosen points, must
//! decode to exactly the frames (and the same error, if any) as when they
//! arrive in one piece. Both roles, mesh frames on and off.
#![no_main]

use bytes::BytesMut;
use derpd::proto::{Frame, FrameDecoder, Role};
use libfuzzer_sys::fuzz_target;

/// Decodes `pieces` in order; returns the frames and whether it failed.
fn run(role: Role, mesh: bool, pieces: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut dec = FrameDecoder::new(role);
    dec.allow_mesh_frames(mesh);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many cut points (0..=15) and the mesh switch; then
    // two bytes per cut point; the rest is the stream.
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let cuts_n = usize::from(head & 0x0f);
    if rest.len() < 2 * cuts_n {
        return;
    }
    let (cut_bytes, stream) = rest.split_at(2 * cuts_n);
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_be_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut at = 0;
    for c in cuts {
        pieces.push(&stream[at..c]);
        at = c;
    }
    pieces.push(&stream[at..]);
    let mesh = head & 0x10 == 0;
    for role in [Role::Server, Role::Client] {
        let whole = run(role, mesh, &[stream]);
        let cut = run(role, mesh, &pieces);
        assert_eq!(whole, cut, "reassembly depends on how the bytes arrive");
    }
});
