"""Property tests: every proof the log produces verifies; any single-bit change breaks it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import ProofError, merkle

MAX_SIZE = 3000
_TREE = merkle.Tree(merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(MAX_SIZE))


def _naive_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 9162 2.1.1, recursively, as an independent reference."""
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_naive_root(leaves[:k]), _naive_root(leaves[k:]))


def _root_of(size: int) -> bytes:
    """The real root of a tree of `size` leaves (sizes beyond the sample tree get a unique fake root)."""
    return _TREE.root(size) if size <= MAX_SIZE else merkle.leaf_hash(b"beyond" + size.to_bytes(8, "big"))


def _flip(value: bytes, bit: int) -> bytes:
    data = bytearray(value)
    data[bit // 8 % len(data)] ^= 1 << (bit % 8)
    return bytes(data)


sizes = st.integers(min_value=1, max_value=MAX_SIZE)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=0, max_value=600))
def test_tree_root_matches_naive_recursive_definition(size: int) -> None:
    leaves = [_TREE.leaf(i) for i in range(size)]
    assert _TREE.root(size) == _naive_root(leaves)
    assert merkle.Tree.from_concatenated(b"".join(leaves)).root() == _naive_root(leaves)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), size=sizes)
def test_inclusion_proofs_verify_and_any_bit_flip_fails(data: st.DataObject, size: int) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    leaf, root = _TREE.leaf(index), _TREE.root(size)
    proof = merkle.inclusion_proof(index, size, _TREE)
    merkle.verify_inclusion(leaf, index, size, proof, root)

    bit = data.draw(st.integers(min_value=0, max_value=255))
    if proof:
        k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        bad = [*proof[:k], _flip(proof[k], bit), *proof[k + 1 :]]
        with pytest.raises(ProofError):
            merkle.verify_inclusion(leaf, index, size, bad, root)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaf, index, size, proof, _flip(root, bit))
    with pytest.raises(ProofError):
        merkle.verify_inclusion(_flip(leaf, bit), index, size, proof, root)
    shift = data.draw(st.integers(min_value=0, max_value=20))
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaf, index ^ (1 << shift), size, proof, root)
    # A size travels with its root (both are in the signed checkpoint): the proof must not
    # verify for another size and that size's root.
    other = size ^ (1 << shift)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaf, index, other, proof, _root_of(other))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), size2=sizes)
def test_consistency_proofs_verify_and_any_bit_flip_fails(data: st.DataObject, size2: int) -> None:
    size1 = data.draw(st.integers(min_value=1, max_value=size2))
    root1, root2 = _TREE.root(size1), _TREE.root(size2)
    proof = merkle.consistency_proof(size1, size2, _TREE)
    merkle.verify_consistency(size1, size2, proof, root1, root2)

    bit = data.draw(st.integers(min_value=0, max_value=255))
    if proof:
        k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        bad = [*proof[:k], _flip(proof[k], bit), *proof[k + 1 :]]
        with pytest.raises(ProofError):
            merkle.verify_consistency(size1, size2, bad, root1, root2)
    with pytest.raises(ProofError):
        merkle.verify_consistency(size1, size2, proof, _flip(root1, bit), root2)
    with pytest.raises(ProofError):
        merkle.verify_consistency(size1, size2, proof, root1, _flip(root2, bit))
    shift = data.draw(st.integers(min_value=0, max_value=20))
    other1, other2 = size1 ^ (1 << shift), size2 ^ (1 << shift)
    with pytest.raises(ProofError):
        merkle.verify_consistency(other1, size2, proof, _root_of(other1), root2)
    with pytest.raises(ProofError):
        merkle.verify_consistency(size1, other2, proof, root1, _root_of(other2))


def test_malformed_inputs_raise_proof_error_and_nothing_else() -> None:
    leaf, root = _TREE.leaf(3), _TREE.root(10)
    proof = merkle.inclusion_proof(3, 10, _TREE)
    bad_calls = [
        lambda: merkle.verify_inclusion(leaf[:31], 3, 10, proof, root),
        lambda: merkle.verify_inclusion(leaf, 3, 10, [*proof[:-1], b""], root),
        lambda: merkle.verify_inclusion(leaf, 3, 10, proof, root + b"\x00"),
        lambda: merkle.verify_inclusion(leaf, 10, 10, proof, root),
        lambda: merkle.verify_inclusion(leaf, -1, 10, proof, root),
        lambda: merkle.verify_inclusion(leaf, 3, 1 << 64, proof, root),
        lambda: merkle.verify_inclusion(leaf, 3, 10, [*proof, proof[0]], root),
        lambda: merkle.verify_inclusion(leaf, 3, 10, proof[:-1], root),
        lambda: merkle.verify_consistency(0, 10, [root], root, root),
        lambda: merkle.verify_consistency(10, 5, [], root, root),
        lambda: merkle.verify_consistency(5, 10, [], _TREE.root(5), root),
        lambda: merkle.verify_consistency(10, 10, [root], root, root),
        lambda: merkle.verify_consistency(5, 10, merkle.consistency_proof(5, 10, _TREE), b"short", root),
        lambda: merkle.inclusion_proof(10, 10, _TREE),
        lambda: merkle.consistency_proof(0, 10, _TREE),
    ]
    for call in bad_calls:
        with pytest.raises(ProofError):
            call()
