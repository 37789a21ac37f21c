"""The baseline a CPU line would otherwise run: a short OpenVINO script over the graph that
``ckaad-fast export --format openvino`` wrote, scoring a folder of images into a CSV.

Whole-process comparisons time it against ``ckaad-fast score`` on the same files (see
docs/BENCHMARKS.md, "Engines"). Written as a user would: PIL decode and bilinear resize, batches of
uint8 images, OpenVINO's CPU plugin at the given precision hint, one CSV row per image.

Run: ``python benchmarks/openvino_score.py DEPLOY_DIR IMAGES_DIR OUT.csv [--batch 8] [--hint f32|bf16]``
"""
import argparse
import csv
import json
import os

import numpy as np
import openvino as ov
from PIL import Image

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("deploy", help="the folder ckaad-fast export --format openvino wrote (model.xml, model.json)")
p.add_argument("images", help="a folder of images")
p.add_argument("out", help="the CSV to write")
p.add_argument("--batch", type=int, default=8, help="images per inference (default 8)")
p.add_argument("--hint", default="f32", help="OpenVINO's inference precision hint: f32 or bf16 (default f32)")
a = p.parse_args()
h, w = json.load(open(os.path.join(a.deploy, "model.json")))["image_size"]
model = ov.Core().compile_model(os.path.join(a.deploy, "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": a.hint})
names = sorted(f for f in os.listdir(a.images) if f.lower().endswith((".png", ".jpg", ".jpeg")))
with open(a.out, "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["path", "score", "is_anomalous"])
    for i in range(0, len(names), a.batch):
        chunk = names[i:i + a.batch]
        x = np.stack([np.asarray(Image.open(os.path.join(a.images, n)).convert("RGB").resize((w, h), Image.BILINEAR))
                      for n in chunk]).transpose(0, 3, 1, 2)
        r = model(np.ascontiguousarray(x))
        for n, s, d in zip(chunk, r[model.output("score")], r[model.output("is_anomalous")]):
            out.writerow([os.path.join(a.images, n), f"{s:.9g}", bool(d)])
