"""ModelInput and its chunks.

Tinker's image chunks exist so that code naming them (renderers, isinstance checks)
runs; tunemesh serves text models only, so a ModelInput holding one is refused before
anything is sent (INVALID_ARGUMENT [UNSUPPORTED_CHUNK], see `tunemesh._wire`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal, Union

ImageFormat = Literal["png", "jpeg"]


@dataclasses.dataclass(frozen=True)
class EncodedTextChunk:
    """A run of token ids."""

    tokens: Sequence[int]
    type: Literal["encoded_text"] = "encoded_text"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", [int(t) for t in self.tokens])

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class ImageChunk:
    """An image given by its bytes, as Tinker names it. tunemesh cannot send one."""

    data: bytes
    format: ImageFormat
    expected_tokens: int | None = None
    type: Literal["image"] = "image"

    @property
    def length(self) -> int:
        return _image_length(self)


@dataclasses.dataclass(frozen=True)
class ImageAssetPointerChunk:
    """An image given by its path or URL, as Tinker names it. tunemesh cannot send one."""

    format: ImageFormat
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        return _image_length(self)


ModelInputChunk = Union[EncodedTextChunk, ImageChunk, ImageAssetPointerChunk]
"""A chunk of a ModelInput; only EncodedTextChunk can be sent to tunemesh."""


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """The tokens a model reads: the concatenation of its chunks."""

    chunks: Sequence[ModelInputChunk] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", list(self.chunks))

    @classmethod
    def from_ints(cls, tokens: Iterable[int]) -> ModelInput:
        return cls([EncodedTextChunk(list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls([])

    def to_ints(self) -> list[int]:
        """The tokens; ValueError if a chunk is not text."""
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError(f"to_ints needs text chunks only, got a {type(chunk).__name__}")
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """A new ModelInput with `chunk` added at the end."""
        return ModelInput([*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one token added to the last text chunk."""
        if self.chunks and isinstance(self.chunks[-1], EncodedTextChunk):
            last = EncodedTextChunk([*self.chunks[-1].tokens, int(token)])
            return ModelInput([*self.chunks[:-1], last])
        return self.append(EncodedTextChunk([int(token)]))


def _image_length(chunk: ImageChunk | ImageAssetPointerChunk) -> int:
    if chunk.expected_tokens is None:
        raise ValueError(f"{type(chunk).__name__}.length needs expected_tokens")
    return chunk.expected_tokens
