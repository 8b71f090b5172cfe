"""Token ids of chat turns, for a conversation whose context lives in the pool as tokens.

A resumed agent's context is the exact tokens it has seen and said (``AgentBlocks.token_ids``), not a
list of messages to re-render: re-tokenizing a reply can differ from the tokens the model produced.
So a new turn is rendered on its own, as the text the chat template puts after an assistant reply's
end token, and appended. Models without a chat template (Gemma 3 270M is a base model) get a plain
``User:`` / ``Assistant:`` transcript.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Set

from semantic.domain.errors import InvalidRequestError
from semantic.domain.request_checks import check_text, int_items, is_int, is_int_vector, length, shown

_PLAIN_TURN = "\nUser: {message}\nAssistant:"
_PROBE_REPLY = "\x00reply\x00"  # assistant content that no template writes by itself


def first_turn(tokenizer, message: str, system: Optional[str] = None) -> List[int]:
    """The prompt of a conversation's first user message, with the generation prompt."""
    _check_tokenizer(tokenizer)
    _check_text("message", message)
    if system is not None:
        _check_text("system", system)
    if not getattr(tokenizer, "chat_template", None):
        return _encoded(tokenizer, ((system + "\n") if system else "") + _PLAIN_TURN.format(message=message).lstrip())
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    ids = _apply_template(tokenizer, messages)
    if not isinstance(ids, (list, tuple)):
        raise InvalidRequestError(f"the chat template gave {type(ids).__name__}, not a list of token ids")
    return list(ids)


def next_turn(tokenizer, context: Sequence[int], message: str) -> List[int]:
    """Tokens to append to ``context`` (which ends with the assistant's reply) for a new user message."""
    _check_tokenizer(tokenizer)
    _check_text("message", message)
    last = _last_token(context)
    if not getattr(tokenizer, "chat_template", None):
        return _encoded(tokenizer, _PLAIN_TURN.format(message=message), add_special_tokens=False)
    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE_REPLY},
                    {"role": "user", "content": message}]
    rendered = _apply_template(tokenizer, conversation, tokenize=False)
    end = getattr(tokenizer, "eos_token", None)
    if not isinstance(rendered, str) or _PROBE_REPLY not in rendered or not end:
        raise InvalidRequestError(
            "the chat template does not write an assistant's reply into the conversation, or the tokenizer has no "
            "end token; cannot append turns")
    after_reply = rendered[rendered.index(_PROBE_REPLY) + len(_PROBE_REPLY):]
    if not after_reply.startswith(end):
        raise InvalidRequestError(
            f"the chat template does not end an assistant reply with the end token {end!r} (Gemma-it and Phi-3 "
            "templates end turns with a token of their own); cannot append turns")
    suffix = after_reply[len(end):]
    return _encoded(tokenizer, suffix if last is not None and last in _end_ids(tokenizer) else end + suffix,
                    add_special_tokens=False)


def _encoded(tokenizer, text: str, **options) -> List[int]:
    """``tokenizer.encode(text, **options)`` as a list of ints; a typed error for a tokenizer whose encode takes
    other arguments (TypeError before) or gives something else (a raw ``tokenizers.Tokenizer``'s Encoding)."""
    try:
        ids = tokenizer.encode(text, **options)
    except TypeError as exc:
        raise InvalidRequestError(f"the tokenizer's encode cannot take {text!r:.40} with {options or 'no options'} "
                                  f"({exc}); pass mlx-lm's or a transformers tokenizer") from None
    if not isinstance(ids, (list, tuple)):
        raise InvalidRequestError(f"the tokenizer's encode gave {type(ids).__name__}, not a list of token ids; pass "
                                  "mlx-lm's or a transformers tokenizer")
    return int_items(list(ids), "the token ids the tokenizer's encode gave")


def _check_tokenizer(tokenizer) -> None:
    if isinstance(tokenizer, (str, bytes)) or not callable(getattr(tokenizer, "encode", None)):
        raise InvalidRequestError(f"tokenizer must be the model's tokenizer (with encode, as mlx_lm.load returns), "
                                  f"got {type(tokenizer).__name__}")


def _check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(f"the {name} must be a str, not {type(value).__name__}")
    check_text(name, value)


def _last_token(context) -> Optional[int]:
    """The last of the context's token ids, None if it has none; a typed error for what is not token ids (an
    array's truth value, a set's index or an unhashable item raised ValueError or TypeError)."""
    if context is None:
        return None
    if not isinstance(context, (list, tuple, range)) and not is_int_vector(context):
        raise InvalidRequestError(
            f"the context must be token ids (a list, tuple or 1-d integer array), got {type(context).__name__}")
    if not length(context, "the context"):
        return None
    last = context[-1]
    if not is_int(last):
        raise InvalidRequestError(f"the context's token ids must be ints, got {type(last).__name__} {shown(last)}")
    return int(last)


def _apply_template(tokenizer, messages, **options):
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **options)
    except Exception as exc:  # the template's own errors (jinja syntax, raise_exception, a role it refuses)
        raise InvalidRequestError(
            f"the chat template failed on a conversation ({type(exc).__name__}: {exc})") from exc


def _end_ids(tokenizer) -> Set[int]:
    """mlx-lm's wrapper gives a set of ids, a plain transformers tokenizer may give one int."""
    ids = getattr(tokenizer, "eos_token_ids", None) or getattr(tokenizer, "eos_token_id", None)
    return {ids} if isinstance(ids, int) else set(ids or ())
