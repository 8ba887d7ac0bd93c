"""sensor_msgs/Image and CompressedImage -> RGB numpy arrays, with the checks a camera driver's bugs need.

Works on any object with the message's fields (rclpy messages, rosbags messages), so the nodes and the
bag importer share it. No cv_bridge: numpy for raw encodings, OpenCV for JPEG/PNG.
"""
import io
import warnings

import cv2
import numpy as np
from PIL import Image as PILImage, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096  # default cap on decoded size (16.8 MP, 50 MB as RGB)

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
TO_RGB = {"rgb8": None, "bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
          "mono8": cv2.COLOR_GRAY2RGB}


class ImageError(ValueError):
    """A frame that cannot be converted; `reason` is a short counter key."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _bytes(data):
    return np.frombuffer(bytes(data) if not isinstance(data, (bytes, bytearray, np.ndarray)) else data, np.uint8)


def check_size(width, height, max_pixels):
    if width == 0 or height == 0:
        raise ImageError("bad_size", f"{width}x{height}")
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} is over {max_pixels} pixels (max_image_pixels)")


def image_to_rgb(msg, max_pixels=MAX_PIXELS):
    encoding = msg.encoding.lower()
    if encoding not in CHANNELS:
        raise ImageError("unsupported_encoding", f"{msg.encoding!r} (supported: {', '.join(CHANNELS)})")
    channels = CHANNELS[encoding]
    height, width, step = msg.height, msg.width, msg.step
    check_size(width, height, max_pixels)
    if step < width * channels:
        raise ImageError("bad_step", f"step {step} < width {width} x {channels} channels")
    data = _bytes(msg.data)
    if data.size < step * height:
        raise ImageError("truncated", f"{data.size} bytes, expected {step * height}")
    rows = data[: step * height].reshape(height, step)[:, : width * channels]
    image = rows.reshape(height, width, channels) if channels > 1 else rows.reshape(height, width)
    return np.ascontiguousarray(image) if TO_RGB[encoding] is None else cv2.cvtColor(image, TO_RGB[encoding])


def compressed_to_rgb(msg, max_pixels=MAX_PIXELS):
    """Decode a JPEG/PNG; its size is read from the header first, so a small file that would decode to a
    huge image is refused before any pixel memory is taken."""
    data = _bytes(msg.data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # our own cap follows
            with PILImage.open(io.BytesIO(data.tobytes())) as header:
                size = header.size
    except PILImage.DecompressionBombError as error:
        raise ImageError("too_large", f"{data.size} bytes: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError("corrupt_compressed", f"format {msg.format!r}, {data.size} bytes: no image header") from None
    check_size(*size, max_pixels)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageError("corrupt_compressed", f"format {msg.format!r}, {data.size} bytes do not decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_rgb(msg, compressed, max_pixels=MAX_PIXELS):
    return compressed_to_rgb(msg, max_pixels) if compressed else image_to_rgb(msg, max_pixels)


def rgb_to_fields(rgb, encoding="rgb8"):
    """(height, width, encoding, step, data) of a raw image message holding an RGB array."""
    image = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "bgra8": cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA),
             "rgba8": cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA), "mono8": cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)}[encoding]
    image = np.ascontiguousarray(image)
    return image.shape[0], image.shape[1], encoding, image.strides[0], image.tobytes()


def draw_answers(rgb, lines, scale=None):
    """A copy of an RGB view with text lines drawn top-left on a dark band (what the model said, for a viewer
    such as rqt_image_view); `lines` are (text, RGB colour)."""
    out = np.ascontiguousarray(rgb).copy()
    scale = scale or max(0.35, out.shape[1] / 1200)
    height = int(28 * scale) + 4
    cv2.rectangle(out, (0, 0), (out.shape[1], height * len(lines) + 6), (0, 0, 0), -1)
    for i, (text, colour) in enumerate(lines):
        cv2.putText(out, text, (6, height * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, max(1, int(2 * scale)),
                    cv2.LINE_AA)
    return out
