#!/usr/bin/env python3
"""Rebuild Data/text/persuasion_vol1.txt and Data/text/short.txt from the Debian package r-cran-janeaustenr.

The package (MIT-licensed R data package; the novels themselves are public domain) stores Jane Austen's
"Persuasion" (Project Gutenberg eBook #105, Project Gutenberg header and footer already removed by the
package) as an R character vector, one element per printed line, in the lazy-load database
data/Rdata.rdb (index data/Rdata.rdx). This script reads that database with a minimal R-serialization
reader (only what these files use), joins the lines with "\\n", and writes
  * persuasion_vol1.txt: the title block and Volume I (chapters 1-12), i.e. everything before the line
    "Chapter 13" with trailing blank lines reduced to a single final "\\n";
  * short.txt: the first paragraphs of the same text, up to the last paragraph break before --short-bytes.
No character is changed: both files are byte-exact prefixes of the joined text (plus a final "\\n").

Usage:
  apt-get download r-cran-janeaustenr            # or pass --deb to an already downloaded .deb
  python3 Tools/reference/extract_text.py --deb r-cran-janeaustenr_1.0.0-1_all.deb --out Data/text
Only the Python standard library is needed (dpkg-deb extracts the .deb).
"""

import argparse
import bz2
import gzip
import hashlib
import lzma
import os
import re
import struct
import subprocess
import tempfile
import zlib


class RReader:
    """Reader of R's XDR serialization format (version 2/3), enough for character vectors and pairlists."""

    def __init__(self, b):
        self.b, self.p, self.refs = b, 0, []

    def i32(self):
        v = struct.unpack(">i", self.b[self.p:self.p + 4])[0]
        self.p += 4
        return v

    def raw(self, n):
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def length(self):
        n = self.i32()
        if n == -1:
            hi, lo = self.i32(), self.i32()
            n = (hi << 32) + lo
        return n

    def header(self):
        if self.raw(2) != b"X\n":
            raise ValueError("not an XDR R serialization")
        ver = self.i32()
        self.i32()
        self.i32()
        if ver == 3:
            self.raw(self.i32())

    def item(self):
        f = self.i32()
        t = f & 0xFF
        has_attr, has_tag = f & 512, f & 1024
        if t in (254, 242, 253, 241, 247, 251, 252):  # NULL, empty/global/base env, ...
            return None
        if t == 255:  # reference
            idx = f >> 8
            return self.refs[(idx or self.i32()) - 1]
        if t in (249, 250):  # namespace / package environment
            self.i32()
            v = [self.item() for _ in range(self.i32())]
            self.refs.append(("ns", v))
            return self.refs[-1]
        if t == 1:  # symbol
            s = self.item()
            self.refs.append(("sym", s))
            return self.refs[-1]
        if t == 4:  # environment
            env = {}
            self.refs.append(env)
            self.i32()
            for k in ("enclos", "frame", "hash", "attr"):
                env[k] = self.item()
            return env
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            return ("pair", tag, self.item(), self.item(), attr)
        if t == 9:  # CHARSXP
            n = self.i32()
            return None if n == -1 else self.raw(n).decode("utf-8")
        if t in (10, 13):
            n = self.length()
            v = list(struct.unpack(">%di" % n, self.raw(4 * n)))
        elif t == 14:
            n = self.length()
            v = list(struct.unpack(">%dd" % n, self.raw(8 * n)))
        elif t in (16, 19, 20):
            v = [self.item() for _ in range(self.length())]
        else:
            raise ValueError("unsupported R type %d" % t)
        attr = self.item() if has_attr else None
        return (t, v, attr) if attr is not None else v


def pairlist(p):
    out = {}
    while p is not None and p[0] == "pair":
        out[p[1][1]] = p[2]
        p = p[3]
    return out


def read_lazyload(rdx, rdb):
    raw = open(rdx, "rb").read()
    r = RReader(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    r.header()
    _, v, attr = r.item()
    variables = v[pairlist(attr)["names"].index("variables")]
    _, offsets, vattr = variables
    data = open(rdb, "rb").read()
    out = {}
    for name, (off, ln) in zip(pairlist(vattr)["names"], offsets):
        blob = data[int(off):int(off) + int(ln)]
        ulen = struct.unpack(">I", blob[:4])[0]
        kind = blob[4:5]
        body = {b"Z": lambda b: zlib.decompress(b[5:]), b"2": lambda b: bz2.decompress(b[5:]),
                b"X": lambda b: lzma.decompress(b[5:]), b"0": lambda b: b[5:]}.get(kind, lambda b: zlib.decompress(b[4:]))(blob)
        if len(body) != ulen:
            raise ValueError(f"{name}: length mismatch")
        rr = RReader(body)
        rr.header()
        out[name] = rr.item()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", required=True, help="r-cran-janeaustenr_*.deb")
    ap.add_argument("--out", default="Data/text")
    ap.add_argument("--short-bytes", type=int, default=7500)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", args.deb, tmp], check=True)
        d = os.path.join(tmp, "usr/lib/R/site-library/janeaustenr/data")
        books = read_lazyload(os.path.join(d, "Rdata.rdx"), os.path.join(d, "Rdata.rdb"))
    lines = books["persuasion"]
    full = "\n".join("" if s is None else s for s in lines) + "\n"
    print(f"persuasion: {len(lines)} lines, {len(full.encode())} bytes")
    assert "gutenberg" not in full.lower(), "Project Gutenberg boilerplate present"

    m = re.search(r"^Chapter 13$", full, re.M)
    vol1 = full[:m.start()].rstrip("\n") + "\n"
    cut = vol1.rfind("\n\n", 0, args.short_bytes)
    short = vol1[:cut] + "\n"
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("persuasion_vol1.txt", vol1), ("short.txt", short)):
        b = text.encode("utf-8")
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(b)
        print(f"{name}: {len(b)} bytes, {text.count(chr(10))} lines, sha256 {hashlib.sha256(b).hexdigest()}")


if __name__ == "__main__":
    main()
