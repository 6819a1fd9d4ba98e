"""Images on disk: names that carry the seed, the A1111 `parameters` text in PNGs that lack it, and the files
of a training dataset in a folder.

Why by hand: a PNG is a list of length-type-data-CRC chunks, so adding one
tEXt chunk needs zlib's crc32 and nothing else; the client does not pull in an
imaging library for it. The server already embeds parameters; this only fills
the gap for files that arrive without them.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATASET_IMAGES = (".png", ".jpg", ".jpeg", ".webp")     # what the service trains on
CAPTIONS = (".txt", ".caption")                        # a caption file beside its image
PARAMETERS = "parameters"
TEXT_CHUNKS = (b"tEXt", b"iTXt", b"zTXt")


def image_name(task_id: str, index: int, seed: Optional[int], url: str) -> str:
    """`<task>-<index>-seed<seed>.<ext>`, the extension taken from the URL's path (png when it has none)."""
    suffix = Path(urlparse(url).path).suffix.lower() or ".png"
    seed_part = f"-seed{seed}" if seed is not None else ""
    return f"{task_id}-{index}{seed_part}{suffix}"


def save_image(data: bytes, path: Path, parameters: Optional[str] = None) -> Path:
    """Write the image; a PNG without a `parameters` text chunk gets `parameters` embedded."""
    if parameters and is_png(data) and png_text(data, PARAMETERS) is None:
        data = add_png_text(data, PARAMETERS, parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def is_png(data: bytes) -> bool:
    return data.startswith(PNG_SIGNATURE)


def chunks(data: bytes) -> Iterator[Tuple[int, bytes, bytes]]:
    """(offset, type, payload) of each chunk of a PNG."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield pos, kind, data[pos + 8:pos + 8 + length]
        pos += 12 + length


def png_text(data: bytes, keyword: str) -> Optional[str]:
    """The text stored under `keyword` in a tEXt, zTXt or iTXt chunk, or None."""
    for _, kind, payload in chunks(data):
        if kind not in TEXT_CHUNKS:
            continue
        key, _, rest = payload.partition(b"\0")
        if key.decode("latin-1") != keyword:
            continue
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            return zlib.decompress(rest[1:]).decode("latin-1")
        compressed, _method, rest = rest[0], rest[1], rest[2:]
        _lang, _, rest = rest.partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        return (zlib.decompress(text) if compressed else text).decode("utf-8")
    return None


def png_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from the IHDR chunk."""
    for _, kind, payload in chunks(data):
        if kind == b"IHDR":
            return struct.unpack(">II", payload[:8])
    return None


def add_png_text(data: bytes, keyword: str, text: str) -> bytes:
    """The PNG with a text chunk before its image data (where readers look for it, as PIL writes it): tEXt when
    latin-1 holds the text, else iTXt (UTF-8)."""
    try:
        kind, payload = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        kind, payload = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    at = next((pos for pos, k, _ in chunks(data) if k in (b"IDAT", b"IEND")), len(data))
    return data[:at] + chunk + data[at:]


def infotext(params: Dict[str, Any], seed: Optional[int], size: Optional[Tuple[int, int]] = None,
             model: Optional[str] = None) -> str:
    """The AUTOMATIC1111 "parameters" text of a request, for what it names (unknown values are left out)."""
    lines = [params.get("prompt") or ""]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = [("Steps", params.get("num_inference_steps")), ("Sampler", params.get("scheduler")),
             ("CFG scale", params.get("guidance_scale")), ("Seed", seed),
             ("Size", f"{size[0]}x{size[1]}" if size else None), ("Model", model or params.get("model"))]
    lines.append(", ".join(f"{name}: {value}" for name, value in pairs if value is not None))
    return "\n".join(lines)


def dataset_files(directory: Path) -> Dict[str, Path]:
    """A folder's images (png, jpg, jpeg, webp) and the caption beside each (same stem, `.txt` or `.caption`),
    by file name.

    Other files, sub-folders and captions without an image are left out: the dataset is what trains.
    """
    entries = sorted(p for p in Path(directory).iterdir() if p.is_file())
    images = [p for p in entries if p.suffix.lower() in DATASET_IMAGES]
    stems = {p.stem for p in images}
    captions: List[Path] = [p for p in entries if p.suffix.lower() in CAPTIONS and p.stem in stems]
    return {p.name: p for p in images + captions}
