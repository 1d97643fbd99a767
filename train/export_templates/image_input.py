def open_rgb(path: str) -> Image.Image:
    """The image as ResLens reads it: turned by its EXIF orientation, transparency laid over grey (128)."""
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (128, 128, 128, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def readable(paths: list[str]) -> tuple[list[tuple[str, Image.Image]], int]:
    """The images that can be read, and how many cannot (each said on stderr: one bad file does not stop the rest)."""
    images, failed = [], 0
    for path in paths:
        try:
            images.append((path, open_rgb(path)))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            print(f"{path}: cannot be read as an image ({exc})", file=sys.stderr)
            failed += 1
    return images, failed
