//! Round trips for every frame type and one test per class of malformed input.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{FrameDecoder, FrameError, Role};
use super::frame::{peer_present_flags, recv_packet_prefix, Frame, FrameType, PeerGoneReason};
use super::handshake::*;
use super::key::{NodePrivate, NodePublic};
use super::limits::*;

fn key(b: u8) -> NodePublic {
    NodePublic([b; 32])
}

fn decode_all(role: Role, bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut dec = FrameDecoder::new(role);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = dec.decode(&mut buf)? {
        out.push(f);
    }
    Ok(out)
}

fn raw(t: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![t];
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn round_trip(role: Role, f: Frame) {
    let bytes = f.to_bytes();
    assert_eq!(bytes.len(), FRAME_HEADER_LEN + f.body_len());
    assert_eq!(bytes[0], f.type_byte());
    let got = decode_all(role, &bytes).unwrap();
    assert_eq!(got, vec![f]);
}

#[test]
fn frames_a_server_reads_round_trip() {
    let payload = Bytes::from_static(b"hello world");
    for f in [
        Frame::ClientInfo {
            key: key(1),
            nonce: [2; 24],
            sealed: Bytes::from_static(&[3; 40]),
        },
        Frame::SendPacket {
            dst: key(4),
            payload: payload.clone(),
        },
        Frame::SendPacket {
            dst: key(4),
            payload: Bytes::new(),
        },
        Frame::NotePreferred(true),
        Frame::NotePreferred(false),
        Frame::ForwardPacket {
            src: key(5),
            dst: key(6),
            payload,
        },
        Frame::WatchConns,
        Frame::ClosePeer { key: key(7) },
        Frame::Ping([1, 2, 3, 4, 5, 6, 7, 42]),
    ] {
        round_trip(Role::Server, f);
    }
}

#[test]
fn frames_a_client_reads_round_trip() {
    let v4: SocketAddr = "203.0.113.7:41641".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    for f in [
        Frame::ServerKey { key: key(1) },
        Frame::ServerInfo {
            nonce: [9; 24],
            sealed: Bytes::from_static(&[8; 29]),
        },
        Frame::RecvPacket {
            src: key(2),
            payload: Bytes::from_static(&[0xAB; 1200]),
        },
        Frame::KeepAlive,
        Frame::PeerGone {
            key: key(3),
            reason: PeerGoneReason::Disconnected,
        },
        Frame::PeerGone {
            key: key(3),
            reason: PeerGoneReason::NotHere,
        },
        Frame::PeerPresent {
            key: key(4),
            addr: Some(v4),
            flags: peer_present_flags::IS_REGULAR,
        },
        Frame::PeerPresent {
            key: key(4),
            addr: Some(v6),
            flags: peer_present_flags::IS_MESH_PEER | peer_present_flags::NOT_IDEAL,
        },
        Frame::PeerPresent {
            key: key(4),
            addr: None,
            flags: peer_present_flags::IS_PROBER,
        },
        Frame::Ping([7; 8]),
        Frame::Pong([1, 2, 3, 4, 5, 6, 7, 42]),
        Frame::Health(Bytes::from_static(b"duplicate key")),
        Frame::Health(Bytes::new()),
        Frame::Restarting {
            reconnect_in_ms: 500,
            try_for_ms: 30_000,
        },
    ] {
        round_trip(Role::Client, f);
    }
}

#[test]
fn header_layout_matches_spec() {
    // Checklist 1: `04 00 00 04 00` is SendPacket with length 1024.
    let mut bytes = vec![0x04, 0x00, 0x00, 0x04, 0x00];
    bytes.extend_from_slice(&[0u8; 1024]);
    let got = decode_all(Role::Server, &bytes).unwrap();
    assert!(matches!(&got[0], Frame::SendPacket { payload, .. } if payload.len() == 1024 - 32));
    // ServerKey is exactly magic + key, 40 bytes (checklist 2).
    let sk = Frame::ServerKey { key: key(0xEE) }.to_bytes();
    assert_eq!(&sk[..5], &[0x01, 0, 0, 0, 40]);
    assert_eq!(&sk[5..13], b"DERP\xF0\x9F\x94\x91");
    // PeerPresent is 51 bytes with an IPv4-mapped address (checklist 46).
    let pp = Frame::PeerPresent {
        key: key(1),
        addr: Some("1.2.3.4:5".parse().unwrap()),
        flags: 1,
    }
    .to_bytes();
    assert_eq!(pp.len(), 5 + 51);
    assert_eq!(
        &pp[5 + 32..5 + 48],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4]
    );
    assert_eq!(&pp[5 + 48..], &[0, 5, 1]);
    // PeerGone is always 33 bytes (checklist 27).
    let pg = Frame::PeerGone {
        key: key(1),
        reason: PeerGoneReason::NotHere,
    }
    .to_bytes();
    assert_eq!(pg.len(), 5 + 33);
    assert_eq!(pg[5 + 32], 0x01);
    // The RecvPacket prefix used by the zero-copy writer matches the full encoding.
    let payload = Bytes::from_static(b"abc");
    let full = Frame::RecvPacket {
        src: key(9),
        payload: payload.clone(),
    }
    .to_bytes();
    assert_eq!(&full[..37], &recv_packet_prefix(&key(9), 3));
}

