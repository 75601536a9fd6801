"""UUID parsing with the error texts of the Rust `uuid` crate, which pydantic puts in 422s."""

from __future__ import annotations

from uuid import UUID

_HEX = frozenset("0123456789abcdefABCDEF")
_GROUP_STARTS = (0, 9, 14, 19, 24)
_GROUP_LENGTHS = (8, 4, 4, 4, 12)
_URN_PREFIX = "urn:uuid:"


def parse_uuid(text: str) -> UUID | str:
    """The UUID `text` denotes, or the reason pydantic gives for refusing it."""
    if _is_accepted(text):
        return UUID(text)
    return _refusal(text)


def _is_hyphenated(text: str) -> bool:
    groups = text.split("-")
    return (
        len(text) == 36
        and [len(g) for g in groups] == list(_GROUP_LENGTHS)
        and _all_hex("".join(groups))
    )


def _all_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


def _is_accepted(text: str) -> bool:
    # Exactly the four shapes `Uuid::parse_str` takes; Python's UUID() is laxer.
    if len(text) == 32:
        return _all_hex(text)
    if len(text) == 38 and text[0] == "{" and text[-1] == "}":
        return _is_hyphenated(text[1:-1])
    if len(text) == 45 and text.startswith(_URN_PREFIX):
        return _is_hyphenated(text[len(_URN_PREFIX) :])
    return _is_hyphenated(text)


def _refusal(text: str) -> str:
    # A port of `InvalidUuid::into_err` from uuid 1.x, so the message matches character for
    # character; positions are 1-based and count the stripped prefix.
    if len(text) >= 2 and text[0] == "{" and text[-1] == "}":
        body, offset, simple = text[1:-1], 1, False
    elif text.startswith(_URN_PREFIX):
        body, offset, simple = text[len(_URN_PREFIX) :], len(_URN_PREFIX), False
    else:
        body, offset, simple = text, 0, True
    hyphens: list[int] = []
    for index, char in enumerate(body):
        if char == "-":
            hyphens.append(index)
        elif char not in _HEX:
            return (
                "invalid character: expected an optional prefix of `urn:uuid:` followed by "
                f"[0-9a-fA-F-], found `{char}` at {index + offset + 1}"
            )
    if not hyphens and simple:
        return f"invalid length: expected length 32 for simple format, found {len(text)}"
    if len(hyphens) != 4:
        return f"invalid group count: expected 5, found {len(hyphens) + 1}"
    for group, bound in enumerate(hyphens):
        if bound != _GROUP_STARTS[group + 1] - 1:
            return _group_length(group, bound - _GROUP_STARTS[group])
    return _group_length(4, len(text) - _GROUP_STARTS[4])


def _group_length(group: int, found: int) -> str:
    expected = _GROUP_LENGTHS[group]
    return f"invalid group length in group {group}: expected {expected}, found {found}"
