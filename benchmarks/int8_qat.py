"""Quantisation-aware fine-tuning of a bundle, distilled from its own fp32 model (issue 17).

Post-training int8 quantisation of the shipped bm8 keeps its macro-F1 but agrees with fp32 on
98.2% of its validation cells, under the guard's 99%. This script tries the lever left: NNCF's
post-training quantisation of the PyTorch model (fake-quantise nodes), then a short fine-tuning
of that model, on the bundle's training split in random d8 views, to reproduce the fp32 model's
logits (distillation: mean squared logit error + KL of the temperature-scaled probabilities); the
result is converted to OpenVINO int8 and scored with the export's own guard (d8 rule and single
view) on the validation split after every epoch.

    python benchmarks/int8_qat.py bm8 --epochs 2 --lr 1e-5 --out docs/results/int8_qat_bm8.json

Needs ``marrowscope[int8]``. CPU only; about 10 minutes per epoch on 2 cores for bm8.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from marrowscope.data.recorded import recorded_split
from marrowscope.export.int8 import (
    _guards,
    _load_arrays,
    calibration_images,
    calibration_views,
    quantize_openvino,
    save_int8,
)
from marrowscope.inference.openvino_runtime import import_openvino
from marrowscope.inference.predictor import ONNX_INPUT, ONNX_OUTPUT, Predictor, tta_views
from marrowscope.models.bundle import load_bundle, pretrained_bundle


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float() / 255.0


class _Cached:
    """The fp32 reference's view logits, computed once for all the scorings."""

    def __init__(self, predictor: Predictor, cache: Path | None = None) -> None:
        self.temperature_ = predictor.temperature_
        self._p, self._cache = predictor, cache
        self._logits = np.load(cache) if cache is not None and cache.is_file() else None

    def view_logits_preprocessed(self, arrays: np.ndarray) -> np.ndarray:
        if self._logits is None:
            self._logits = self._p.view_logits_preprocessed(arrays)
            if self._cache is not None:
                np.save(self._cache, self._logits)
        return self._logits


