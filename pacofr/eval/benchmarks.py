"""The alignment probe under the benchmarks' protocols (`eval-alignment --format wflw|300w|cofw|aflw19`):
faces cropped from their boxes (formats.py), the probe of alignment.py fitted in the crops'
pixels, its predictions mapped back to the image's pixels and scored there against the
annotations, with each benchmark's normalization, threshold and subsets:

- wflw: NME by the outer eye corners (60, 72), FR and AUC at 0.1; the full test set and each
  of its six attribute subsets (WFLW's protocol, as in LAB and HRNet).
- 300w: NME by the outer eye corners (36, 45) and by the pupils (the eye contours' means), FR
  and AUC at 0.08 (the 300-W challenge's CED range); common (helen, lfpw), challenging (ibug)
  and full.
- cofw: NME by points 8 and 9 (HRNet's COFW scale) and by the pupils 16 and 17 (the
  inter-pupil NME of COFW's own paper and most tables), FR and AUC at 0.1, and the NME of the
  occluded and of the visible points (each point's error over the face's inter-ocular scale,
  averaged over the points of that kind of all faces).
- aflw19: NME by sqrt(w * h) of the annotated box (NME_box) and by its diagonal (NME_diag), FR
  and AUC at 0.07 (AUC_box@0.07); full and frontal.
"""

from functools import partial

import numpy as np
import torch

from ..model import ViTEncoder
from .alignment import PREVIEW, auc, benchmark_scale, extract, failure_rate, fit_ridge
from .common import MIN_TEST, check_test_size, skipped_files
from .formats import MARGIN, WFLW_SUBSETS, BoxedFaces

PROTOCOLS = {
    "wflw": {"points": 98, "norms": ("inter_ocular",), "threshold": 0.1, "subsets": WFLW_SUBSETS,
             "crop": "the annotated box", "source": "WFLW (Wu et al., CVPR 2018), list_98pt_rect_attr_*.txt"},
    "300w": {"points": 68, "norms": ("inter_ocular", "inter_pupil"), "threshold": 0.08,
             "subsets": ("common", "challenging"), "crop": "the landmarks' box",
             "source": "300-W (Sagonas et al.), .pts files; challenging = ibug, common = helen + lfpw test sets"},
    "cofw": {"points": 29, "norms": ("inter_ocular", "inter_pupil"), "threshold": 0.1, "subsets": (),
             "crop": "the landmarks' box", "source": "COFW (Burgos-Artizzu et al., ICCV 2013), COFW_*_color.mat"},
    "aflw19": {"points": 19, "norms": ("box", "box_diag"), "threshold": 0.07, "subsets": ("frontal",),
               "crop": "the annotated box", "source": "AFLW-19 (Zhu et al., CVPR 2016), AFLWinfo_release.mat"},
}


def face_targets(dataset: BoxedFaces, meta: torch.Tensor):
    """(landmarks [N, K, 2] in image pixels, crop boxes [N, 4], the faces) of extracted items."""
    faces = [dataset.faces[int(i)] for i in meta[:, 0]]
    return torch.tensor(np.array([f.points for f in faces]), dtype=torch.float64), meta[:, 1:].double(), faces


def summary(errors: torch.Tensor, threshold: float) -> dict:
    """NME (%), FR and AUC (%) at `threshold` of per-face NMEs, and the faces' count."""
    return {"nme": 100 * float(errors.mean()) if len(errors) else None, "fr": failure_rate(errors, threshold),
            "auc": auc(errors, threshold), "faces": len(errors)}


def split_nme(dist: torch.Tensor, scale: torch.Tensor, occluded: torch.Tensor) -> dict:
    """The NME (%) of the occluded and of the visible points: point errors [N, K] over their
    face's scale [N], averaged over the points of each kind (None: no such point)."""
    per_point = dist / scale[:, None]
    mean = lambda m: 100 * float(per_point[m].mean()) if m.any() else None  # noqa: E731
    return {"occluded_points_nme": mean(occluded), "visible_points_nme": mean(~occluded),
            "occluded_points": int(occluded.sum())}


def scored(dist: torch.Tensor, scales: dict, masks: dict, threshold: float) -> dict:
    """{norm: {subset: summary}} of point errors [N, K], per-face scales {norm: [N]} and subset
    masks {name: [N]}."""
    per_face = dist.mean(-1)
    return {n: {name: summary(per_face[m] / s[m], threshold) for name, m in masks.items()} for n, s in scales.items()}


def _scales(points, faces, norms) -> dict:
    boxes = torch.tensor([f.box if f.box is not None else (0.0,) * 4 for f in faces], dtype=torch.float64)
    return {n: benchmark_scale(points, n, boxes) for n in norms}


