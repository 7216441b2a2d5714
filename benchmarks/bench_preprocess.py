"""Cost per image of each preprocessing step on real 250x250 cells (one core, no cache).

python benchmarks/bench_preprocess.py [--root builtin:bm-sample] [--n 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import cv2

from marrowscope.config import PreprocessConfig
from marrowscope.data.sample import resolve_root
from marrowscope.preprocess.ops import denoise, resize, sharpen
from marrowscope.utils.image import IMAGE_EXTENSIONS, read_image


def per_image_ms(fn, items) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - t0) / len(items) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default="builtin:bm-sample")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    root = resolve_root(args.root)
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[
        : args.n
    ]
    c = PreprocessConfig(size=args.size)
    imgs = [read_image(p) for p in files]
    small = [resize(i, args.size) for i in imgs]
    rows = [
        ("decode JPEG (read_image)", per_image_ms(read_image, files)),
        (f"resize to {args.size}", per_image_ms(lambda i: resize(i, args.size), imgs)),
        (
            "fastNlMeansDenoisingColored (h=10, hColor=10, 7, 21)",
            per_image_ms(
                lambda i: denoise(
                    i,
                    h=c.denoise_h,
                    h_color=c.denoise_h_color,
                    template_window=c.denoise_template_window,
                    search_window=c.denoise_search_window,
                ),
                small,
            ),
        ),
        ("sharpen (paper's 3x3 kernel)", per_image_ms(sharpen, small)),
    ]
    lines = [
        f"Measured {date.today().isoformat()}, one OpenCV thread, {len(files)} real cells "
        f"({imgs[0].shape[1]}x{imgs[0].shape[0]}) from {args.root}.",
        "",
        "| step | ms per image |",
        "|---|---:|",
        *[f"| {name} | {ms:.2f} |" for name, ms in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
