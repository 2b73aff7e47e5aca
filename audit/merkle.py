"""Merkle tree hashing, proofs and proof verification for transparency logs.

Implements the SHA-256 Merkle tree of RFC 9162 section 2.1 (identical to RFC 6962):
leaf and node hashes (2.1.1), inclusion proofs (2.1.3) and consistency proofs (2.1.4).
Verification follows transparency-dev/merkle `proof/verify.go`: hashes of the wrong
length, indices beyond the tree, a consistency proof from size 0, and proofs with
missing or trailing hashes are errors. Every failed check raises `ProofError`.

Everything here is pure: bytes in, bytes out. `Tree` holds hashes in memory; where
they are stored on disk is the caller's business.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol

from audit.errors import ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(entry: bytes) -> bytes:
    """MTH of a one-entry tree: SHA-256(0x00 || entry) (RFC 9162 2.1.1)."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Interior node hash: SHA-256(0x01 || left || right) (RFC 9162 2.1.1)."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): where RFC 9162 splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


def hash_level(level: bytes | bytearray | memoryview) -> bytes:
    """Hash pairs of adjacent 32-byte hashes into the level above; an odd last hash is dropped."""
    level = bytes(level)
    sha = _sha256
    step = 2 * HASH_SIZE
    return b"".join([sha(b"\x01" + level[i : i + step]).digest() for i in range(0, len(level) - step + 1, step)])


class SubtreeHasher(Protocol):
    """Anything that can give MTH(D[start:end]) for the ranges RFC 9162 proofs need."""

    def subtree_hash(self, start: int, end: int) -> bytes: ...


class Tree:
    """Hashes of a Merkle tree held in memory, one byte string per height.

    `levels[h]` holds, back to back, the hash of every complete subtree of 2**h leaves
    that is aligned on a multiple of 2**h; level 0 holds the leaf hashes. Any subtree
    hash RFC 9162 needs is then at most one hash per height away, so proofs and roots
    for any past size cost O(log n). Memory is about 64 bytes per leaf.
    """

    __slots__ = ("levels",)

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self.levels: list[bytearray] = [bytearray()]
        self.extend(leaf_hashes)

    @classmethod
    def from_concatenated(cls, leaf_hashes: bytes | bytearray) -> Tree:
        """Build a tree from leaf hashes given back to back (32 bytes each)."""
        tree = cls()
        tree.extend_concatenated(leaf_hashes)
        return tree

    @classmethod
    def from_levels(cls, levels: Sequence[bytes | bytearray]) -> Tree:
        """Build a tree from its lowest levels, computed elsewhere, and hash the rest.

        `levels[h]` must hold every complete aligned subtree hash of height h (as
        `Tree.levels` does); this lets callers hash disjoint tile-aligned ranges in
        parallel and join the results.
        """
        if not levels:
            return cls()
        tree = cls()
        tree.levels = [bytearray(level) for level in levels]
        for h in range(1, len(tree.levels)):
            if len(tree.levels[h]) != len(tree.levels[h - 1]) // (2 * HASH_SIZE) * HASH_SIZE:
                raise ValueError(f"level {h} has the wrong number of hashes for level {h - 1}")
        while len(tree.levels[-1]) >= 2 * HASH_SIZE:
            tree.levels.append(bytearray(hash_level(tree.levels[-1])))
        return tree

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self.levels[0]) // HASH_SIZE

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash, completing every subtree it closes."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes, got {len(leaf)}")
        self.extend_concatenated(leaf)

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Add leaf hashes in order."""
        leaves = list(leaf_hashes)
        if any(len(leaf) != HASH_SIZE for leaf in leaves):
            raise ValueError(f"leaf hashes must be {HASH_SIZE} bytes each")
        self.extend_concatenated(b"".join(leaves))

    def extend_concatenated(self, leaf_hashes: bytes | bytearray) -> None:
        """Add leaf hashes given back to back, hashing every pair they complete, level by level."""
        if len(leaf_hashes) % HASH_SIZE:
            raise ValueError("concatenated leaf hashes must be a multiple of 32 bytes")
        levels = self.levels
        new: bytes | bytearray = leaf_hashes
        h = 0
        while new:
            level = levels[h]
            old_count = len(level) // HASH_SIZE
            level += new
            # Pairs (2i, 2i+1) with i >= old_count // 2 were incomplete before this call.
            start = old_count // 2 * 2 * HASH_SIZE
            end = len(level) // (2 * HASH_SIZE) * 2 * HASH_SIZE
            if end <= start:
                return
            new = hash_level(memoryview(level)[start:end])
            h += 1
            if h == len(levels):
                levels.append(bytearray())

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} is outside a tree of size {self.size}")
        return bytes(self.levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def subtree_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a node of the RFC 9162 tree (start aligned to its left subtree)."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range [{start}, {end}) is outside a tree of size {self.size}")
        return self._mth(start, end)

    def _mth(self, start: int, end: int) -> bytes:
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            h = n.bit_length() - 1
            i = (start >> h) * HASH_SIZE
            return bytes(self.levels[h][i : i + HASH_SIZE])
        k = _split(n)
        return node_hash(self._mth(start, start + k), self._mth(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """The tree head of the first `size` leaves (all leaves when omitted)."""
        return self.subtree_hash(0, self.size if size is None else size)


def _as_hasher(hashes: SubtreeHasher | Sequence[bytes]) -> SubtreeHasher:
    if hasattr(hashes, "subtree_hash"):
        return hashes  # type: ignore[return-value]
    return Tree(hashes)  # type: ignore[arg-type]


def root(leaf_hashes: Iterable[bytes]) -> bytes:
    """MTH of the tree with these leaf hashes, in order; SHA-256 of nothing for no leaves."""
    return Tree(leaf_hashes).root()


def inclusion_proof(index: int, size: int, hashes: SubtreeHasher | Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 2.1.3.1, from the leaf's sibling up to the root's child.

    `hashes` is a `Tree` (or anything with `subtree_hash`) or the list of leaf hashes.
    """
    if not 0 <= index < size:
        raise ProofError(f"index {index} is outside a tree of size {size}")
    hasher = _as_hasher(hashes)
    proof: list[bytes] = []
    start, end = 0, size
    # Walk down from the root, collecting the sibling of every node on the path; the
    # proof lists them leaf first.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            proof.append(hasher.subtree_hash(start + k, end))
            end = start + k
        else:
            proof.append(hasher.subtree_hash(start, start + k))
            start += k
    proof.reverse()
    return proof


