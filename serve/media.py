"""Images and videos a request refers to, fetched under the server's rules.

    data:image/png;base64,…   decoded in memory (images only); the media type must be an image format
    clip.mp4, photos/cat.png   a file inside --media-dir: no absolute paths, no '..', no symlink out of it
    https://…                  refused unless --allow-remote-media (images only, size- and time-bounded)

An image's format and pixel count are read from its header and refused (413) before a pixel is decoded, a file's
size before it is read; decoding waits until the whole request is known to fit (`shapes.processor`).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from mindvl.errors import MediaError
from mindvl.serve.errors import ServeError, from_mindvl
from mindvl.serve.remote import FetchError, Network, fetch
from mindvl.shapes.image import read_image_header
from mindvl.shapes.processor import MediaFile

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")

log = logging.getLogger("mindvl.serve")


@dataclass(frozen=True)
class MediaPolicy:
    media_dir: Path | None  # resolved; None: no file references
    max_image_pixels: int
    allow_remote: bool
    max_remote_bytes: int
    remote_timeout: float  # seconds for a whole fetch, redirects included
    remote_networks: tuple[Network, ...] = ()  # non-public networks remote URLs may reach (--allow-media-network)
    max_file_bytes: int = 100 * 2**20  # a file in the media folder, checked before it is read

    def image(self, url: str, where: str) -> MediaFile:
        """The image `url` names, its header checked (format, pixel count) but not decoded; `where`
        (messages[0].content[1]) names it in errors."""
        scheme = _scheme(url, where)
        if scheme == "data":
            image = MediaFile(_data_url(url, where), where)
        elif scheme in ("http", "https"):
            image = MediaFile(self._fetch(url, where), f"{where}: {url[:100]}")
        elif scheme:
            raise ServeError(400, f"{where}: {scheme[:20]}: URLs are not served; send a data: URL or a file name "
                                  "inside the server's --media-dir", param=where)
        else:
            image = MediaFile(self.file(url, where), f"{where}: {url}")
        try:
            source = io.BytesIO(image.source) if isinstance(image.source, bytes) else image.source
            read_image_header(source, image.name, self.max_image_pixels)
        except MediaError as e:
            raise from_mindvl(e, where) from None
        return image

    def video(self, url: str, where: str) -> MediaFile:
        if _scheme(url, where):
            raise ServeError(400, f"{where}: a video is taken by its file name inside the server's --media-dir, "
                                  f"not as a URL; put the file there and send its name", param=where)
        return MediaFile(self.file(url, where), f"{where}: {url}")

    def file(self, name: str, where: str) -> Path:
        """A file inside the media folder, by a relative name that stays inside it once symlinks are resolved,
        and no larger than the server reads."""
        if self.media_dir is None:
            raise ServeError(400, f"{where}: file reference {name[:100]!r} needs a server started with --media-dir; "
                                  "send the image as a data: URL instead", param=where)
        relative = PurePosixPath(name)
        if not name or relative.is_absolute() or ".." in relative.parts or "\\" in name or "\0" in name:
            raise ServeError(400, f"{where}: {name[:100]!r} is not a plain relative file name; name a file inside "
                                  "the media folder, without '..' or a leading '/'", param=where)
        try:
            path = (self.media_dir / relative).resolve()
            if not path.is_relative_to(self.media_dir):
                raise ServeError(400, f"{where}: {name[:100]!r} leads out of the media folder (through a symlink); "
                                      "name a file that is inside it", param=where)
            size = path.stat().st_size if path.is_file() else None
        except OSError as e:  # a name too long for the file system, a loop of symlinks...
            raise ServeError(400, f"{where}: {name[:100]!r} cannot name a file here ({e.strerror}); check the "
                                  "name", param=where) from None
        if size is None:
            raise ServeError(404, f"{where}: {name[:100]!r} is not a file in the media folder; check the name",
                             param=where, code="media_not_found")
        if size > self.max_file_bytes:
            raise ServeError(413, f"{where}: {name[:100]!r} is {size} bytes, more than the {self.max_file_bytes} "
                                  "this server reads (--max-media-mb); send a smaller file", param=where)
        return path

    def _fetch(self, url: str, where: str) -> bytes:
        if not self.allow_remote:
            raise ServeError(400, f"{where}: remote media URLs are refused by this server (started without "
                                  "--allow-remote-media); send the image as a data: URL", param=where)
        try:
            return fetch(url, self.max_remote_bytes, self.remote_timeout, self.remote_networks)
        except FetchError as e:  # the reason stays in the log: it would tell the client what the network holds
            log.warning("%s: fetching %r failed: %s", where, url[:200], e)
            raise ServeError(400, f"{where}: the image URL could not be fetched; it must be a public http(s) URL "
                                  f"that answers with an image of at most {self.max_remote_bytes} bytes within "
                                  f"{self.remote_timeout:g} s, or send the image as a data: URL",
                             param=where) from None


def _scheme(url: str, where: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError as e:  # such as an unclosed IPv6 bracket: http://[::1
        raise ServeError(400, f"{where}: malformed URL ({e}); send a data: URL, an http(s) URL or a file name",
                         param=where) from None


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
