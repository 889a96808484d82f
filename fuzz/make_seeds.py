#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/.

Seeds are small, valid (or nearly valid) inputs taken from the unit tests,
the recorded headscale answers and the deploy examples, shaped the way each
target reads its input. Re-run after changing a target's input layout.
"""
import binascii
import glob
import hashlib
import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
OUT = os.path.join(ROOT, "seeds")
HEADSCALE = "/work/shared/headscale-api"


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(t, body=b""):
    return struct.pack(">BI", t, len(body)) + body


KEY = bytes(range(32))
KEY2 = bytes(range(32, 64))
MAGIC = "DERP🔑".encode()
CLIENT_JSON = b'{"version":2,"meshKey":"' + b"ab" * 32 + b'","canAckPings":true,"IsProber":false}'

# Client-to-server frames, then server-to-client frames.
CLIENT_FRAMES = [
    frame(0x02, KEY + bytes(24) + bytes(16) + CLIENT_JSON),  # ClientInfo (box shape)
    frame(0x04, KEY2 + b"\x00hello packet"),  # SendPacket
    frame(0x07, b"\x01"),  # NotePreferred
    frame(0x0A, KEY + KEY2 + b"fwd"),  # ForwardPacket
    frame(0x10),  # WatchConns
    frame(0x11, KEY2),  # ClosePeer
    frame(0x12, b"12345678"),  # Ping
    frame(0x13, b"12345678"),  # Pong (ignored by the server)
    frame(0x20, b"unknown type"),
]
SERVER_FRAMES = [
    frame(0x01, MAGIC + KEY),  # ServerKey
    frame(0x03, bytes(24) + bytes(16) + b'{"version":2}'),  # ServerInfo
    frame(0x05, KEY + b"\x00hello"),  # RecvPacket
    frame(0x06),  # KeepAlive
    frame(0x08, KEY2 + b"\x00"),  # PeerGone
    frame(0x09, KEY2 + bytes(18) + b"\x03"),  # PeerPresent
    frame(0x12, b"abcdefgh"),  # Ping
    frame(0x13, b"abcdefgh"),  # Pong
    frame(0x14, b"no route"),  # Health
    frame(0x15, struct.pack(">II", 1000, 60000)),  # Restarting
]


def frames():
    allc, alls = b"".join(CLIENT_FRAMES), b"".join(SERVER_FRAMES)
    for i, f in enumerate(CLIENT_FRAMES + SERVER_FRAMES):
        put("frame_decode", f"single-{i:02}", bytes([255]) + f)
    put("frame_decode", "client-stream-1", bytes([1]) + allc)
    put("frame_decode", "client-stream-7", bytes([7]) + allc)
    put("frame_decode", "server-stream-3", bytes([3]) + alls)
    put("frame_decode", "nomesh-stream", bytes([0x21]) + allc)
    put("frame_decode", "too-long", bytes([64]) + struct.pack(">BI", 0x04, 1 << 20))
    # frame_reassemble: head byte (cut count, mesh bit), cut points, stream.
    cuts = [1, 5, 6, 40, 41, 90]
    hdr = bytes([len(cuts)]) + b"".join(struct.pack(">H", c) for c in cuts)
    put("frame_reassemble", "client", hdr + allc)
    put("frame_reassemble", "server", hdr + alls)
    put("frame_reassemble", "nomesh", bytes([0x10 | len(cuts)]) + hdr[1:] + allc)
    put("frame_reassemble", "uncut", bytes([0]) + allc + alls)


def client_info():
    samples = [
        CLIENT_JSON,
        b'{"version":2,"CanAckPings":true}',
        b'{"Version":1,"meshKey":null,"isProber":true,"appName":"derpd-bench"}',
        b'{"meshKey":"' + b"00" * 32 + b'","unknown":[1,{"a":null}]}',
        b"{}",
        b"null",
    ]
    for i, s in enumerate(samples):
        put("client_info_json", f"json-{i}", s)
        put("client_info_open", f"plain-{i}", bytes([1]) + s)
    put("client_info_open", "box", bytes([0]) + bytes(24) + bytes(16) + CLIENT_JSON)


HEADS = [
    b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nIdeal-Node: 900a\r\n\r\n\x02\x00\x00",
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: derp\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"GET /derp HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n",
    b"GET /derp/probe HTTP/1.1\r\nHost: derp.example.com\r\n\r\n",
    b"GET /derp/probe HTTP/1.0\r\n\r\n",
    b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /verify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"GET /derp?x=1 HTTP/1.1\r\nHost: a\r\nHost: b\r\nDerp-Fast-Start: 1\r\n\r\n",
    b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nContent-Length: 00000000000000000001\r\n\r\n",
]


def http():
    for i, h in enumerate(HEADS):
        put("http_head", f"head-{i}", h)
    good = b"connection: keep-alive, Upgrade\nupgrade: websocket\nsec-websocket-version: 13\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\n"
    put("ws_negotiate", "good", b"GET\n" + good + b"sec-websocket-protocol: chat\nsec-websocket-protocol: x, derp\n")
    put("ws_negotiate", "no-derp", b"GET\n" + good + b"sec-websocket-protocol: derpish\n")
    put("ws_negotiate", "post", b"POST\n" + good)
    put("ws_negotiate", "old-version", b"GET\nconnection: Upgrade\nupgrade: websocket\nsec-websocket-version: 8\nsec-websocket-key: short\n")


def ws_frame(opcode, payload, fin=True, mask=b"\x11\x22\x33\x44"):
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        hdr = bytes([b0, 0x80 | n])
    elif n < 65536:
        hdr = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        hdr = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return hdr + mask + masked


def websocket():
    allc = b"".join(CLIENT_FRAMES)
    put("websocket_derp", "one-message", ws_frame(2, allc))
    put("websocket_derp", "per-frame", b"".join(ws_frame(2, f) for f in CLIENT_FRAMES))
    half = len(allc) // 2
    put("websocket_derp", "fragmented", ws_frame(2, allc[:half], fin=False) + ws_frame(0, allc[half:]))
    put("websocket_derp", "ping-then-data", ws_frame(9, b"hi") + ws_frame(2, CLIENT_FRAMES[1]))
    put("websocket_derp", "text", ws_frame(1, b"hello") + ws_frame(2, CLIENT_FRAMES[1]))
    put("websocket_derp", "close", ws_frame(2, CLIENT_FRAMES[1]) + ws_frame(8, b"\x03\xe8bye"))
    put("websocket_derp", "unmasked", bytes([0x82, 3]) + b"abc")


def stun():
    def req(tx, attrs=b"", fingerprint=True):
        body = attrs
        msg = struct.pack(">HHI", 0x0001, len(body) + (8 if fingerprint else 0), 0x2112A442) + tx + body
        if fingerprint:
            crc = (zlib.crc32(msg) ^ 0x5354554E) & 0xFFFFFFFF
            msg += struct.pack(">HHI", 0x8028, 4, crc)
        return msg
    sw = b"tailnode"
    software = struct.pack(">HH", 0x8022, len(sw)) + sw
    put("stun_parse", "tailscale", req(b"\x01" * 12, software))
    put("stun_parse", "bare", req(b"\x02" * 12, fingerprint=False))
    put("stun_parse", "fingerprint-only", req(b"\x03" * 12))
    odd = b"abcde"
    put("stun_parse", "padded-attr", req(b"\x04" * 12, struct.pack(">HH", 0x8022, 5) + odd + b"\x00" * 3))
    put("stun_parse", "response", struct.pack(">HHI", 0x0101, 0, 0x2112A442) + b"\x05" * 12)


def headscale():
    status = struct.pack(">H", 200)
    for path in sorted(glob.glob(os.path.join(HEADSCALE, "*.json"))):
        name = os.path.basename(path)
        if "swagger" in name:
            continue
        with open(path, "rb") as f:
            raw = f.read()
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "status" in rec and "body" in rec:
            body = json.dumps(rec["body"]).encode()
            st = struct.pack(">H", int(rec["status"]))
        else:
            body, st = raw, status
        if len(body) <= 16384:
            put("headscale_nodes", name.removesuffix(".json"), st + body)
    put("headscale_nodes", "unauthorized", struct.pack(">H", 500) + b"Unauthorized\n")
    put("headscale_nodes", "empty", status + b'{"nodes":[]}')


def verify():
    key = "nodekey:" + KEY.hex()
    for i, b in enumerate([
        {"NodePublic": key, "Source": "100.64.0.1"},
        {"NodePublic": key, "Source": ""},
        {"NodePublic": key, "Source": "fd7a:115c:a1e0::1"},
        {"Source": "100.64.0.1"},
        {"NodePublic": "nodekey:zz", "Source": "x"},
    ]):
        put("verify_body", f"body-{i}", json.dumps(b))


def rate():
    for i, s in enumerate([
        '{"PerClientRateLimitBytesPerSec":1000000,"PerClientRateBurstBytes":100000}',
        '{"PerClientRateLimitBytesPerSec":2000000}',
        '{"PerClientRateBurstBytes":18446744073709551615}',
        "{}",
    ]):
        put("rate_config", f"rate-{i}", s)


def config():
    for path in sorted(glob.glob(os.path.join(REPO, "tests/fixtures/cli/toml/*.toml"))):
        with open(path, "rb") as f:
            put("config_toml", os.path.basename(path), f.read())
    for path in sorted(glob.glob(os.path.join(REPO, "deploy/**/*.toml"), recursive=True)):
        with open(path, "rb") as f:
            put("config_toml", "deploy-" + os.path.basename(path), f.read())


TUNNEL_MAP = """{
  "Regions": {
    "901": {"RegionID": 901, "RegionCode": "b", "RegionName": "B", "Nodes": [
      {"Name": "901a", "RegionID": 901, "HostName": "b.example.com", "DERPPort": 8443,
       "IPv4": "198.51.100.7", "IPv6": "none", "InsecureForTests": true}
    ]},
    "900": {"RegionID": 900, "RegionCode": "a", "RegionName": "A", "Nodes": [
      {"Name": "900s", "RegionID": 900, "HostName": "stun.example.com", "STUNOnly": true},
      {"Name": "900a", "RegionID": 900, "HostName": "a.example.com", "Unknown": [1, 2]},
      {"Name": "900b", "RegionID": 900, "HostName": "2001:db8::5", "DERPPort": 99999}
    ]},
    "1": null
  },
  "HomeParams": {"RegionScore": {"900": 0.5}}
}"""
MAP_JSON = '{"Regions":{"900":{"RegionID":900,"RegionCode":"home","RegionName":"Home relay","Nodes":[{"Name":"900a","RegionID":900,"HostName":"derp.example.com","IPv4":"198.51.100.1","STUNPort":-1,"CanPort80":true}]}}}'
MAP_TOML = (
    '[Regions.900]\nRegionID = 900\nRegionCode = "home"\nRegionName = "Home relay"\n'
    '[[Regions.900.Nodes]]\nName = "900a"\nRegionID = 900\nHostName = "derp.example.com"\n'
    'IPv4 = "198.51.100.1"\nCanPort80 = true\nSTUNPort = -1\n'
)


def derp_maps():
    with open(os.path.join(REPO, "deploy/kubernetes/base/derpmap.json"), "rb") as f:
        deploy = f.read()
    put("derp_map", "json", b"\x00" + MAP_JSON.encode())
    put("derp_map", "toml", b"\x01" + MAP_TOML.encode())
    put("derp_map", "deploy", b"\x00" + deploy)
    put("derp_map", "tunnel-style", b"\x00" + TUNNEL_MAP.encode())
    put("tunnel_derp_map", "all", b"\x00" + TUNNEL_MAP.encode())
    put("tunnel_derp_map", "filter-901", b"\x01" + bytes([901 % 256]) + TUNNEL_MAP.encode())
    put("tunnel_derp_map", "deploy", b"\x00" + deploy)
    put("tunnel_derp_map", "companion", b"\x00" + MAP_JSON.encode())


def tls_session():
    # First byte: the cipher suite (mod 3). Then operations (first byte mod 6):
    # 0 data (len/70, padding), 1 any content type (type, len le16,
    # padding/16), 2 KeyUpdate (requested bit), 3 forged record, 4 raw bytes
    # (len), 5 a server write.
    put("tls_session", "data", b"\x00" + b"\x00\x01\x00" + b"G" * 70)
    put("tls_session", "padded", b"\x01" + b"\x00\x01\x10" + b"E" * 70 + b"\x05" + b"hi")
    put("tls_session", "key_updates", b"\x02" + b"\x02\x01" + b"\x02\x00" + b"\x00\x01\x00" + b"T" * 70)
    put("tls_session", "handshake_type", b"\x00" + b"\x01\x16\x05\x00\x00" + bytes([24, 0, 0, 1, 0]))
    put("tls_session", "alert", b"\x00" + b"\x01\x15\x02\x00\x00" + bytes([1, 0]))
    put("tls_session", "forged", b"\x00" + b"\x03" + b"F" * 32 + b"\x07\x03")
    put("tls_session", "raw", b"\x00" + b"\x04\x05" + bytes([23, 3, 3, 0xff, 0xff]))


for f in (frames, client_info, http, websocket, stun, headscale, verify, rate, config, derp_maps,
          tls_session):
    f()