#[test]
fn frames_arrive_byte_by_byte() {
    let mut stream = Vec::new();
    for f in [
        Frame::Ping([1; 8]),
        Frame::SendPacket {
            dst: key(2),
            payload: Bytes::from_static(&[5; 300]),
        },
        Frame::NotePreferred(true),
    ] {
        stream.extend_from_slice(&f.to_bytes());
    }
    let mut dec = FrameDecoder::new(Role::Server);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in stream {
        buf.put_u8(b);
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[2], Frame::NotePreferred(true));
}

#[test]
fn unknown_and_other_direction_frames_are_skipped_without_buffering() {
    // Checklist 35: a Pong (0x13) and an unknown 0x16 are skipped; the next
    // frame still decodes.
    let mut stream = raw(0x13, &[1; 8]);
    stream.extend(raw(0x16, &[0; 5000]));
    stream.extend(Frame::Ping([3; 8]).to_bytes());
    let got = decode_all(Role::Server, &stream).unwrap();
    assert_eq!(
        got,
        vec![
            Frame::Ignored {
                frame_type: 0x13,
                len: 8
            },
            Frame::Ignored {
                frame_type: 0x16,
                len: 5000
            },
            Frame::Ping([3; 8])
        ]
    );
    // A huge unknown frame is skipped as it streams in; the buffer never holds it.
    let mut dec = FrameDecoder::new(Role::Server);
    let mut buf = BytesMut::from(&[0x77u8, 0x7f, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        dec.decode(&mut buf),
        Ok(Some(Frame::Ignored {
            frame_type: 0x77,
            ..
        }))
    ));
    for _ in 0..100 {
        buf.put_bytes(0, 64 << 10);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(buf.is_empty());
    }
}

fn expect_err(role: Role, t: u8, len: usize, want: FrameError) {
    let mut header = vec![t];
    header.extend_from_slice(&(len as u32).to_be_bytes());
    // The length alone must be enough to reject, before any body arrives.
    let mut dec = FrameDecoder::new(role);
    let mut buf = BytesMut::from(&header[..]);
    assert_eq!(dec.decode(&mut buf), Err(want), "type {t:#x} len {len}");
}

