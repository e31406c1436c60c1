"""Where the images come from: a folder (recursive), a text file of paths, or WebDataset-style tar
shards. Each image becomes one `Source` that a worker process (or a Ray task) can read on its own."""
from __future__ import annotations

import glob
import tarfile
from dataclasses import dataclass
from pathlib import Path

from rmt_deploy.preprocess import IMAGE_SUFFIXES, image_files

TAR_SUFFIXES = (".tar",)


@dataclass(frozen=True)
class Source:
    """One image: ``path`` names it in the output; ``file`` holds its bytes, at ``offset`` for ``size``
    bytes inside a tar shard (None: the whole file). ``error`` marks a sample that has no image."""

    path: str
    file: str
    offset: int | None = None
    size: int | None = None
    error: str | None = None


def list_sources(data: str | Path) -> list[Source]:
    """The images of ``data`` in a fixed order, each path once. Raises ValueError when there are none."""
    text = str(data)
    if Path(text).is_dir():
        sources = [Source(str(p), str(p)) for p in image_files(text)]
    elif text.endswith(TAR_SUFFIXES) or glob.has_magic(text):
        shards = sorted(glob.glob(text))
        if not shards:
            raise ValueError(f"no tar shards match {text!r}")
        sources = [s for shard in shards for s in tar_sources(shard)]
    elif Path(text).is_file():
        sources = list_file_sources(Path(text))
    else:
        raise ValueError(f"--data {text!r} is neither a folder, a text file of paths nor tar shards")
    if not sources:
        raise ValueError(f"no images found in {text!r} (image extensions: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return list({s.path: s for s in sources}.values())


def list_file_sources(listing: Path) -> list[Source]:
    """One path per line (blank lines and '#' comments skipped); relative paths are relative to the list."""
    sources = []
    for line in listing.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line) if Path(line).is_absolute() else listing.parent / line
            sources.append(Source(str(path), str(path)))
    return sources


def tar_sources(shard: str) -> list[Source]:
    """WebDataset samples of one shard: members grouped by key (the name up to the first dot of its file
    name), the image member chosen by extension; path = "shard.tar/key.ext". A sample without an image
    keeps its row, with the error."""
    samples: dict[str, list[tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:        # uncompressed: members are read in place by offset
            for member in tar:
                if member.isfile():
                    folder, _, name = member.name.rpartition("/")
                    key = f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0]
                    samples.setdefault(key, []).append(member)
    except tarfile.TarError as exc:
        return [Source(shard, shard, error=f"unreadable tar shard: {exc}")]
    sources = []
    for key, members in samples.items():
        image = next((m for m in members if Path(m.name).suffix.lower() in IMAGE_SUFFIXES), None)
        if image is None:
            sources.append(Source(f"{shard}/{key}", shard, error="sample has no image member (extensions: "
                                  f"{', '.join(sorted(IMAGE_SUFFIXES))})"))
        else:
            sources.append(Source(f"{shard}/{image.name}", shard, image.offset_data, image.size))
    return sources


def read_source(source: Source) -> bytes:
    with open(source.file, "rb") as f:
        if source.offset is None:
            return f.read()
        f.seek(source.offset)
        return f.read(source.size)
