"""Where the video tokens sit in an attention call."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VideoLayout"]


@dataclass(frozen=True)
class VideoLayout:
    """Token layout of one attention call over a video.

    The video part is frame-major, as diffusers patchifies it: video token ``i`` is
    ``(t, y, x)`` with ``i = (t * height + y) * width + x``. Joint-attention models put
    ``text_before`` context tokens in front of it (CogVideoX) or ``text_after`` behind it
    (HunyuanVideo, MotifVideo); those are attended densely and never dropped.

    Args:
        frames: latent frames after the temporal patch.
        height: token rows per frame.
        width: token columns per frame.
        text_before: context tokens before the video part.
        text_after: context tokens after the video part.
    """

    frames: int
    height: int
    width: int
    text_before: int = 0
    text_after: int = 0

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoLayout.{name} must be a positive int, got {value!r}")
        for name in ("text_before", "text_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"VideoLayout.{name} must be a non-negative int, got {value!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        """Length of the whole attended sequence, context tokens included."""
        return self.text_before + self.num_video_tokens + self.text_after

    @property
    def video_slice(self) -> slice:
        """Positions of the video tokens in the sequence."""
        return slice(self.text_before, self.text_before + self.num_video_tokens)

    def with_context(self, seq_len: int, text_position: str) -> VideoLayout:
        """This grid inside a sequence of ``seq_len`` tokens whose extra tokens sit
        ``"before"`` or ``"after"`` the video part (``"none"``: there are none)."""
        extra = seq_len - self.num_video_tokens
        if extra < 0 or (extra and text_position == "none"):
            raise ValueError(
                f"attention over {seq_len} tokens does not fit a video grid of "
                f"{self.frames}x{self.height}x{self.width} = {self.num_video_tokens} tokens "
                f"(context tokens allowed: {text_position})"
            )
        if text_position == "before":
            return VideoLayout(self.frames, self.height, self.width, text_before=extra)
        return VideoLayout(self.frames, self.height, self.width, text_after=extra)

    def __str__(self) -> str:
        parts = [f"{self.frames}x{self.height}x{self.width} video tokens"]
        if self.text_before:
            parts.insert(0, f"{self.text_before} text")
        if self.text_after:
            parts.append(f"{self.text_after} text")
        return " + ".join(parts) + f" = {self.seq_len}"
