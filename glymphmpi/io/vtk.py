"""VTK XML PolyData (``.vtp``) writer and reader.

The files use the VTK XML format version 1.0 with ``header_type="UInt64"``
and raw appended binary data (little endian), which ParaView and VTK read
directly: each array in ``<AppendedData encoding="raw">`` after the ``_``
marker is an 8-byte byte count followed by the values, and each
``<DataArray format="appended">`` names its byte offset there.

Writes are atomic (a temporary file renamed over the target).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from glymphmpi.errors import InputError
from glymphmpi.io.atomic import atomic_path

_VTK_TYPES = {
    np.dtype(np.float32): "Float32", np.dtype(np.float64): "Float64",
    np.dtype(np.int8): "Int8", np.dtype(np.uint8): "UInt8",
    np.dtype(np.int32): "Int32", np.dtype(np.int64): "Int64", np.dtype(np.uint64): "UInt64",
}
_NP_TYPES = {v: k for k, v in _VTK_TYPES.items()}


class _Appended:
    """Collects arrays for the appended section and writes their DataArray tags."""

    def __init__(self):
        self.blobs: list[bytes] = []
        self.offset = 0

    def tag(self, arr: np.ndarray, name: str | None = None, indent: str = "") -> str:
        a = np.ascontiguousarray(arr)
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        if a.dtype not in _VTK_TYPES:
            a = a.astype(np.float64 if a.dtype.kind == "f" else np.int64)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        ncomp = 1 if a.ndim == 1 else int(np.prod(a.shape[1:]))
        data = a.tobytes()
        blob = np.uint64(len(data)).astype("<u8").tobytes() + data
        attrs = f'type="{_VTK_TYPES[a.dtype.newbyteorder("=")]}"'
        if name is not None:
            attrs += f' Name="{_xml_escape(name)}"'
        attrs += f' NumberOfComponents="{ncomp}" format="appended" offset="{self.offset}"'
        self.blobs.append(blob)
        self.offset += len(blob)
        return f"{indent}<DataArray {attrs}/>\n"

    def section(self) -> bytes:
        return b'  <AppendedData encoding="raw">\n   _' + b"".join(self.blobs) + b"\n  </AppendedData>\n"


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def _data_block(tag: str, data: dict | None, n: int, app: _Appended, where: str) -> str:
    if not data:
        return ""
    out = f"      <{tag}>\n"
    for name, arr in data.items():
        a = np.asarray(arr)
        if a.shape[0] != n:
            raise ValueError(f"{where} {name!r}: {a.shape[0]} values for {n} {tag[:-4].lower()}s")
        out += app.tag(a, name, "        ")
    return out + f"      </{tag}>\n"


def _cells_block(tag: str, conn: np.ndarray, offsets: np.ndarray, app: _Appended) -> str:
    return (f"      <{tag}>\n" + app.tag(np.asarray(conn, np.int64), "connectivity", "        ")
            + app.tag(np.asarray(offsets, np.int64), "offsets", "        ") + f"      </{tag}>\n")


def _finish(path, kind: str, body: str, app: _Appended) -> Path:
    head = (f'<?xml version="1.0"?>\n<VTKFile type="{kind}" version="1.0" byte_order="LittleEndian" '
            f'header_type="UInt64">\n  <{kind}>\n{body}  </{kind}>\n')
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(head.encode())
            fh.write(app.section())
            fh.write(b"</VTKFile>\n")
    return path


def lines_from_lengths(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connectivity and VTK offsets (cumulative ends) of consecutive polylines.

    Args:
        lengths: (m,) number of points of each line, stored one after another.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64), np.cumsum(lengths)


def write_vtp(path, points: np.ndarray, *, lines: tuple | None = None, verts: bool = False,
              point_data: dict | None = None, cell_data: dict | None = None) -> Path:
    """Write PolyData: points with polylines or vertices, and their data.

    Args:
        path: target ``.vtp``.
        points: (n, 3) coordinates (world mm by convention of this project).
        lines: (connectivity (L,), offsets (m,)) of m polylines (VTK offsets are
            the cumulative end positions in connectivity), or None.
        verts: one vertex cell per point (e.g. glyph anchors); not with lines.
        point_data: name -> (n,) or (n, 3) arrays.
        cell_data: name -> (m,) or (m, 3) arrays, one per cell.
    Returns:
        the path.
    """
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    n = pts.shape[0]
    if lines is not None and verts:
        raise ValueError("write_vtp: give lines or verts, not both")
    app = _Appended()
    n_lines = 0 if lines is None else len(lines[1])
    n_verts = n if verts else 0
    body = (f'    <Piece NumberOfPoints="{n}" NumberOfVerts="{n_verts}" NumberOfLines="{n_lines}" '
            f'NumberOfStrips="0" NumberOfPolys="0">\n')
    body += _data_block("PointData", point_data, n, app, "point data")
    body += _data_block("CellData", cell_data, n_lines + n_verts, app, "cell data")
    body += "      <Points>\n" + app.tag(pts, "Points", "        ") + "      </Points>\n"
    if verts:
        body += _cells_block("Verts", np.arange(n), np.arange(1, n + 1), app)
    if lines is not None:
        conn, offs = (np.asarray(a, dtype=np.int64) for a in lines)
        if offs.size and (offs[-1] != conn.size or np.any(np.diff(offs) < 0) or offs[0] < 0):
            raise ValueError("write_vtp: offsets must be non-decreasing cumulative ends of connectivity")
        if conn.size and (conn.min() < 0 or conn.max() >= n):
            raise ValueError("write_vtp: connectivity refers to missing points")
        body += _cells_block("Lines", conn, offs, app)
    body += "    </Piece>\n"
    return _finish(path, "PolyData", body, app)


def read_vtp(path) -> dict:
    """Read a ``.vtp`` written by :func:`write_vtp` (appended raw, UInt64 headers).

    Returns:
        dict with ``points`` (n, 3), ``lines`` and ``verts`` ((connectivity,
        offsets) or None), ``point_data`` and ``cell_data`` (name -> array).
    Raises:
        InputError: not such a file.
    """
    path = Path(path)
    raw = path.read_bytes()
    marker = b'<AppendedData encoding="raw">'
    i = raw.find(marker)
    if i < 0:
        raise InputError("not a VTK XML file with raw appended data", path)
    start = raw.index(b"_", i + len(marker)) + 1
    end = raw.rfind(b"</AppendedData>")
    blob = raw[start:end]
    try:
        root = ET.fromstring(raw[:i] + b"</VTKFile>")
    except ET.ParseError as exc:
        raise InputError(f"malformed VTK XML header ({exc})", path) from None
    if root.get("type") != "PolyData" or root.get("header_type") != "UInt64":
        raise InputError(f"expected PolyData with UInt64 headers, got {root.get('type')}", path)
    piece = root.find("PolyData/Piece")

    def arr(el):
        off = int(el.get("offset"))
        nbytes = int(np.frombuffer(blob[off:off + 8], "<u8")[0])
        a = np.frombuffer(blob[off + 8:off + 8 + nbytes], _NP_TYPES[el.get("type")].newbyteorder("<"))
        nc = int(el.get("NumberOfComponents", "1"))
        return a.reshape(-1, nc) if nc > 1 else a.copy()

    def cells(tag):
        el = piece.find(tag)
        if el is None:
            return None
        d = {a.get("Name"): arr(a) for a in el.findall("DataArray")}
        return d["connectivity"], d["offsets"]

    out = {"points": arr(piece.find("Points/DataArray")), "lines": cells("Lines"), "verts": cells("Verts")}
    for tag, key in (("PointData", "point_data"), ("CellData", "cell_data")):
        el = piece.find(tag)
        out[key] = {} if el is None else {a.get("Name"): arr(a) for a in el.findall("DataArray")}
    out["n_points"] = int(piece.get("NumberOfPoints"))
    out["n_lines"] = int(piece.get("NumberOfLines"))
    out["n_verts"] = int(piece.get("NumberOfVerts"))
    return out
