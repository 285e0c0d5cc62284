"""The text engine's pure parts: incremental detokenization and stop strings (real tokenizer)."""

from __future__ import annotations

import pytest

from stamen.api.engine import TextTracker

TEXTS = [
    "The answer is forty two. Héllo wörld 😊🌍 ok  double  spaces\n\nnew para",
    "ünïcödé 你好世界 🎉🎉 end",
]


@pytest.fixture(scope="module")
def tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode_at_every_length(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for n in range(1, len(ids) + 1):
        tracker = TextTracker(tok)
        shown = "".join(tracker.add(i) for i in ids[:n]) + tracker.finish()
        # a cut inside a multi-byte character shows no half character
        assert shown == tok.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd")
        assert tracker.count == n and tracker.finish_reason is None


def test_end_of_sequence_finishes_and_is_counted(tok):
    ids = tok("Paris.", add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tok, eos_token_ids=(tok.eos_token_id,))
    shown = "".join(tracker.add(i) for i in [*ids, tok.eos_token_id, ids[0]])
    assert shown == "Paris." and tracker.finish_reason == "stop" and tracker.count == len(ids) + 2


def test_stop_strings_cut_and_possible_prefixes_are_held_back(tok):
    ids = tok("The answer is forty two.", add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tok, stop=("forty",))
    shown = [tracker.add(i) for i in ids]
    assert "".join(shown) == "The answer is " and tracker.finish_reason == "stop"
    # "fort night" never matches, but "fort" was held back until it stopped looking like it
    tracker = TextTracker(tok, stop=("fort night",))
    shown = "".join(tracker.add(i) for i in ids) + tracker.finish()
    assert shown == "The answer is forty two." and tracker.finish_reason is None
    # a stop string split across tokens
    tracker = TextTracker(tok, stop=("is for",))
    assert "".join(tracker.add(i) for i in ids) == "The answer " and tracker.finish_reason == "stop"
