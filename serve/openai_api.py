"""The OpenAI wire format for serve/server.py: a /v1/chat/completions or /v1/completions JSON body
becomes a batching.Request (`parse_request`, every field checked: `ApiError` 400 naming it), and
`choice`, `usage`, `error_body` build the replies and streamed chunks. No HTTP and no model here.
"""
import json
from typing import Any

import torch

from serve.batching import Request
from generate import check_sampling, encode_prompts


class ApiError(Exception):
    """A request the server refuses: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


# ---- requests in the OpenAI wire format -> Request ----------------------------------------------
JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
              list: "an array", dict: "an object"}


def get(body: dict, name: str, types: tuple, default=None) -> Any:
    """body[name] checked against `types` (JSON null counts as absent); 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
        wanted = " or ".join(JSON_TYPES[t] for t in types)
        raise ApiError(400, f"'{name}' must be {wanted}, got {json.dumps(value)[:40]}", name)
    return value


def message_text(message, i: int) -> tuple[str, str]:
    """(role, text) of messages[i]; content is a string or a list of {"type": "text"} parts."""
    where, roles = f"messages[{i}]", ("system", "developer", "user", "assistant")
    if not isinstance(message, dict) or message.get("role") not in roles:
        raise ApiError(400, f"{where} must be an object with role {', '.join(roles)}", where)
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string (or text parts)", where)
    return message["role"], content


def chat_prompt(body: dict, tokenizer, style: str) -> list[int]:
    """The last user message is the instruction, in the trained prompt style; system text (if
    any) goes in front. Earlier turns are not shown: the model was trained on single turns."""
    messages = get(body, "messages", (list,))
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    users = [text for role, text in turns if role == "user"]
    if not users:
        raise ApiError(400, "'messages' holds no user message", "messages")
    system = "\n".join(text for role, text in turns if role in ("system", "developer"))
    head = tokenizer.encode(system + "\n\n") if system else []
    return head + encode_prompts([{"instruction": users[-1]}], tokenizer, style)[0]


def completion_prompt(body: dict, tokenizer) -> list[int]:
    """`prompt` as raw text (no template) or as token ids, alone or as a list of one."""
    prompt = get(body, "prompt", (str, list))
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(
            type(t) is int and 0 <= t < tokenizer.n_vocab for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string or one list of token ids", "prompt")


def parse_request(body: dict, chat: bool, tokenizer, context_length: int, style: str = "alpaca",
                  default_max_tokens: int = 256, device="cpu") -> Request:
    """A Request for the engine (`chat`: a /v1/chat/completions body, else /v1/completions), or
    a 400 naming the first bad field. The answer's default length fills the context up to
    `default_max_tokens`; `device` is where its sampling generator lives."""
    prompt = chat_prompt(body, tokenizer, style) if chat else completion_prompt(body, tokenizer)
    room = context_length - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; the model's context holds "
                            f"{context_length} (prompt and answer together)", "messages")
    max_tokens = get(body, "max_completion_tokens", (int,))
    max_tokens = get(body, "max_tokens", (int,)) if max_tokens is None else max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= room:
        raise ApiError(400, f"'max_tokens' must be from 1 to {room} (context {context_length}"
                            f" - prompt {len(prompt)} tokens), got {max_tokens}", "max_tokens")
    if get(body, "n", (int,), 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "n")
    stop = get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or up to 4 of them", "stop")
    seed = get(body, "seed", (int,))
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be from 0 to 2**63 - 1, got {seed}", "seed")
    temperature = get(body, "temperature", (int, float), 1.0)
    top_p = get(body, "top_p", (int, float))
    if not temperature <= 2:  # OpenAI's range; a huge integer would not even convert to float
        raise ApiError(400, f"'temperature' must be from 0 to 2, got {str(temperature)[:20]}",
                       "temperature")
    request = Request(prompt, max_tokens or min(default_max_tokens, room), float(temperature),
                      top_p, stop)
    try:
        check_sampling(request.max_tokens, request.temperature, None, top_p)
    except ValueError as e:
        raise ApiError(400, str(e), "top_p" if "top_p" in str(e) else "temperature") from None
    request.generator = torch.Generator(device)
    if seed is None:
        request.generator.seed()  # a fresh random seed
    else:
        request.generator.manual_seed(seed)
    return request


# ---- replies in the OpenAI wire format ----------------------------------------------------------
def choice(chat: bool, text: str | None, reason: str | None, stream: bool) -> dict:
    """choices[0] of a reply: a message or a streamed delta (chat), or text (completions)."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    if not stream:
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": reason}
    return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy",
            500: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
