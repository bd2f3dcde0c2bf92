"""The token-level matching of a rendered conversation against what a context holds (no model)."""

from __future__ import annotations

from parrot_core.chat.session import _drop_oldest_turn
from parrot_core.chat.transcript import Segment, common_prefix_len, match_segments


def chars(text: str, starts_sequence: bool) -> list[int]:
    """A toy tokenizer: one token per character; a sequence starts with a BOS (0)."""
    return ([0] if starts_sequence else []) + [ord(c) for c in text]


def seg(text: str, ids: list[int] | None = None) -> Segment:
    return Segment(text, tuple(ids if ids is not None else chars(text, False)))


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([5], [6]) == 0


def test_a_conversation_that_extends_the_segments_reuses_all_their_tokens():
    cached = (seg("SYS|"), seg("Q1|"), seg("reply", [900, 901]))  # a reply: ids as generated, not re-derived
    m = match_segments(cached, "SYS|Q1|reply|Q2|", 0, chars)
    assert m.reused == 4 + 3 + 2
    assert m.new_ids == chars("|Q2|", False)
    assert m.segments == (*cached, seg("|Q2|"))


def test_a_change_inside_a_segment_keeps_exactly_the_tokens_before_it():
    cached = (seg("SYS|"), seg("Q1 about cats|"), seg("reply", [900, 901]))
    m = match_segments(cached, "SYS|Q1 about dogs|reply|Q2|", 0, chars)
    assert m.reused == 4 + len("Q1 about ")  # up to the first changed character's token
    rest = "Q1 about dogs|reply|Q2|"
    assert m.new_ids == chars(rest, False)[len("Q1 about ") :]
    assert m.segments == (seg("SYS|"), seg(rest))  # the reply is tokenized again only because it follows the change


def test_a_reply_whose_text_changed_is_reused_only_up_to_the_change():
    cached = (seg("Q|"), seg("ab stop", chars("ab stop", False)))  # generated past what the message kept
    m = match_segments(cached, "Q|ab|Q2|", 0, chars)
    assert m.reused == 2 + 2
    assert m.new_ids == chars("|Q2|", False)


def test_the_first_piece_of_a_sequence_is_encoded_as_its_start():
    m = match_segments((), "SYS|", 0, chars)
    assert m.new_ids == [0, *chars("SYS|", False)]
    m = match_segments((seg("S", [0, ord("S")]),), "T", 0, chars)  # diverges at offset 0
    assert m.reused == 1 and m.new_ids == [ord("T")]
    m = match_segments((), "SYS|rest", 4, chars)  # after a shared root: no BOS
    assert m.new_ids == chars("rest", False)


def test_nothing_new_means_no_tokens_to_compute():
    cached = (seg("SYS|"),)
    m = match_segments(cached, "SYS|", 0, chars)
    assert (m.reused, m.new_ids, m.segments) == (4, [], cached)


def msg(role: str, content: str = "") -> dict[str, str]:
    return {"role": role, "content": content}


def test_dropping_the_oldest_turn_keeps_the_system_prompt_and_the_new_message():
    s, u1, a1, u2, a2, u3 = msg("system"), msg("user", "1"), msg("assistant"), msg("user", "2"), msg("assistant"), msg("user", "3")
    assert _drop_oldest_turn((s, u1, a1, u2, a2, u3)) == (s, u2, a2, u3)
    assert _drop_oldest_turn((s, u2, a2, u3)) == (s, u3)
    assert _drop_oldest_turn((s, u3)) is None
    assert _drop_oldest_turn((u1, a1, u3)) == (u3,)
    assert _drop_oldest_turn((u3,)) is None
    tool = msg("tool", "x")
    assert _drop_oldest_turn((s, u1, a1, tool, a1, u2, u3)) == (s, u2, u3)  # a turn runs up to the next user message