def _test_faces(encoder, test: BoxedFaces, norms, grid: int, batch_size: int, workers: int, device):
    """(features, landmarks [N, K, 2], crop boxes, faces, scales {norm: [N]}, item meta, Skipped) of
    the usable test faces; those with a zero scale are skipped ("degenerate_scale")."""
    x_test, meta_test, skipped_test = extract(encoder, test, grid, batch_size, workers, device)
    y_test, boxes_test, faces = face_targets(test, meta_test)
    scales = _scales(y_test, faces, norms)
    keep = torch.stack([(s > 0) & torch.isfinite(s) for s in scales.values()]).all(0)
    for k in (~keep).nonzero().flatten().tolist():
        skipped_test.add(test.paths[int(meta_test[k, 0])], "degenerate_scale")
    return (x_test[keep], y_test[keep], boxes_test[keep], [f for f, k in zip(faces, keep) if k],
            {n: s[keep] for n, s in scales.items()}, meta_test[keep], skipped_test)


def evaluate(encoder: ViTEncoder, protocol: str, train: BoxedFaces, test: BoxedFaces, grid: int = 7,
             batch_size: int = 64, workers: int = 2, seed: int = 0, min_test: int = MIN_TEST, occlusion=None) -> dict:
    """Fits the probe on `train`'s crops, scores it and the mean shape on `test` by `protocol`;
    `occlusion` (occlusion.Occlusion): the full set's NME (first norm) at each of its levels too."""
    spec = PROTOCOLS[protocol]
    device = next(encoder.parameters()).device
    grid = min(grid, *encoder.grid)
    x_train, meta_train, skipped_train = extract(encoder, train, grid, batch_size, workers, device)
    y_train, boxes_train, _ = face_targets(train, meta_train)
    test_faces = partial(_test_faces, encoder, norms=spec["norms"], grid=grid, batch_size=batch_size,
                         workers=workers, device=device)
    x_test, y_test, boxes_test, faces, scales, meta_test, skipped_test = test_faces(test)
    check_test_size(len(faces), min_test, test)

    crop_train = train.to_crop(y_train, boxes_train).float()
    model, search = fit_ridge(x_train, crop_train, "diag", seed=seed)  # (penalty chosen by NME_diag in the crops)
    predict = lambda x, boxes: test.to_image(model.predict(x).view(len(x), -1, 2), boxes)  # noqa: E731
    pred = predict(x_test, boxes_test)
    mean_shape = test.to_image(crop_train.double().mean(0, keepdim=True).expand(len(faces), -1, -1), boxes_test)
    dist, floor = (pred - y_test).norm(dim=-1), (mean_shape - y_test).norm(dim=-1)
    t = spec["threshold"]
    masks = {"full": torch.ones(len(faces), dtype=torch.bool),
             **{s: torch.tensor([s in f.subsets for f in faces], dtype=torch.bool) for s in spec["subsets"]}}
    result = {
        "protocol": protocol, "source": spec["source"], "points": spec["points"], "threshold": t,
        "conventions": {
            "crop": f"the square of {MARGIN} x the longer side of {spec['crop']}, same centre, clipped to the "
                    "image, resized to the model's input",
            "scoring": "predictions mapped back to the image's pixels and scored against the annotations there",
            "norms": list(spec["norms"]), "auc": "exact area under the CED curve from 0 to the threshold, "
                                                 "divided by it", "fr": "NME above the threshold"},
        "nme": scored(dist, scales, masks, t), "mean_shape": scored(floor, scales, masks, t),
        "mean_shape_nme": {n: 100 * float((floor.mean(-1) / scales[n]).mean()) for n in spec["norms"]},
    }
    if protocol == "cofw":
        occluded = torch.tensor(np.array([f.occluded for f in faces]), dtype=torch.bool)
        result.update(split_nme(dist, scales["inter_ocular"], occluded))
    if occlusion is not None:
        first = spec["norms"][0]

        def nme_of(dataset) -> float:
            x, y, boxes, _, s, _, _ = test_faces(dataset)
            everyone = {"full": torch.ones(len(y), dtype=torch.bool)}
            return scored((predict(x, boxes) - y).norm(dim=-1), {first: s[first]}, everyone, t)[first]["full"]["nme"]

        result["robustness"] = occlusion.sweep(test, nme_of, f"nme_{first}", lower_is_better=True)
    show = list(range(min(PREVIEW, len(faces))))
    return {**result, "train_faces": len(y_train), "test_faces": len(faces), "features": x_train.shape[1],
            "grid": grid, "penalty": search["penalty"], "val_nme_diag": [100 * v for v in search["val_nme"]],
            "skipped_train": skipped_train.counts, "skipped_test": skipped_test.counts,
            "skipped_files": skipped_files(train=skipped_train, test=skipped_test),
            "preview": [(int(meta_test[i, 0]), test.to_crop(pred[i:i + 1], boxes_test[i:i + 1])[0],
                         test.to_crop(y_test[i:i + 1], boxes_test[i:i + 1])[0]) for i in show]}


__all__ = ["PROTOCOLS", "evaluate", "summary", "scored", "split_nme", "face_targets"]
