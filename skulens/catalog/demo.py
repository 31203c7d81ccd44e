"""A deterministic synthetic demo catalog and shelf set, so the pipeline runs with no data.

Products are rendered packshots on white (boxes, bottles, cans, pouches, jars) with brand
text, colour schemes, patterns and logos; some come as flavour variants that differ only in
colour, as real catalogs do. Shelf crops are made from them with perspective, blur, lighting,
noise, JPEG compression and occlusion (price tags, neighbours). A few bad files (empty, an
HTML error page saved as .jpg, a truncated JPEG, a thumbnail, a duplicate, a SKU with two
images) exercise the cleaning stage.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from skulens.model.augment import perspective_coeffs

CATEGORIES = {
    "cereal": "box",
    "drinks": "bottle",
    "soda": "can",
    "snacks": "pouch",
    "spreads": "jar",
}
PALETTE = [
    (200, 30, 40), (30, 90, 200), (20, 150, 70), (240, 190, 20), (120, 40, 160),
    (240, 120, 20), (20, 160, 170), (90, 60, 30), (230, 80, 150), (40, 40, 40),
    (150, 200, 40), (250, 240, 220),
]
PATTERNS = ["stripes", "band", "dots", "diagonal", "chevron", "plain"]
LOGOS = ["circle", "triangle", "star", "square", "diamond"]
SYLLABLES = ["ko", "ra", "mi", "zu", "to", "ve", "la", "no", "ba", "qi", "sa", "fe", "do", "pu"]


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    category: str
    shape: str
    brand: str
    primary: tuple
    secondary: tuple
    pattern: str
    logo: str
    size: str


def make_products(n: int = 30, seed: int = 7) -> list[Product]:
    rng = random.Random(seed)
    cats = list(CATEGORIES)
    products: list[Product] = []
    i = 0
    while len(products) < n:
        cat = cats[i % len(cats)]
        brand = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).upper()
        base = dict(category=cat, shape=CATEGORIES[cat], brand=brand, pattern=rng.choice(PATTERNS),
                    logo=rng.choice(LOGOS), secondary=rng.choice(PALETTE))
        # every third brand ships flavour variants that differ only in colour
        variants = 2 if i % 3 == 0 else 1
        prim = rng.sample(PALETTE, variants)
        for v in range(variants):
            if len(products) >= n:
                break
            sku = f"demo-{len(products) + 1:03d}"
            flavour = ["Original", "Lemon", "Berry", "Cocoa"][v] if variants > 1 else "Classic"
            size = rng.choice(["250 g", "330 ml", "500 g", "1 l", "150 g"])
            products.append(Product(sku=sku, name=f"{brand.title()} {flavour} {size}", primary=prim[v],
                                    size=size, **base))
        i += 1
    return products


def _contrast(color: tuple) -> tuple:
    return (20, 20, 20) if sum(color) > 420 else (250, 250, 250)


def render_packshot(p: Product, size: int = 256, view: int = 0, rng: random.Random | None = None) -> Image.Image:
    """A product on white; ``view`` varies scale, offset, rotation and light a little."""
    rng = rng or random.Random(view)
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    w, h = {"box": (0.55, 0.8), "bottle": (0.36, 0.86), "can": (0.42, 0.7), "pouch": (0.6, 0.72),
            "jar": (0.55, 0.62)}[p.shape]
    scale = 1.0 + rng.uniform(-0.08, 0.05)
    pw, ph = int(size * w * scale), int(size * h * scale)
    x0 = (size - pw) // 2 + rng.randint(-8, 8)
    y0 = (size - ph) // 2 + rng.randint(-6, 6)
    x1, y1 = x0 + pw, y0 + ph
    body = (x0, y0, x1, y1)
    if p.shape == "bottle":
        neck = pw // 3
        d.rectangle((x0 + neck, y0, x1 - neck, y0 + ph // 5), fill=p.secondary)
        body = (x0, y0 + ph // 5, x1, y1)
        d.rounded_rectangle(body, radius=pw // 4, fill=p.primary)
    elif p.shape == "can":
        d.rounded_rectangle(body, radius=pw // 6, fill=p.primary)
        d.rectangle((x0, y0, x1, y0 + ph // 12), fill=(190, 190, 195))
        d.rectangle((x0, y1 - ph // 12, x1, y1), fill=(190, 190, 195))
    elif p.shape == "pouch":
        d.polygon([(x0 + pw // 10, y0), (x1 - pw // 10, y0), (x1, y1), (x0, y1)], fill=p.primary)
    elif p.shape == "jar":
        d.rectangle((x0 + pw // 8, y0, x1 - pw // 8, y0 + ph // 6), fill=p.secondary)
        body = (x0, y0 + ph // 6, x1, y1)
        d.rounded_rectangle(body, radius=pw // 8, fill=p.primary)
    else:
        d.rectangle(body, fill=p.primary)
    bx0, by0, bx1, by1 = body
    bw, bh = bx1 - bx0, by1 - by0
    # pattern
    if p.pattern == "stripes":
        for k in range(0, bh, max(6, bh // 8)):
            d.rectangle((bx0 + 2, by0 + k, bx1 - 2, by0 + k + max(2, bh // 30)), fill=p.secondary)
    elif p.pattern == "band":
        d.rectangle((bx0, by0 + bh // 2, bx1, by0 + bh // 2 + bh // 5), fill=p.secondary)
    elif p.pattern == "dots":
        for yy in range(by0 + 8, by1 - 4, max(10, bh // 7)):
            for xx in range(bx0 + 8, bx1 - 4, max(10, bw // 5)):
                d.ellipse((xx - 3, yy - 3, xx + 3, yy + 3), fill=p.secondary)
    elif p.pattern == "diagonal":
        for k in range(-bh, bw, max(10, bw // 5)):
            d.line((bx0 + k, by1, bx0 + k + bh, by0), fill=p.secondary, width=3)
    elif p.pattern == "chevron":
        for k in range(by0 + 10, by1, max(14, bh // 5)):
            d.line((bx0, k, bx0 + bw // 2, k - 10, bx1, k), fill=p.secondary, width=4)
    # label with brand and logo
    lab = (bx0 + bw // 8, by0 + bh // 6, bx1 - bw // 8, by0 + bh // 6 + bh // 4)
    d.rectangle(lab, fill=(250, 250, 245), outline=p.secondary, width=2)
    d.text((lab[0] + 4, lab[1] + 4), p.brand, fill=p.primary if sum(p.primary) < 600 else (30, 30, 30))
    cx, cy, r = (lab[0] + lab[2]) // 2, lab[3] + bh // 6, max(6, bw // 7)
    fg = _contrast(p.primary)
    if p.logo == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif p.logo == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fg)
    elif p.logo == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif p.logo == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    else:
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r // 2
            a = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        d.polygon(pts, fill=fg)
    d.text((bx0 + 6, by1 - 14), p.size, fill=fg)
    if view:
        im = im.rotate(rng.uniform(-4, 4), resample=Image.BICUBIC, fillcolor=(255, 255, 255))
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.93, 1.05))
    return im


def shelfify(im: Image.Image, rng: random.Random, out_size: int | None = None) -> Image.Image:
    """Make a packshot look like a shelf crop: perspective, light, blur, occlusion, noise, small.

    A data *simulator* for the demo set (stdlib ``random``, stronger than
    :func:`skulens.model.augment.shelf_augment`); the perspective step uses the shared
    :func:`skulens.model.augment.perspective_coeffs`.
    """
    w, h = im.size
    j = 0.12
    # the packshot rectangle is shrunk onto a jittered quad of the output (shelf colour around it)
    quad = [(rng.uniform(0, j) * w, rng.uniform(0, j) * h), (w - rng.uniform(0, j) * w, rng.uniform(0, j) * h),
            (w - rng.uniform(0, j) * w, h - rng.uniform(0, j) * h), (rng.uniform(0, j) * w, h - rng.uniform(0, j) * h)]
    shelf_bg = tuple(int(c) for c in (rng.randint(150, 210), rng.randint(150, 200), rng.randint(140, 190)))
    coeffs = perspective_coeffs(dst=quad, src=[(0, 0), (w, 0), (w, h), (0, h)])  # output quad -> input corners
    im = im.transform((w, h), Image.PERSPECTIVE, coeffs, resample=Image.BICUBIC, fillcolor=shelf_bg)
    # white packshot background -> shelf colour
    arr = np.asarray(im).astype(np.int16)
    white = (arr > 245).all(axis=2)
    arr[white] = shelf_bg
    im = Image.fromarray(arr.astype(np.uint8))
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.15))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.75, 1.1))
    d = ImageDraw.Draw(im)
    if rng.random() < 0.6:  # price tag or neighbour occluding part of the product
        ow, oh = int(w * rng.uniform(0.2, 0.4)), int(h * rng.uniform(0.1, 0.22))
        ox = rng.choice([0, w - ow])
        oy = rng.randint(int(h * 0.55), h - oh)
        d.rectangle((ox, oy, ox + ow, oy + oh), fill=rng.choice([(250, 250, 250), (250, 230, 60), (60, 60, 60)]))
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6)))
    arr = np.asarray(im).astype(np.float32)
    nrng = np.random.default_rng(rng.randint(0, 2**31 - 1))
    arr += nrng.normal(0, rng.uniform(2, 7), arr.shape)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    side = out_size or rng.randint(90, 170)
    return im.resize((side, int(side * h / w)), Image.BILINEAR)


def _jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def write_demo(
    out: Path,
    n_skus: int = 30,
    images_per_sku: int = 6,
    crops_per_sku: int = 4,
    photos: int = 2,
    seed: int = 7,
    bad_files: bool = True,
) -> dict:
    """Write ``out/catalog`` (products.csv + images/<sku>/) and ``out/shelf`` (<sku>/ crops, photos/, boxes.csv)."""
    out = Path(out)
    products = make_products(n_skus, seed)
    cat_dir, shelf_dir = out / "catalog", out / "shelf"
    (cat_dir / "images").mkdir(parents=True, exist_ok=True)
    shelf_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(cat_dir / "products.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["sku", "name", "category", "brand", "size", "packshot"])
        for p in products:  # view 0 (the front, on white) is the reference image: the contract's packshot column
            wr.writerow([p.sku, p.name, p.category, p.brand.title(), p.size, "00.jpg"])
    counts = {"skus": len(products), "catalog_images": 0, "shelf_crops": 0, "photo_boxes": 0, "bad_files": 0}
    for p in products:
        d = cat_dir / "images" / p.sku
        d.mkdir(exist_ok=True)
        for v in range(images_per_sku):
            im = render_packshot(p, view=v, rng=random.Random(f"{seed}-{p.sku}-{v}"))
            (d / f"{v:02d}.jpg").write_bytes(_jpeg_bytes(im, quality=92))
            counts["catalog_images"] += 1
        sd = shelf_dir / p.sku
        sd.mkdir(exist_ok=True)
        for c in range(crops_per_sku):
            r = random.Random(f"{seed}-{p.sku}-shelf-{c}")
            crop = shelfify(render_packshot(p, view=100 + c, rng=r), r)
            (sd / f"crop{c:02d}.jpg").write_bytes(_jpeg_bytes(crop, quality=80))
            counts["shelf_crops"] += 1
    if photos:
        (shelf_dir / "photos").mkdir(exist_ok=True)
        rows = []
        for ph in range(photos):
            r = random.Random(f"{seed}-photo-{ph}")
            canvas = Image.new("RGB", (1200, 400), (170, 160, 150))
            dr = ImageDraw.Draw(canvas)
            dr.rectangle((0, 360, 1200, 400), fill=(110, 100, 90))
            x = 10
            picks = r.sample(products, min(8, len(products)))
            for p in picks:
                item = shelfify(render_packshot(p, view=200 + ph, rng=r), r, out_size=130)
                y = 360 - item.height
                canvas.paste(item, (x, y))
                rows.append((f"shelf{ph:02d}.jpg", p.sku, x, y, item.width, item.height))
                x += item.width + r.randint(5, 15)
            (shelf_dir / "photos" / f"shelf{ph:02d}.jpg").write_bytes(_jpeg_bytes(canvas, 88))
        with open(shelf_dir / "boxes.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["photo", "sku", "x", "y", "w", "h"])
            wr.writerows(rows)
        counts["photo_boxes"] = len(rows)
    if bad_files and len(products) >= 4:
        img = cat_dir / "images"
        good = (img / products[0].sku / "00.jpg").read_bytes()
        (img / products[0].sku / "empty.jpg").write_bytes(b"")
        (img / products[1].sku / "error-page.jpg").write_bytes(
            b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>" + b" " * 2000 + b"</body></html>")
        (img / products[2].sku / "truncated.jpg").write_bytes(good[: len(good) * 2 // 3])
        (img / products[3].sku / "thumb.jpg").write_bytes(
            _jpeg_bytes(render_packshot(products[3]).resize((20, 20)), 95) + b"\0" * 1200)
        (img / products[0].sku / "00-copy.jpg").write_bytes(good)  # exact duplicate within a SKU
        # a launch-like SKU with only two usable images (its packshot named): index-only, never trained on
        lone = Product(sku=f"demo-{len(products) + 1:03d}", name="Lonely Two-Image Product 100 g",
                       category="snacks", shape="pouch", brand="LONE", primary=(60, 60, 200),
                       secondary=(240, 240, 240), pattern="plain", logo="circle", size="100 g")
        (img / lone.sku).mkdir(exist_ok=True)
        for v in range(2):
            (img / lone.sku / f"{v:02d}.jpg").write_bytes(_jpeg_bytes(render_packshot(lone, view=v), 92))
        with open(cat_dir / "products.csv", "a", newline="") as fh:
            csv.writer(fh).writerow([lone.sku, lone.name, lone.category, "Lone", lone.size, "00.jpg"])
        counts["bad_files"] = 7
        counts["catalog_images"] += 7
    rng.random()
    return counts
