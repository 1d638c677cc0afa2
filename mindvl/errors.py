"""User-facing errors: each message is one line naming the problem and the fix."""


class MindVLError(Exception):
    """An expected failure caused by the user's input; the CLI prints it as one line, no traceback."""


class CheckpointError(MindVLError):
    """A model folder is missing files, has corrupt files, or disagrees with its config."""


class MediaError(MindVLError):
    """An image or video cannot be read or is out of bounds."""


class MediaTooLargeError(MediaError):
    """An image has more pixels than may be decoded (checked from its header, before decoding)."""


class UnsupportedError(MindVLError):
    """A request the backend or the model cannot serve (architecture, dtype on this device)."""


class ArtifactError(MindVLError):
    """An artifact folder is incomplete, tampered with, or made by an incompatible version."""


class ExportError(MindVLError):
    """An export cannot start or finish (target folder in use, bucket spec unusable)."""


class RequestError(MindVLError):
    """A generation request asks for something impossible (sampling settings, token counts)."""
