def open_rgb(path: str) -> Image.Image:
    """The image as ResLens reads it (_draft and oriented_rgb above are ResLens's own: a large JPEG decoded at a
    reduced scale, EXIF orientation, 16-bit values scaled, transparency laid over grey, at most MAX_SIDE)."""
    with Image.open(path) as image:
        _draft(image)
        image.load()
        return oriented_rgb(image)


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


def image_arguments(argv: list[str]) -> list[str]:
    """The image paths on the command line: ``--help`` prints the usage, and none at all is a usage error."""
    import argparse

    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().partition("\n")[0] or None)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify (JPEG, PNG, ...)")
    return parser.parse_args(argv).images
