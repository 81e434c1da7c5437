"""Fill-in-the-middle prompts in Qwen2.5-Coder's format, built from the tokenizer's own special tokens.

    [<|repo_name|>repo\n <|file_sep|>name\ntext ... <|file_sep|>filename\n]
    <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>prompt

The bracketed repository context appears only with extra files (and only when the model has those
tokens). A prompt longer than the room left for it keeps the end of the prefix (3/4 of the room)
and the start of the suffix, as llama.cpp does; extra files fill what room remains (the last ones
listed are kept).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
REPO_NAME, FILE_SEP = "<|repo_name|>", "<|file_sep|>"


class FimUnsupportedError(ValueError):
    """The model's tokenizer has no fill-in-the-middle tokens."""


@dataclasses.dataclass
class Infill:
    prefix: str
    suffix: str
    prompt: str = ""  # text already typed at the cursor: the middle starts with it
    extra: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file name, text) for context


def check_fim(special: dict[str, int]) -> None:
    missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if t not in special]
    if missing:
        raise FimUnsupportedError(f"this model has no fill-in-the-middle tokens ({', '.join(missing)} missing "
                                  f"from its tokenizer)")


def infill_ids(infill: Infill, special: dict[str, int], encode: Callable[[str], list[int]], room: int) -> list[int]:
    """The prompt's token ids, at most `room` of them (FimUnsupportedError without FIM tokens)."""
    check_fim(special)
    prompt = encode(infill.prompt) if infill.prompt else []
    room -= 3 + len(prompt)
    prefix = encode(infill.prefix) if infill.prefix else []
    suffix = encode(infill.suffix) if infill.suffix else []
    prefix = prefix[len(prefix) - min(len(prefix), max(0, room * 3 // 4, room - len(suffix))):]
    suffix = suffix[:max(0, room - len(prefix))]
    room -= len(prefix) + len(suffix)
    body = [special[FIM_PREFIX], *prefix, special[FIM_SUFFIX], *suffix, special[FIM_MIDDLE], *prompt]
    return _repository(infill.extra, special, encode, room) + body


def _repository(extra: list[tuple[str, str]], special: dict[str, int], encode, room: int) -> list[int]:
    if not extra or REPO_NAME not in special or FILE_SEP not in special:
        return []
    head = [special[REPO_NAME], *encode("myproject\n")]
    tail = [special[FILE_SEP], *encode("filename\n")]  # the file being edited, its name unknown
    files: list[int] = []
    room -= len(head) + len(tail)
    for name, text in reversed(extra):  # the last files listed are kept when not all fit
        file = [special[FILE_SEP], *encode(f"{name}\n{text}")]
        if len(file) > room:
            break
        files, room = file + files, room - len(file)
    return head + files + tail if files else []