#[test]
fn every_malformed_length_class_has_its_error() {
    use FrameError as E;
    use Role::*;
    expect_err(Server, 0x02, 55, E::ClientInfoTooShort(55));
    expect_err(Server, 0x02, 262_145, E::ClientInfoTooLong(262_145));
    expect_err(Server, 0x04, 31, E::SendPacketTooShort(31));
    expect_err(
        Server,
        0x04,
        32 + 65_537,
        E::PacketTooLarge {
            frame: FrameType::SendPacket,
            payload_len: 65_537,
        },
    );
    expect_err(Server, 0x0A, 63, E::ForwardPacketTooShort(63));
    expect_err(
        Server,
        0x0A,
        64 + 65_537,
        E::PacketTooLarge {
            frame: FrameType::ForwardPacket,
            payload_len: 65_537,
        },
    );
    expect_err(Server, 0x07, 0, E::NotePreferredBadLength(0));
    expect_err(Server, 0x07, 2, E::NotePreferredBadLength(2));
    expect_err(Server, 0x10, 1, E::WatchConnsNotEmpty(1));
    expect_err(Server, 0x11, 31, E::ClosePeerBadLength(31));
    expect_err(Server, 0x11, 33, E::ClosePeerBadLength(33));
    expect_err(Server, 0x12, 7, E::PingTooShort(7));
    expect_err(Server, 0x12, 1001, E::PingTooLong(1001));
    expect_err(Client, 0x01, 39, E::ServerKeyTooShort(39));
    expect_err(Client, 0x01, 1025, E::ServerKeyTooLong(1025));
    expect_err(Client, 0x03, 39, E::ServerInfoTooShort(39));
    expect_err(
        Client,
        0x03,
        24 + (1 << 20) + 1,
        E::ServerInfoTooLong(24 + (1 << 20) + 1),
    );
    expect_err(Client, 0x05, 31, E::RecvPacketTooShort(31));
    expect_err(
        Client,
        0x05,
        32 + 65_537,
        E::PacketTooLarge {
            frame: FrameType::RecvPacket,
            payload_len: 65_537,
        },
    );
    expect_err(Client, 0x08, 31, E::PeerGoneTooShort(31));
    expect_err(Client, 0x09, 31, E::PeerPresentTooShort(31));
    expect_err(Client, 0x15, 7, E::RestartingTooShort(7));
    expect_err(
        Client,
        0x06,
        1025,
        E::ControlFrameTooLong {
            frame: FrameType::KeepAlive,
            len: 1025,
        },
    );
    expect_err(Client, 0x13, 7, E::PongBadLength(7));
    expect_err(
        Client,
        0x14,
        (64 << 10) + 1,
        E::HealthTooLong((64 << 10) + 1),
    );
    // A 0xFFFFFFFF length is representable and rejected for a packet frame.
    expect_err(
        Server,
        0x04,
        u32::MAX as usize,
        E::PacketTooLarge {
            frame: FrameType::SendPacket,
            payload_len: u32::MAX as u64 - 32,
        },
    );
}

#[test]
fn largest_packet_is_accepted_and_one_more_byte_is_not() {
    let max = Frame::SendPacket {
        dst: key(1),
        payload: Bytes::from(vec![7u8; MAX_PACKET_SIZE]),
    };
    round_trip(Role::Server, max);
}

#[test]
fn server_key_with_bad_magic_is_rejected() {
    let mut body = b"DERQ\xF0\x9F\x94\x91".to_vec();
    body.extend_from_slice(&[1; 32]);
    assert_eq!(
        decode_all(Role::Client, &raw(0x01, &body)),
        Err(FrameError::BadMagic)
    );
    // Extra reserved bytes after the key are fine.
    let mut ok = MAGIC.to_vec();
    ok.extend_from_slice(&[1; 32]);
    ok.extend_from_slice(&[0; 10]);
    assert_eq!(
        decode_all(Role::Client, &raw(0x01, &ok)).unwrap(),
        vec![Frame::ServerKey { key: key(1) }]
    );
}

#[test]
fn short_peer_gone_and_peer_present_forms_decode() {
    // A 32-byte PeerGone means reason 0; a 32-byte PeerPresent has no address.
    assert_eq!(
        decode_all(Role::Client, &raw(0x08, &[5; 32])).unwrap(),
        vec![Frame::PeerGone {
            key: key(5),
            reason: PeerGoneReason::Disconnected
        }]
    );
    assert_eq!(
        decode_all(Role::Client, &raw(0x09, &[5; 32])).unwrap(),
        vec![Frame::PeerPresent {
            key: key(5),
            addr: None,
            flags: 0
        }]
    );
}

#[test]
fn long_ping_echoes_first_eight_bytes() {
    let mut body = vec![1, 2, 3, 4, 5, 6, 7, 8];
    body.extend_from_slice(&[9; 992]);
    assert_eq!(
        decode_all(Role::Server, &raw(0x12, &body)).unwrap(),
        vec![Frame::Ping([1, 2, 3, 4, 5, 6, 7, 8])]
    );
}

