"""The tokenizer files of an mlx-lm folder, built with ``tokenizers`` from a GGUF file's vocabulary.

Two GGUF tokenizer models:

* ``gpt2`` (SmolLM2): byte-level BPE, the vocabulary already spelled in GPT-2's byte alphabet, merges
  listed in the file; digits are split one by one before the byte-level split (SmolLM2's own
  pre-tokenizer).
* ``llama`` (Gemma 3): SentencePiece-style BPE over ``▁``-for-space text with byte fallback. Gemma's
  file lists no merges: they are rebuilt from the vocabulary, every token cut into two tokens that
  exist, ranked by the token's position in the file (Gemma's order of merges; its scores are not).

Control tokens (GGUF type 3) become special tokens; user-defined ones (type 4: newline runs, HTML
tags) become added tokens matched whole, as in the models' own ``tokenizer.json``.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from semantic.domain.errors import InvalidRequestError
from semantic.domain.request_checks import is_int

CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # llama.cpp's token types


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer_json: str
    tokenizer_config: Dict[str, Any]
    config_ids: Dict[str, int]  # bos/eos/pad ids for config.json

    def write(self, folder: pathlib.Path) -> None:
        (folder / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config, indent=2) + "\n",
                                                      encoding="utf-8")


def tokenizer_files(metadata: Mapping[str, Any]) -> TokenizerFiles:
    kind = metadata.get("tokenizer.ggml.model")
    tokens: List[str] = list(metadata["tokenizer.ggml.tokens"])
    types: List[int] = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(tokens, list(metadata["tokenizer.ggml.merges"]))
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(tokens, types, metadata.get("tokenizer.ggml.merges"))
    else:
        raise InvalidRequestError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, t in enumerate(types) if t == USER_DEFINED and tokens[i].strip(" ")])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, t in enumerate(types) if t == CONTROL])

    def token_of(key: str) -> Tuple[Optional[str], Optional[int]]:
        index = metadata.get(f"tokenizer.ggml.{key}")
        if index is None:
            return None, None
        # llama.cpp's -1 ("no token") would index from the end: the last token would end every reply.
        if not is_int(index) or not 0 <= index < len(tokens):
            raise InvalidRequestError(f"tokenizer.ggml.{key} is {index!r}, not a token id (0..{len(tokens) - 1})")
        return tokens[int(index)], int(index)

    bos, bos_id = token_of("bos_token_id")
    eos, eos_id = token_of("eos_token_id")
    unk, _ = token_of("unknown_token_id")
    pad, pad_id = token_of("padding_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        # The fast tokenizer adds what its post-processor says, whatever tokenizer_config.json claims. The
        # template names the token "BOS", not by its text: a text such as "$A" or "a:b" is template syntax.
        tokenizer.post_processor = processors.TemplateProcessing(
            single="BOS $A", pair="BOS $A BOS $B", special_tokens=[{"id": "BOS", "ids": [bos_id], "tokens": [bos]}]
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad,
        "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    return TokenizerFiles(tokenizer.to_str(), tokenizer_config, {k: v for k, v in ids.items() if v is not None})


def _byte_level_bpe(tokens: List[str], merges: List[str]) -> tokenizers.Tokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: List[str], types: List[int], merges: Optional[List[str]]) -> tokenizers.Tokenizer:
    # Gemma's file spells its runs of spaces with real spaces; the model sees them as ▁ runs.
    spelled = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    if merges:
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    else:
        pairs = _merges_from_vocab(spelled, types, vocab)
    unk = next((t for t, kind in zip(spelled, types) if t == "<unk>"), None)
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, byte_fallback=True,
                                                fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    return tokenizer


# Bounds on rebuilding merges from a vocabulary: every cut of every token whose halves are tokens is a merge, so
# a crafted vocabulary ("a", "aa", ... of 900 tokens) held cubic memory (1.1 GiB), one long token quadratic time.
MAX_REBUILT_TOKEN_CHARS = 256  # Gemma 3's longest token: 31
MAX_REBUILT_MERGES = 2**21  # Gemma 3: 513,511


def _merges_from_vocab(tokens: List[str], types: List[int], vocab: Mapping[str, int]) -> List[Tuple[str, str]]:
    ranked = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED, BYTE) or len(token) < 2:
            continue
        if len(token) > MAX_REBUILT_TOKEN_CHARS:
            raise InvalidRequestError(
                f"token {index} has {len(token)} characters; rebuilding merges (the file has none) takes tokens of "
                f"at most {MAX_REBUILT_TOKEN_CHARS}")
        if len(ranked) > MAX_REBUILT_MERGES:
            raise InvalidRequestError(f"its vocabulary makes more than {MAX_REBUILT_MERGES} merges by token index "
                                      f"{index}, far more than a real one")
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