def _score(ov_model, meta, ref, arrays, labels, tag, log):  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "int8"
        save_int8(ov_model, meta.replace(int8={"runtime": "openvino", "note": tag}), folder)
        int8 = Predictor.from_checkpoint(folder, backend="int8", batch_size=32)
        t0 = time.perf_counter()
        rule, single = _guards(
            ref, int8, arrays, labels, meta.classes, max_f1_drop=0.005, min_agreement=0.99
        )
    row = {
        "model": tag,
        "d8": rule.to_dict(),
        "single_view": single.to_dict(),
        "guard_s": round(time.perf_counter() - t0, 1),
    }
    log.append(row)
    print(
        f"{tag}: agreement d8 {rule.agreement:.4f} single {single.agreement:.4f}; "
        f"macro-F1 drop d8 {rule.macro_f1_drop:+.4f} single {single.macro_f1_drop:+.4f}; passed {rule.passed}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-train", type=int, default=0, help="train cells per epoch (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--objective",
        choices=("view", "rule"),
        default="view",
        help="view: match the fp32 logits of one random d8 view per batch; rule: match the "
        "fp32 prediction rule itself (all 8 views of each image, temperature, mean of "
        "probabilities), i.e. what the guard compares",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ref-cache", type=Path, help=".npy of the fp32 view logits (reused)")
    ap.add_argument("--skip-ptq", action="store_true", help="no OpenVINO-PTQ reference row")
    ap.add_argument(
        "--cosine", action="store_true", help="cosine decay of the learning rate to 0 over the run"
    )
    ap.add_argument(
        "--save",
        type=Path,
        help="folder: each epoch's int8 export (DIR/epoch-N, with its guard in the metadata)",
    )
    args = ap.parse_args()

    import nncf

    ov = import_openvino()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model, meta = load_bundle(args.checkpoint, device="cpu")
    bdir = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else None
    bdir = bdir or pretrained_bundle(args.checkpoint)
    split = recorded_split(bdir, meta)
    index = {c: i for i, c in enumerate(meta.classes)}
    train_rows, val_rows = split.split("train"), split.split("val")
    print(f"{len(train_rows)} training and {len(val_rows)} validation cells", flush=True)
    train, _ = _load_arrays([r.path for r in train_rows], meta, workers=2, what="train")
    val, kept = _load_arrays([r.path for r in val_rows], meta, workers=2, what="val")
    labels = np.asarray([index[val_rows[i].label] for i in kept])
    calib_files, _ = calibration_images(bdir, meta, seed=args.seed)
    calib, _ = _load_arrays(calib_files, meta, workers=2, what="calibration")
    calib = calibration_views(calib, meta.inference.tta, seed=args.seed)

    teacher = copy.deepcopy(model).float().eval()
    ref = _Cached(
        Predictor.from_model(model, meta, device="cpu", precision="fp32", batch_size=32),
        args.ref_cache,
    )
    log: list[dict] = []
    result = {"checkpoint": args.checkpoint, "args": {k: str(v) for k, v in vars(args).items()}}

    # the export's own post-training quantisation (OpenVINO graph), for reference
    if not args.skip_ptq:
        _score(quantize_openvino(model, calib), meta, ref, val, labels, "ptq-openvino", log)

    # post-training quantisation of the PyTorch model: the starting point of the fine-tuning
    size = meta.input_size
    dataset = nncf.Dataset(list(calib), lambda img: _to_tensor(img[None]))
    student = nncf.quantize(  # (the PyTorch backend has only the fast bias correction)
        copy.deepcopy(model).float().eval(), dataset, subset_size=len(calib)
    )

    def convert() -> object:
        student.eval()
        with torch.no_grad():
            m = ov.convert_model(
                student,
                example_input=torch.rand(1, 3, size, size),
                input=[ov.PartialShape([-1, 3, size, size])],
            )
        m.input(0).get_tensor().set_names({ONNX_INPUT})
        m.output(0).get_tensor().set_names({ONNX_OUTPUT})
        return m

    _score(convert(), meta, ref, val, labels, "ptq-torch epoch 0", log)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    n_views = len(tta_views(train[:1], "d8"))
    step = args.batch if args.objective == "view" else max(1, args.batch // n_views)
    steps_per_epoch = -(-min(args.max_train or len(train), len(train)) // step)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
        if args.cosine
        else None
    )
    t_soft = float(ref.temperature_)
    for epoch in range(1, args.epochs + 1):
        student.eval()  # batch-norm statistics and dropout frozen; gradients still flow
        order = rng.permutation(len(train))
        if args.max_train:
            order = order[: args.max_train]
        t0, losses = time.perf_counter(), []
        for start in range(0, len(order), step):
            idx = np.sort(order[start : start + step])
            if args.objective == "view":
                view = int(rng.integers(n_views))
                x = _to_tensor(tta_views(train[idx], "d8")[view])
            else:  # (views, images) stacked view-major
                x = _to_tensor(np.concatenate(tta_views(train[idx], "d8")))
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            if args.objective == "view":
                loss = F.mse_loss(s, t) + F.kl_div(
                    F.log_softmax(s / t_soft, 1), F.softmax(t / t_soft, 1), reduction="batchmean"
                )
            else:
                k = len(idx)
                p_t = F.softmax(t / t_soft, 1).view(n_views, k, -1).mean(0)
                p_s = F.softmax(s / t_soft, 1).view(n_views, k, -1).mean(0)
                loss = F.mse_loss(s, t) + F.kl_div(
                    p_s.clamp_min(1e-8).log(), p_t, reduction="batchmean"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss))
        dt = time.perf_counter() - t0
        seen = len(order) * (1 if args.objective == "view" else n_views)
        print(f"epoch {epoch}: loss {np.mean(losses):.4f}, {seen / dt:.1f} img/s", flush=True)
        ov_model = convert()
        row = _score(ov_model, meta, ref, val, labels, f"qat epoch {epoch}", log)
        if args.save is not None:
            note = {"runtime": "openvino", "note": f"qat epoch {epoch}", "guard": row["d8"]}
            save_int8(ov_model, meta.replace(int8=note), args.save / f"epoch-{epoch}")
        row["train_loss"] = float(np.mean(losses))
        row["train_img_s"] = round(seen / dt, 2)
        result["log"] = log
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    result["log"] = log
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