#[test]
fn disco_detection() {
    let mut p = DISCO_MAGIC.to_vec();
    p.resize(DISCO_MIN_LEN, 0);
    assert!(looks_like_disco(&p));
    assert!(!looks_like_disco(&p[..DISCO_MIN_LEN - 1]));
    p[0] = b'X';
    assert!(!looks_like_disco(&p));
}

#[test]
fn handshake_boxes_open_with_the_right_keys_only() {
    let server = NodePrivate::generate();
    let client = NodePrivate::generate();
    let info = ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    let Frame::ClientInfo { key, nonce, sealed } =
        seal_client_info(&client, &server.public(), &info)
    else {
        panic!("not ClientInfo")
    };
    assert_eq!(key, client.public());
    let opened = open_client_info(&server, &key, &nonce, &sealed).unwrap();
    assert_eq!(opened.version, 2);
    assert!(opened.can_ack_pings);
    // Claiming someone else's key fails to open.
    let other = NodePrivate::generate().public();
    assert_eq!(
        open_client_info(&server, &other, &nonce, &sealed).unwrap_err(),
        HandshakeError::BoxOpenFailed
    );
    // A flipped bit fails to open.
    let mut bad = sealed.to_vec();
    bad[20] ^= 1;
    assert_eq!(
        open_client_info(&server, &key, &nonce, &bad).unwrap_err(),
        HandshakeError::BoxOpenFailed
    );

    let Frame::ServerInfo { nonce, sealed } =
        seal_server_info(&server, &client.public(), &ServerInfo::current(0, 0))
    else {
        panic!("not ServerInfo")
    };
    // Exactly `{"version":2}` inside: 24 + 16 + 13 bytes on the wire.
    assert_eq!(sealed.len(), 16 + 13);
    let si = open_server_info(&client, &server.public(), &nonce, &sealed).unwrap();
    assert_eq!(si.version, 2);
}

