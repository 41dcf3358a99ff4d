"""An annotated copy of a video: every frame with the current top classes and their confidence bars.

Drawn with Pillow, encoded with PyAV as H.264 in MP4 (yuv420p, what every player opens). The file is
written under a temporary name beside the target and takes its name when closed, so a run cut short
never leaves a half-written file where a finished one is expected; a stream that breaks still closes
it, with the frames it had.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, ImageDraw, ImageFont

from .errors import X3DNetError
from .video import quarter_turns


class AnnotatedVideo:
    """``write(frame, top, caption, fps=...)`` for each decoded frame (at the source's rate); ``close()``
    finishes the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise X3DNetError(f"{path}: the annotated video is written as MP4; name it FILE.mp4")
        self.part = self.path.with_name(f".{self.path.name}.part")
        self.container = av.open(str(self.part), "w", format="mp4")  # fails now, not after the first frames
        self.stream = None
        self.font: ImageFont.ImageFont | None = None

    def write(self, frame: av.VideoFrame, top: list[tuple[str, float]], caption: str, *, fps: float) -> None:
        image = frame.to_image()  # RGB, as stored; turned upright as players show it
        turns = quarter_turns(frame)
        if turns:
            image = image.rotate(90 * turns, expand=True)
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            # yuv420p halves the chroma planes: an odd side loses its last row or column.
            self.stream.width, self.stream.height = image.width // 2 * 2, image.height // 2 * 2
            self.stream.pix_fmt = "yuv420p"
            self.font = _font(max(10, image.height // 22))
        image = _draw(image.crop((0, 0, self.stream.width, self.stream.height)), top, caption, self.font)
        for packet in self.stream.encode(av.VideoFrame.from_image(image)):
            self.container.mux(packet)

    def close(self) -> Path | None:
        """Finish the file and give it its name; None (and no file) if no frame was written."""
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()
        if self.stream is None:
            self.part.unlink(missing_ok=True)
            return None
        os.replace(self.part, self.path)
        return self.path


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _draw(image: Image.Image, top: list[tuple[str, float]], caption: str, font: ImageFont.ImageFont) -> Image.Image:
    """The top classes in a translucent panel at the top left: a bar as long as each probability, its
    label and percentage over it, and a caption line (time, step) under them."""
    size = getattr(font, "size", 11)
    pad, line = max(2, size // 3), int(size * 1.5)
    width = min(image.width, max(12 * size, int(image.width * 0.55)))
    height = pad * 2 + line * (len(top) + 1)
    panel = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(panel)
    draw.rectangle((0, 0, width, height), fill=(0, 0, 0, 150))
    for i, (label, p) in enumerate(top):
        y = pad + i * line
        bar = int((width - 2 * pad) * max(0.0, min(1.0, p)))
        colour = (40, 170, 90, 210) if i == 0 else (60, 110, 190, 190)
        draw.rectangle((pad, y + 1, pad + bar, y + line - 2), fill=colour)
        draw.text((pad * 2, y + (line - size) // 2), f"{100 * p:5.1f}%  {label}", fill=(255, 255, 255, 255), font=font)
    draw.text((pad * 2, pad + len(top) * line + (line - size) // 2), caption, fill=(230, 230, 230, 255), font=font)
    return Image.alpha_composite(image.convert("RGBA"), panel).convert("RGB")
