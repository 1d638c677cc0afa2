"""Images and videos a request refers to, fetched under the server's rules.

    data:image/png;base64,…   decoded in memory (images only); the media type must be an image format
    clip.mp4, photos/cat.png   a file inside --media-dir: no absolute paths, no '..', no symlink out of it
    https://…                  refused unless --allow-remote-media (images only, size- and time-bounded)

An image's pixel count is read from its header and refused (413) before a pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from PIL import Image

from mindvl.errors import MediaError
from mindvl.serve.errors import ServeError, from_mindvl
from mindvl.shapes.image import decode_image

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")


@dataclass(frozen=True)
class MediaPolicy:
    media_dir: Path | None  # resolved; None: no file references
    max_image_pixels: int
    allow_remote: bool
    max_remote_bytes: int
    remote_timeout: float  # seconds

    def image(self, url: str, where: str) -> Image.Image:
        """The image `url` names, decoded to RGB; `where` (messages[0].content[1]) names it in errors."""
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            data, name = _data_url(url, where), where
        elif scheme in ("http", "https"):
            data, name = self._fetch(url, where), f"{where}: {url[:100]}"
        elif scheme:
            raise ServeError(400, f"{where}: {scheme}: URLs are not served; send a data: URL or a file name "
                                  "inside the server's --media-dir", param=where)
        else:
            data, name = self.file(url, where).read_bytes(), f"{where}: {url}"
        try:
            return decode_image(io.BytesIO(data), name, self.max_image_pixels)
        except MediaError as e:
            raise from_mindvl(e, where) from None

    def video(self, url: str, where: str) -> Path:
        if urlsplit(url).scheme:
            raise ServeError(400, f"{where}: a video is taken by its file name inside the server's --media-dir, "
                                  f"not as a URL; put the file there and send its name", param=where)
        return self.file(url, where)

    def file(self, name: str, where: str) -> Path:
        """A file inside the media folder, by a relative name that stays inside it once symlinks are resolved."""
        if self.media_dir is None:
            raise ServeError(400, f"{where}: file reference {name[:100]!r} needs a server started with --media-dir; "
                                  "send the image as a data: URL instead", param=where)
        relative = PurePosixPath(name)
        if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name or "\0" in name:
            raise ServeError(400, f"{where}: {name[:100]!r} is not a plain relative file name; name a file inside "
                                  "the media folder, without '..' or a leading '/'", param=where)
        path = (self.media_dir / relative).resolve()
        if not path.is_relative_to(self.media_dir):
            raise ServeError(400, f"{where}: {name!r} leads out of the media folder (through a symlink); name a "
                                  "file that is inside it", param=where)
        if not path.is_file():
            raise ServeError(404, f"{where}: {name!r} is not a file in the media folder; check the name",
                             param=where, code="media_not_found")
        return path

    def _fetch(self, url: str, where: str) -> bytes:
        if not self.allow_remote:
            raise ServeError(400, f"{where}: remote media URLs are refused by this server (started without "
                                  "--allow-remote-media); send the image as a data: URL", param=where)
        try:
            with urllib.request.urlopen(url, timeout=self.remote_timeout) as response:
                data = response.read(self.max_remote_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ServeError(400, f"{where}: cannot fetch {url[:100]} ({e}); check the URL or send a data: URL",
                             param=where) from None
        if len(data) > self.max_remote_bytes:
            raise ServeError(413, f"{where}: {url[:100]} is larger than {self.max_remote_bytes} bytes; send a "
                                  "smaller image", param=where)
        return data


def _data_url(url: str, where: str) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    media_type, *params = header.split(";")
    if not comma or "base64" not in params:
        raise ServeError(400, f"{where}: malformed data: URL; write data:image/png;base64,<base64 bytes>",
                         param=where)
    if media_type.lower() not in IMAGE_TYPES:
        raise ServeError(400, f"{where}: unsupported media type {media_type[:50]!r} in a data: URL; send one of "
                              f"{', '.join(IMAGE_TYPES)}", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as e:
        raise ServeError(400, f"{where}: the data: URL's payload is not valid base64 ({e}); encode the file's "
                              "bytes with standard base64", param=where) from None
