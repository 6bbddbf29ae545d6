import pytest

from teacher_server.alignment.packed_vocab import PackedVocab
from testkit import tokenizers as T


@pytest.mark.parametrize("name", ["gpt2", "tekken"])
def test_a_packed_real_vocabulary_is_the_dict(name):
    if T.missing_reason(name):
        pytest.skip(T.missing_reason(name))
    vocab = T.load(name).get_vocab()
    packed = PackedVocab.of(vocab)
    assert len(packed) == len(vocab)
    assert all(packed[string] == index for string, index in vocab.items())
    assert dict(packed.items()) == vocab
    assert "not one of its tokens ☃" not in packed and packed.get(7) is None


def test_strings_that_share_a_hash_and_lone_surrogates():
    # zlib.crc32(b"w29685295") == zlib.crc32(b"w32060020")
    packed = PackedVocab.of({"w29685295": 5, "w32060020": 9, "\ud800": 2, "": 0})
    assert packed["w29685295"] == 5 and packed["w32060020"] == 9
    assert packed["\ud800"] == 2 and packed[""] == 0
    assert "w29685296" not in packed
    assert set(packed) == {"w29685295", "w32060020", "\ud800", ""}