def consistency_proof(size1: int, size2: int, hashes: SubtreeHasher | Sequence[bytes]) -> list[bytes]:
    """PROOF(size1, D[0:size2]) of RFC 9162 2.1.4.1; empty when size1 == size2."""
    if not 0 < size1 <= size2:
        raise ProofError(f"no consistency proof from size {size1} to size {size2}")
    hasher = _as_hasher(hashes)
    proof: list[bytes] = []
    start, end, m, known = 0, size2, size1, True
    # SUBPROOF(m, D[start:end], known), unrolled: every step adds one sibling hash.
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            proof.append(hasher.subtree_hash(start + k, end))
            end = start + k
        else:
            proof.append(hasher.subtree_hash(start, start + k))
            start, m, known = start + k, m - k, False
    if not known:
        proof.append(hasher.subtree_hash(start, end))
    proof.reverse()
    return proof


def _check_hash(name: str, value: bytes) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise ProofError(f"{name} must be a {HASH_SIZE}-byte hash, got {got}")


def _check_proof(proof: Sequence[bytes]) -> None:
    for i, h in enumerate(proof):
        _check_hash(f"proof hash {i}", h)


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ProofError(f"{name} must be an integer in [0, 2**64), got {value!r}")


def _decomp_incl_proof(index: int, size: int) -> tuple[int, int]:
    """Split an inclusion proof's length into inner hashes and right-border hashes."""
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1 == 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def root_from_inclusion_proof(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to; raises ProofError if the proof is malformed."""
    _check_size("index", index)
    _check_size("size", size)
    if index >= size:
        raise ProofError(f"index {index} is beyond tree size {size}")
    _check_hash("leaf hash", leaf_hash)
    _check_proof(proof)
    inner, border = _decomp_incl_proof(index, size)
    if len(proof) != inner + border:
        raise ProofError(f"inclusion proof has {len(proof)} hashes, want {inner + border}")
    res = _chain_inner(bytes(leaf_hash), proof[:inner], index)
    return _chain_border_right(res, proof[inner:])


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` leaves with head `root`."""
    _check_hash("root", root)
    calculated = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if calculated != root:
        raise ProofError(
            f"inclusion proof for index {index} in size {size} leads to root "
            f"{calculated.hex()}, want {bytes(root).hex()}"
        )


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Check that the tree of `size2` leaves with head `root2` extends the one of `size1` with `root1`."""
    _check_size("size1", size1)
    _check_size("size2", size2)
    _check_hash("root1", root1)
    _check_hash("root2", root2)
    _check_proof(proof)
    if size2 < size1:
        raise ProofError(f"size2 ({size2}) < size1 ({size1})")
    if size1 == size2:
        if proof:
            raise ProofError(f"sizes are equal ({size1}) but the proof has {len(proof)} hashes")
        if root1 != root2:
            raise ProofError(f"sizes are equal ({size1}) but the roots differ")
        return
    if size1 == 0:
        raise ProofError("a consistency proof from an empty tree is meaningless")
    if not proof:
        raise ProofError(f"empty consistency proof from size {size1} to {size2}")

    inner, border = _decomp_incl_proof(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1
    inner -= shift
    # The proof starts with the hash of the largest complete subtree ending at size1,
    # unless size1 itself is a power of two: then that subtree is root1.
    if size1 == 1 << shift:
        seed, start = bytes(root1), 0
    else:
        seed, start = proof[0], 1
    if len(proof) != start + inner + border:
        raise ProofError(f"consistency proof has {len(proof)} hashes, want {start + inner + border}")
    proof = proof[start:]
    mask = (size1 - 1) >> shift

    hash1 = _chain_inner_right(seed, proof[:inner], mask)
    hash1 = _chain_border_right(hash1, proof[inner:])
    if hash1 != root1:
        raise ProofError(f"consistency proof does not lead to root1 (size {size1})")
    hash2 = _chain_inner(seed, proof[:inner], mask)
    hash2 = _chain_border_right(hash2, proof[inner:])
    if hash2 != root2:
        raise ProofError(f"consistency proof does not lead to root2 (size {size2})")