#[test]
fn client_info_json_follows_go_rules() {
    let hex = "ab".repeat(32);
    // Checklist 8: keys match case-insensitively.
    for json in [
        format!(r#"{{"Version":5,"MeshKey":"{hex}"}}"#),
        format!(r#"{{"version":5,"meshKey":"{hex}"}}"#),
        format!(r#"{{"VERSION":5,"meshkey":"{}"}}"#, hex.to_uppercase()),
    ] {
        let info = ClientInfo::from_json(json.as_bytes()).unwrap();
        assert_eq!(info.version, 5);
        assert!(info
            .mesh_key
            .unwrap()
            .matches(&MeshKey::from_hex(&hex).unwrap()));
    }
    // Checklist 9: {} is valid.
    let info = ClientInfo::from_json(b"{}").unwrap();
    assert!(info.mesh_key.is_none() && info.version == 0);
    // Checklist 10: meshKey must be exactly 64 hex digits.
    for bad in [
        r#"{"meshKey":"abcdefg"}"#.to_string(),
        format!(r#"{{"meshKey":"{}"}}"#, "f".repeat(68)),
        r#"{"meshKey":""}"#.to_string(),
        r#"{"meshKey":null}"#.to_string(),
    ] {
        assert_eq!(
            ClientInfo::from_json(bad.as_bytes()).unwrap_err(),
            HandshakeError::BadMeshKey,
            "{bad}"
        );
    }
    // Checklist 11: ts_derp's snake_case body is a regular client.
    let info = ClientInfo::from_json(
        br#"{"can_ack_pings":false,"is_prober":false,"mesh_key":"none","version":2}"#,
    )
    .unwrap();
    assert!(info.mesh_key.is_none());
    assert_eq!(info.version, 2);
    // Bad JSON and wrong types are errors.
    assert!(matches!(
        ClientInfo::from_json(b"{"),
        Err(HandshakeError::BadJson(_))
    ));
    assert!(matches!(
        ClientInfo::from_json(b"[]"),
        Err(HandshakeError::BadJson(_))
    ));
    assert!(matches!(
        ClientInfo::from_json(br#"{"version":"2"}"#),
        Err(HandshakeError::BadJson(_))
    ));
}

#[test]
fn mesh_key_comparison() {
    let a = MeshKey::from_hex(&"11".repeat(32)).unwrap();
    let b = MeshKey::from_hex(&format!(" {}\n", "11".repeat(32))).unwrap();
    let c = MeshKey::from_hex(&"12".repeat(32)).unwrap();
    let zero = MeshKey::from_bytes([0; 32]);
    assert!(a.matches(&b));
    assert!(!a.matches(&c));
    assert!(!zero.matches(&zero));
    assert!(MeshKey::from_hex("badf00d").is_err());
    assert_eq!(format!("{a:?}"), "MeshKey(<redacted>)");
}

#[test]
fn the_servers_precomputed_box_agrees_with_crypto_box_both_ways() {
    for _ in 0..20 {
        let server = NodePrivate::generate();
        let client = NodePrivate::generate();
        let secret = HandshakeSecret::new(&server);
        let pbox = secret.peer_box(&client.public()).unwrap();
        // A ClientInfo sealed by the client (crypto_box) opens with it…
        let info = ClientInfo {
            version: 2,
            is_prober: true,
            ..Default::default()
        };
        let Frame::ClientInfo { nonce, sealed, .. } =
            seal_client_info(&client, &server.public(), &info)
        else {
            panic!("not ClientInfo")
        };
        let opened = pbox.open_client_info(&nonce, &sealed).unwrap();
        assert!(opened.is_prober);
        // …and a ServerInfo sealed with it opens with crypto_box.
        let Frame::ServerInfo { nonce, sealed } = pbox.seal_server_info(&ServerInfo::current(7, 9))
        else {
            panic!("not ServerInfo")
        };
        let si = open_server_info(&client, &server.public(), &nonce, &sealed).unwrap();
        assert_eq!(
            (
                si.token_bucket_bytes_per_second,
                si.token_bucket_bytes_burst
            ),
            (7, 9)
        );
        // A box for another key does not open it.
        let other = secret.peer_box(&NodePrivate::generate().public()).unwrap();
        assert_eq!(
            other.open(&nonce, &sealed),
            Err(HandshakeError::BoxOpenFailed)
        );
    }
}

#[test]
fn the_clients_precomputed_box_agrees_with_crypto_box_both_ways() {
    for _ in 0..20 {
        let server = NodePrivate::generate();
        let client = NodePrivate::generate();
        let secret = HandshakeSecret::new(&client);
        // aws-lc's public key is the one crypto_box derives.
        assert_eq!(secret.public(), client.public());
        let pbox = secret.peer_box(&server.public()).unwrap();
        // A ClientInfo sealed with it announces the client's key and opens
        // with crypto_box on the server's side…
        let info = ClientInfo {
            version: 2,
            can_ack_pings: true,
            ..Default::default()
        };
        let Frame::ClientInfo { key, nonce, sealed } =
            pbox.seal_client_info(secret.public(), &info)
        else {
            panic!("not ClientInfo")
        };
        assert_eq!(key, client.public());
        let opened = open_client_info(&server, &key, &nonce, &sealed).unwrap();
        assert!(opened.can_ack_pings);
        // …and a ServerInfo sealed by crypto_box opens with it, version
        // checked.
        let Frame::ServerInfo { nonce, sealed } =
            seal_server_info(&server, &client.public(), &ServerInfo::current(5, 6))
        else {
            panic!("not ServerInfo")
        };
        let si = pbox.open_server_info(&nonce, &sealed).unwrap();
        assert_eq!(
            (
                si.token_bucket_bytes_per_second,
                si.token_bucket_bytes_burst
            ),
            (5, 6)
        );
        let mut tampered = sealed.to_vec();
        tampered[0] ^= 1;
        assert_eq!(
            pbox.open_server_info(&nonce, &tampered).unwrap_err(),
            HandshakeError::BoxOpenFailed
        );
    }
}

#[test]
fn low_order_client_keys_are_refused() {
    let secret = HandshakeSecret::new(&NodePrivate::generate());
    // The zero point and the point of order 2: every shared secret is zero.
    let mut one = [0u8; 32];
    one[0] = 1;
    for k in [[0u8; 32], one] {
        assert_eq!(
            secret.peer_box(&NodePublic(k)).unwrap_err(),
            HandshakeError::BoxOpenFailed
        );
    }
}
