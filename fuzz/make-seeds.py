#!/usr/bin/env python3
"""Turn captures of a real VM's traffic into the fuzz targets' seed corpora.

Usage: make-seeds.py CAPTURE_DIR SEEDS_DIR

CAPTURE_DIR holds what a pen built with `--features pen-net/capture,pen-proto/capture`
wrote there (PEN_NET_CAPTURE_DIR, PEN_PROTO_CAPTURE_DIR): `net-*.bin` records
`[kind][len u16][frame]`, `proto-*-{decoded,encoded}.bin` wire frames `[len u32][body]`.
Seeds stay small (a few frames each, large frames left out): the fuzzer mutates from them.
"""
import hashlib
import os
import struct
import sys

MAX_SEEDS = 12
MAX_FRAME = 1600


def write(seeds, target, data):
    d = os.path.join(seeds, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def net_records(path):
    data = open(path, "rb").read()
    i = 0
    while i + 3 <= len(data):
        kind, n = data[i], struct.unpack(">H", data[i + 1:i + 3])[0]
        yield kind, data[i + 3:i + 3 + n]
        i += 3 + n


def flow_of(frame):
    """(proto, guest port, far ip, far port) of an IPv4 TCP/UDP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    src, dst = frame[26:30], frame[30:34]
    l4 = frame[14 + ihl:]
    if proto not in (6, 17) or len(l4) < 8:
        return None
    sport, dport = struct.unpack(">HH", l4[:4])
    if src == bytes([10, 0, 2, 15]):
        return proto, sport, dst, dport
    return proto, dport, src, sport


def net_seeds(captures, seeds):
    flows, dns, arp = {}, [], []
    for name in sorted(os.listdir(captures)):
        if not name.startswith("net-"):
            continue
        for kind, frame in net_records(os.path.join(captures, name)):
            if frame[12:14] == b"\x08\x06" and len(arp) < 4:
                arp.append((kind, frame))
            f = flow_of(frame)
            if f is None or len(frame) > MAX_FRAME:
                continue
            flows.setdefault(f, []).append((kind, frame))
            if f[0] == 17 and f[3] == 53 and kind == 0:
                dns.append(frame[42:])
    tcp = [v for k, v in flows.items() if k[0] == 6][:MAX_SEEDS]
    udp = [v for k, v in flows.items() if k[0] == 17][:4]
    for recs in tcp + udp:
        body = b"".join(bytes([k]) + struct.pack(">H", len(f)) + f for k, f in arp + recs[:24])
        write(seeds, "net_guest_frames", b"\x00" + body)
    seen = set()
    for q in dns:
        if q[12:] in seen or len(seen) >= MAX_SEEDS:
            continue
        seen.add(q[12:])
        write(seeds, "net_dns_query", bytes([len(seen) % 3]) + q)
    return flows


def proto_frames(path):
    data = open(path, "rb").read()
    i, out = 0, []
    while i + 4 <= len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        out.append(data[i:i + 4 + n])
        i += 4 + n
    return out


def proto_seeds(captures, seeds):
    for which, target in (("decoded", "agent_link_from_guest"), ("encoded", "agent_link_from_host")):
        frames = []
        for name in sorted(os.listdir(captures)):
            if name.startswith("proto-") and name.endswith(which + ".bin"):
                frames += [f for f in proto_frames(os.path.join(captures, name)) if len(f) <= 4096]
        # Distinct message kinds first (the byte after the session id is the variant).
        by_kind = {}
        for f in frames:
            by_kind.setdefault(f[8:9], []).append(f)
        groups = [v[:8] for v in by_kind.values()]
        for i, g in enumerate(groups[:MAX_SEEDS]):
            write(seeds, target, bytes([(i * 37) % 256]) + b"".join(g))


def policy_seeds(flows, seeds):
    # Allow mode with the captured names' patterns, then the captured destinations.
    for mode in (0, 1, 2):
        body = bytes([mode])
        if mode == 2:
            pats = [b"deb.debian.org", b"*.debian.org"]
            body += bytes([len(pats)]) + b"".join(bytes([len(p)]) + p for p in pats)
        body += b"\x01" + b"\x05" + b"\x7f\x00\x00\x01" + b"\x01"  # allow-host 127.0.0.1:8080
        body += b"\x00"  # no own addresses
        for (proto, _gport, ip, port) in list(flows)[:8]:
            body += b"\x01" + bytes([len(b"deb.debian.org")]) + b"deb.debian.org" + b"\x01" + b"\x05" + ip
            body += b"\x03" + b"\x05" + ip + b"\x02" + struct.pack(">H", port)
        write(seeds, "net_policy", body)


def main():
    captures, seeds = sys.argv[1], sys.argv[2]
    flows = net_seeds(captures, seeds)
    proto_seeds(captures, seeds)
    policy_seeds(flows, seeds)


if __name__ == "__main__":
    main()
