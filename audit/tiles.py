"""Tile coordinates of the C2SP tiled transparency log layout (c2sp.org/tlog-tiles).

Hash tiles `tile/<L>/<N>[.p/<W>]` hold up to 256 consecutive tree hashes at height 8*L;
entry bundles `tile/entries/<N>[.p/<W>]` hold up to 256 entries, each prefixed by its
length as a big-endian uint16. `N` is written in 3-digit path elements, all but the last
prefixed with `x` (1234067 -> `x001/x234/067`). Pure path and size arithmetic only.
"""

from __future__ import annotations

from collections.abc import Iterator

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_ENTRY_SIZE = 0xFFFF


def encode_index(n: int) -> str:
    """Tile index as zero-padded 3-digit path elements: 1234067 -> 'x001/x234/067'."""
    if n < 0:
        raise ValueError(f"tile index must be non-negative, got {n}")
    parts = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        parts.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(parts))


def _suffix(width: int) -> str:
    if not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"tile width must be in [1, {TILE_WIDTH}], got {width}")
    return "" if width == TILE_WIDTH else f".p/{width}"


def tile_path(level: int, n: int, width: int = TILE_WIDTH) -> str:
    """Path of hash tile `n` at `level`, partial when `width` < 256."""
    if not 0 <= level <= 63:
        raise ValueError(f"tile level must be in [0, 63], got {level}")
    return f"tile/{level}/{encode_index(n)}{_suffix(width)}"


def bundle_path(n: int, width: int = TILE_WIDTH) -> str:
    """Path of entry bundle `n`, partial when `width` < 256."""
    return f"tile/entries/{encode_index(n)}{_suffix(width)}"


def level_count(size: int, level: int) -> int:
    """Number of hashes at tile level `level` in a tree of `size` leaves: complete subtrees of 256**level."""
    return size >> (TILE_HEIGHT * level)


def tiles(size: int) -> Iterator[tuple[int, int, int]]:
    """Every hash tile of a tree of `size` leaves as (level, index, width), lowest level first."""
    level = 0
    while (count := level_count(size, level)) > 0:
        for n in range(count // TILE_WIDTH):
            yield level, n, TILE_WIDTH
        if count % TILE_WIDTH:
            yield level, count // TILE_WIDTH, count % TILE_WIDTH
        level += 1


def bundles(size: int) -> Iterator[tuple[int, int]]:
    """Every entry bundle of a log of `size` entries as (index, width)."""
    for n in range(size // TILE_WIDTH):
        yield n, TILE_WIDTH
    if size % TILE_WIDTH:
        yield size // TILE_WIDTH, size % TILE_WIDTH
