"""Images from what users send: PIL images, `data:` URLs, http(s) URLs, `file://` URLs under an allowed folder.

Every failure is a ValidationError (HTTP 400) that names the problem; nothing here logs or returns the bytes."""
from __future__ import annotations

import base64
import binascii
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from hfbridge.config import MultiModalConfig
from hfbridge.errors import ValidationError


class PixelBudget:
    """The pixels one prompt's images may hold: max_image_pixels each, max_prompt_pixels together."""

    def __init__(self, config: MultiModalConfig, parameter: str):
        self.config, self.parameter = config, parameter
        self.left = config.max_prompt_pixels

    def take(self, image: Image.Image) -> None:
        """Count an opened (not yet decoded) image against the budget; ValidationError past a limit."""
        width, height = image.size
        pixels = width * height
        if width < 1 or height < 1:
            raise ValidationError(f"the image is empty ({width}x{height} pixels)", parameter=self.parameter)
        if pixels > self.config.max_image_pixels:
            raise ValidationError(f"the image has {width}x{height} = {pixels} pixels, more than the limit of "
                                  f"{self.config.max_image_pixels}", parameter=self.parameter,
                                  value=f"{width}x{height}")
        if pixels > self.left:
            raise ValidationError(f"the prompt's images hold more than {self.config.max_prompt_pixels} pixels "
                                  "together, the limit for one prompt", parameter=self.parameter)
        self.left -= pixels


def check_image_count(count: int, config: MultiModalConfig, parameter: str) -> None:
    """At most limit_per_prompt["image"] images in one prompt (checked before any is fetched or decoded)."""
    limit = config.limit_per_prompt.get("image", 0)
    if count > limit:
        raise ValidationError(f"the prompt has {count} images, more than the limit of {limit} per prompt "
                              "(--limit-mm-per-prompt)", parameter=parameter, value=count)


def check_image(image: Any, budget: PixelBudget) -> Image.Image:
    """A PIL image within the budget, unchanged (the processor converts it as Transformers would)."""
    if not isinstance(image, Image.Image):
        raise ValidationError(f"an image must be a PIL.Image.Image, got {type(image).__name__}",
                              parameter=budget.parameter)
    budget.take(image)
    return image


def decode_image(data: bytes, budget: PixelBudget) -> Image.Image:
    """Bytes of an image file -> a loaded PIL image; the size is checked from the header, before decoding, so a
    decompression bomb never expands."""
    parameter = budget.parameter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            budget.take(image)
            image.load()
    except ValidationError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise ValidationError(f"the image could not be decoded: {type(e).__name__}: {str(e)[:200]}",
                              parameter=parameter) from None
    return image


def load_image_url(url: Any, budget: PixelBudget) -> Image.Image:
    """`data:image/...;base64,...`, `http(s)://...` (timeout, size cap, allowed domains), `file://...` (only under
    allowed_local_media_path)."""
    config, parameter = budget.config, budget.parameter
    if not isinstance(url, str) or not url:
        raise ValidationError("image_url.url must be a non-empty string", parameter=parameter)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    loader = _LOADERS.get(scheme)
    if loader is None:
        raise ValidationError(
            f"unsupported image URL scheme {scheme or url[:20]!r}: send a data: URL (base64), an http(s) URL, or a "
            "file:// URL under --allowed-local-media-path", parameter=parameter,
        )
    return decode_image(loader(url, config, parameter), budget)


def _data_url(url: str, config: MultiModalConfig, parameter: str) -> bytes:
    header, sep, payload = url.partition(",")
    media_type = header[5:].split(";", 1)[0].strip().lower()
    if not sep or not media_type.startswith("image/"):
        raise ValidationError(f"a data URL must hold an image (data:image/...;base64,...), got type "
                              f"{media_type or 'none'!r}", parameter=parameter)
    if ";base64" not in header.lower():
        raise ValidationError("an image data URL must be base64-encoded (data:image/...;base64,...)",
                              parameter=parameter)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("the image data URL is not valid base64", parameter=parameter) from None


def _http_url(url: str, config: MultiModalConfig, parameter: str) -> bytes:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if config.allowed_media_domains is not None and host not in config.allowed_media_domains:
        raise ValidationError(f"image URLs from {host!r} are not allowed; the server allows "
                              f"{sorted(config.allowed_media_domains)} (--allowed-media-domains)", parameter=parameter)
    deadline = time.monotonic() + config.media_fetch_timeout  # for the whole body: a server that trickles is slow too
    try:
        with urllib.request.urlopen(url, timeout=config.media_fetch_timeout) as response:  # noqa: S310 - checked scheme
            chunks, size = [], 0
            while size <= config.max_media_bytes:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the body took longer than {config.media_fetch_timeout:g} s")
            data = b"".join(chunks)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ValidationError(f"could not fetch the image from {host!r}: {str(reason)[:200]}",
                              parameter=parameter) from None
    if len(data) > config.max_media_bytes:
        raise ValidationError(f"the image at {host!r} is larger than {config.max_media_bytes} bytes",
                              parameter=parameter)
    return data


def _file_url(url: str, config: MultiModalConfig, parameter: str) -> bytes:
    if config.allowed_local_media_path is None:
        raise ValidationError("file:// image URLs are refused: the server was not started with "
                              "--allowed-local-media-path", parameter=parameter)
    path = os.path.realpath(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    root = os.path.realpath(config.allowed_local_media_path)
    if os.path.commonpath([path, root]) != root:
        raise ValidationError(f"file:// image URLs must name a file under {root} (--allowed-local-media-path)",
                              parameter=parameter)
    try:
        if os.path.getsize(path) > config.max_media_bytes:
            raise ValidationError(f"the image file is larger than {config.max_media_bytes} bytes",
                                  parameter=parameter)
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValidationError(f"could not read the image file: {e.strerror}", parameter=parameter) from None


_LOADERS = {"data": _data_url, "http": _http_url, "https": _http_url, "file": _file_url}
