"""Printable unit labels: a QR code carrying the setup URI, the setup code in text, and the
first 8 characters of the device ID (``ID 1a2b3c4d``: what a buyer types next to the code
when they cannot scan; the service finds the unit by that prefix).

Each label exists as SVG (for print shops) and PNG (for label printers and screens). The
QR payload is :func:`hearth.setupcode.setup_uri`; error correction level M survives a
scuffed label.
"""

from __future__ import annotations

import io
from xml.sax.saxutils import escape

import segno
from PIL import Image, ImageDraw, ImageFont

from hearth.setupcode import setup_uri

__all__ = ["label_png", "label_svg"]

_SCALE = 6
_BORDER = 2


def _qr(device_id: str, code: str) -> segno.QRCode:
    return segno.make(setup_uri(device_id, code), error="m", micro=False)


def label_svg(device_id: str, code: str, model: str) -> bytes:
    qr = _qr(device_id, code)
    buf = io.BytesIO()
    qr.save(buf, kind="svg", scale=_SCALE, border=_BORDER, xmldecl=False, svgns=True)
    inner = buf.getvalue().decode()
    width, height = qr.symbol_size(scale=_SCALE, border=_BORDER)
    text_h = 76
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + text_h}" '
        f'viewBox="0 0 {width} {height + text_h}">'
        f'<rect width="100%" height="100%" fill="#fff"/>'
        f"{inner}"
        f'<text x="{width // 2}" y="{height + 22}" font-family="DejaVu Sans Mono, monospace" '
        f'font-size="18" text-anchor="middle">{escape(code)}</text>'
        f'<text x="{width // 2}" y="{height + 44}" font-family="DejaVu Sans, sans-serif" '
        f'font-size="12" text-anchor="middle">Hearth {escape(model)} - setup code</text>'
        f'<text x="{width // 2}" y="{height + 64}" font-family="DejaVu Sans Mono, monospace" '
        f'font-size="14" text-anchor="middle">ID {escape(device_id[:8])}</text>'
        "</svg>"
    ).encode()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default()


def label_png(device_id: str, code: str, model: str) -> bytes:
    qr = _qr(device_id, code)
    buf = io.BytesIO()
    qr.save(buf, kind="png", scale=_SCALE, border=_BORDER)
    qr_img = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    text_h = 76
    img = Image.new("L", (qr_img.width, qr_img.height + text_h), 255)
    img.paste(qr_img, (0, 0))
    draw = ImageDraw.Draw(img)
    draw.text((img.width // 2, qr_img.height + 16), code, fill=0, font=_font(18), anchor="mm")
    draw.text((img.width // 2, qr_img.height + 40), f"Hearth {model} - setup code", fill=0,
              font=_font(11), anchor="mm")
    draw.text((img.width // 2, qr_img.height + 62), f"ID {device_id[:8]}", fill=0,
              font=_font(14), anchor="mm")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
