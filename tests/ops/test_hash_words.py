"""hash_words (DAN tokeniser op): reference parity on real and adversarial text, opcheck,
torch.compile, thread-count invariance, validation."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effnlp_ext
from effnlp_ext._ops.hash_words import encode_texts
from effnlp_ext.reference import _fnv_token, hash_words_reference

CASES = [
    [],
    [""],
    ["", "", ""],
    ["   \t\n "],
    ["Hello, World!"],
    ["it 's a n't -lrb- film -rrb- ", "don't STOP", "Café déjà-vu naïve 😀!"],
    ["<br /><br />The end...", "a", "!!!", "x" * 1000],
    ["\x00\x01ctrl\x7fdel"],
]


@pytest.mark.parametrize("texts", CASES, ids=range(len(CASES)))
def test_matches_reference(texts):
    ids, offsets = effnlp_ext.hash_words(texts)
    ref_ids, ref_offsets = hash_words_reference(texts)
    assert ids.dtype == offsets.dtype == torch.int64
    assert torch.equal(ids, ref_ids) and torch.equal(offsets, ref_offsets)
    assert (ids >= 0).all()


def test_tokens_and_case():
    ids, offsets = effnlp_ext.hash_words(["The THE the, it's"])
    expected = [_fnv_token(t) for t in (b"the", b"the", b"the", b",", b"it's")]
    assert ids.tolist() == expected and offsets.tolist() == [0]


def test_known_fnv_value():
    # FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c; the id clears the top bit.
    ids, _ = effnlp_ext.hash_words(["A"])
    assert ids.item() == 0xAF63DC4C8601EC8C & 0x7FFFFFFFFFFFFFFF


def test_invalid_utf8_and_raw_bytes():
    raw = bytes([0xFF, 0xFE, 0x41, 0x20, 0xC3, 0x28, 0x2C])
    text = torch.tensor(list(raw), dtype=torch.uint8)
    ids, offsets = effnlp_ext.hash_words((text, torch.tensor([0, 3])))
    ref_ids, ref_offsets = hash_words_reference([raw[:3], raw[3:]])
    assert torch.equal(ids, ref_ids) and torch.equal(offsets, ref_offsets)


def test_non_contiguous_inputs():
    text, offsets = encode_texts(["ab cd", "ef"])
    spread = torch.zeros(2 * text.numel(), dtype=torch.uint8)
    spread[::2] = text
    off2 = torch.stack([offsets, offsets], 1)[:, 0]
    assert not spread[::2].is_contiguous() and not off2.is_contiguous()
    a = effnlp_ext.hash_words((spread[::2], off2))
    b = effnlp_ext.hash_words((text, offsets))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_thread_count_invariance():
    texts = [f"doc {i} " + "word " * (i % 37) + "!" for i in range(3000)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = effnlp_ext.hash_words(texts)
        torch.set_num_threads(2)
        two = effnlp_ext.hash_words(texts)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_real_data(data_dir):
    from effnlp_ext.data import load_task

    texts = [ex.text_a for ex in load_task("sst2", "dev", data_dir)][:300]
    a, b = effnlp_ext.hash_words(texts), hash_words_reference(texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].numel() > 300 * 10


def test_opcheck():
    text, offsets = encode_texts(["Hello, World!", "", "it 's fine"])
    torch.library.opcheck(torch.ops.effnlp.hash_words.default, (text, offsets))


def test_compile_parity():
    torch._dynamo.reset()
    text, offsets = encode_texts(["a b c", "d, e"])

    def f(t, o):
        ids, off = torch.ops.effnlp.hash_words(t, o)
        return ids.remainder(1000), off

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(text, offsets)
    want = f(text, offsets)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(3, dtype=torch.int64), torch.tensor([0])), "uint8"),
    ((torch.zeros(3, 2, dtype=torch.uint8), torch.tensor([0])), "1-D uint8"),
    ((torch.zeros(3, dtype=torch.uint8), torch.tensor([0.0])), "int64"),
    ((torch.zeros(3, dtype=torch.uint8), torch.tensor([1])), r"offsets\[0\] must be 0"),
    ((torch.zeros(3, dtype=torch.uint8), torch.tensor([0, 2, 1])), "non-decreasing"),
    ((torch.zeros(3, dtype=torch.uint8), torch.tensor([0, 5])), "within the 3 bytes"),
])
def test_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.effnlp.hash_words(*args)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=8))
def test_property_matches_reference(texts):
    a, b = effnlp_ext.hash_words(texts), hash_words_reference(texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
