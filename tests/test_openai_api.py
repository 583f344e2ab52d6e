import pytest

from data import get_tokenizer
from generate import encode_prompts
from serve.openai_api import ApiError, choice, parse_request


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_last_user_message_is_the_instruction_and_system_text_goes_in_front():
    tok = get_tokenizer()
    body = {"messages": [{"role": "system", "content": "Be brief."}, user("first"),
                         {"role": "developer", "content": "Use English."},
                         {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                      {"type": "text", "text": "color."}]}]}
    request = parse_request(body, True, tok, 1024)
    assert request.prompt == tok.encode("Be brief.\nUse English.\n\n") + \
        encode_prompts([{"instruction": "Name a color."}], tok)[0]
    assert tok.decode(request.prompt).startswith("Be brief.\nUse English.\n\nBelow is an")
    phi3 = parse_request({"messages": [user("Hi")]}, True, tok, 1024, style="phi3")
    assert tok.decode(phi3.prompt) == "<|user|>\nHi\n<|assistant|>:\n"


def test_default_answer_length_fills_what_the_context_leaves():
    tok = get_tokenizer()
    body = {"prompt": [1, 2, 3, 4, 5]}  # 5 tokens: a 12-token context leaves 7
    assert parse_request(body, False, tok, 12).max_tokens == 7
    assert parse_request(body, False, tok, 12, default_max_tokens=3).max_tokens == 3
    assert parse_request({**body, "max_completion_tokens": 7}, False, tok, 12).max_tokens == 7
    with pytest.raises(ApiError, match="from 1 to 7") as e:
        parse_request({**body, "max_tokens": 8}, False, tok, 12)
    assert e.value.status == 400 and e.value.param == "max_tokens"
    with pytest.raises(ApiError, match="the prompt is 5 tokens"):
        parse_request(body, False, tok, 5)  # no room for even one new token


def test_sampling_fields_reach_the_request():
    tok = get_tokenizer()
    body = {"prompt": "Hello", "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 42}
    request = parse_request(body, False, tok, 64)
    assert (request.temperature, request.top_p, request.stop) == (0.5, 0.9, ["\n"])
    assert request.generator.initial_seed() == 42
    assert parse_request({"prompt": "Hello"}, False, tok, 64).temperature == 1.0  # OpenAI's default


def test_choice_shapes():
    assert choice(True, "hi", "stop", False) == {
        "index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    assert choice(True, "hi", None, True) == {"index": 0, "delta": {"content": "hi"},
                                               "finish_reason": None}
    assert choice(True, None, "length", True)["delta"] == {}
    assert choice(False, None, "length", True) == {"index": 0, "text": "", "logprobs": None,
                                                   "finish_reason": "length"}
