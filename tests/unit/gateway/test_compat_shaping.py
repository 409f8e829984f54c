"""Sampled tokens → OpenAI/Anthropic choices: stops cut the text, EOS never shows, stream pieces join to the text."""

from __future__ import annotations

import math

from tinkerkube_contract.pod_api import DecodedText
from tinkerkube_gateway.compat.backend import _generation, _sample_request, _token_budget
from tinkerkube_gateway.compat.increments import pieces
from tinkerkube_gateway.compat.shaping import NO_LOGPROB, choice, prompt_tokens, top_ids
from tinkerkube_gateway.compat.values import Generation, Sampled, SampleSpec
from tinkerkube_gateway.errors import InvalidRequest

EOS = 2


def _decoded(pieces: list[str], special: list[bool]) -> DecodedText:
    text = "".join(p for p, s in zip(pieces, special, strict=True) if not s)
    return DecodedText(text=text, pieces=pieces, special=special)


def test_a_stop_string_cuts_the_text_before_it_and_names_itself() -> None:
    seq = Sampled(tokens=[10, 11, 12], logprobs=[-1.0, -2.0, -3.0], top=None, stopped=True)
    decoded = _decoded(["Hello", " wor", "ld!\n"], [False, False, False])
    c = choice(seq, decoded, ("ld!", "zzz"), {})
    assert (c.text, c.finish_reason, c.stop_sequence) == ("Hello wor", "stop", "ld!")
    assert [t.token for t in c.tokens] == ["Hello", " wor"]  # the token holding the stop string is not kept
    assert "".join(p.text for p in pieces(c.text, 0, c.tokens)) == c.text
    assert c.completion_tokens == 3  # every sampled token counts


def test_the_earliest_of_several_stops_wins() -> None:
    seq = Sampled(tokens=[1, 2], logprobs=[-1.0, -1.0], top=None, stopped=True)
    c = choice(seq, _decoded(["abXcdY", "e"], [False, False]), ("Y", "X"), {})
    assert (c.text, c.stop_sequence) == ("ab", "X")


def test_eos_ends_with_stop_but_never_shows_in_text_tokens_or_chunks() -> None:
    seq = Sampled(tokens=[10, 11, EOS], logprobs=[-1.0, -2.0, -0.5], top=None, stopped=True)
    c = choice(seq, _decoded(["Hi", " there", "<|im_end|>"], [False, False, True]), (), {})
    assert (c.text, c.finish_reason, c.stop_sequence) == ("Hi there", "stop", None)
    assert [t.token for t in c.tokens] == ["Hi", " there"]
    assert [p.text for p in pieces(c.text, 0, c.tokens)] == ["Hi", " there"]
    assert [t.offset for t in c.tokens] == [0, 2]


def test_max_tokens_is_length() -> None:
    seq = Sampled(tokens=[10, 11], logprobs=[-1.0, -2.0], top=None, stopped=False)
    assert choice(seq, _decoded(["a", "b"], [False, False]), (), {}).finish_reason == "length"


def test_stream_pieces_always_join_to_the_text_even_when_token_pieces_disagree_with_it() -> None:
    """A character split over two tokens decodes as two replacement characters, one in the text."""
    seq = Sampled(tokens=[1, 2, 3], logprobs=[-1.0, -1.0, -1.0], top=None, stopped=False)
    decoded = DecodedText(text="é!", pieces=["\ufffd", "\ufffd", "!"], special=[False, False, False])
    c = choice(seq, decoded, (), {})
    cut = pieces(c.text, 0, c.tokens)
    assert "".join(p.text for p in cut) == "é!"
    assert [p.token for p in cut] == list(c.tokens)  # one piece per kept token, each with its token


def test_non_finite_logprobs_become_a_finite_floor_and_top_ids_get_their_names() -> None:
    seq = Sampled(tokens=[5], logprobs=[-math.inf], top=[[(5, -math.inf), (6, -0.1)]], stopped=False)
    c = choice(seq, _decoded(["x"], [False]), (), {5: "x", 6: "y"})
    assert c.tokens[0].logprob == NO_LOGPROB
    assert c.tokens[0].top == (("x", NO_LOGPROB), ("y", -0.1))
    assert top_ids(Generation([1], [seq])) == [5, 6]


def test_prompt_tokens_for_echo_have_no_logprob_at_the_first_position() -> None:
    gen = Generation(prompt=[7, 8, 9], sequences=[], prompt_logprobs=[None, -1.5, -2.5],
                     prompt_top=[[(0, -99999.0)], [(8, -1.5)], [(3, -0.2)]])
    tokens = prompt_tokens(gen, _decoded(["a", "bc", "d"], [False, False, False]), {8: "bc", 3: "z"})
    assert [(t.token, t.logprob, t.offset) for t in tokens] == [("a", None, 0), ("bc", -1.5, 1), ("d", -2.5, 3)]
    assert tokens[0].top == () and tokens[2].top == (("z", -0.2),)


def test_the_token_budget_is_the_rest_of_the_context_and_more_is_a_400() -> None:
    assert _token_budget(10, None, 100) == 90
    assert _token_budget(10, 5, 100) == 5
    assert _token_budget(10, None, None) > 0
    for prompt, asked in ((100, None), (10, 91), (200, 1)):
        try:
            _token_budget(prompt, asked, 100)
        except InvalidRequest:
            continue
        raise AssertionError(f"prompt {prompt} + max_tokens {asked} over a context of 100 was accepted")


def test_the_sample_request_keeps_eos_stopping_and_maps_top_p_zero_to_greedy() -> None:
    raw = _sample_request("s:sample:0", [1, 2], SampleSpec(n=2, top_p=0.0, temperature=0.7, top_k=0), 9)
    params = raw["sampling_params"]
    assert params["stop"] is None  # never [] (that would disable EOS)
    assert (params["temperature"], params["top_p"], params["top_k"], params["max_tokens"]) == (0.0, 1.0, -1, 9)
    assert raw["num_samples"] == 2 and raw["prompt"]["chunks"][0]["tokens"] == [1, 2]
    assert _sample_request("s", [1], SampleSpec(stop=("a",)), 1)["sampling_params"]["stop"] == ["a"]


def test_the_trainers_protobuf_response_decodes_into_typed_values() -> None:
    import numpy as np
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.SampleResponse()
    msg.sequences.add(stop_reason=pb.STOP_REASON_STOP, tokens=np.asarray([4, 5], "<i4").tobytes(),
                      logprobs=np.asarray([-1.0, -2.0], "<f4").tobytes())
    msg.prompt_logprobs = np.asarray([np.nan, -3.0], "<f4").tobytes()
    gen = _generation([1, 2], msg.SerializeToString())
    assert gen.sequences == [Sampled([4, 5], [-1.0, -2.0], None, True)]
    assert gen.prompt_logprobs == [None, -3.0]
