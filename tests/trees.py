"""Small generated data-set trees that mimic the real downloads (names, CSV headers, folders)."""
from __future__ import annotations

import numpy as np
from PIL import Image

ISIC_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def jpg(path, seed, size=(20, 24)):
    """A random-noise JPEG at ``path`` (its folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, format="JPEG")


def isic_tree(root, split_name, classes_by_image, size=(20, 24)):
    """ISIC 2018 task 3's ``{split_name}`` files: the images and the one-hot ground-truth CSV."""
    images = root / f"ISIC2018_Task3_{split_name}_Input"
    gt = root / f"ISIC2018_Task3_{split_name}_GroundTruth"
    gt.mkdir(parents=True, exist_ok=True)
    lines = ["image," + ",".join(ISIC_COLUMNS)]
    for i, (name, cls) in enumerate(classes_by_image.items()):
        jpg(images / f"{name}.jpg", i, size)
        lines.append(name + "," + ",".join("1.0" if c == cls else "0.0" for c in ISIC_COLUMNS))
    (gt / f"ISIC2018_Task3_{split_name}_GroundTruth.csv").write_text("\n".join(lines) + "\n")
