"""The paper's own stack, Keras on TensorFlow (fp32), timed on request: a helper process for
``benchmarks/keras_vs_marrowscope.py``.

Run with a Python that has TensorFlow (it is never a marrowscope dependency), e.g. a throwaway
virtual environment: ``python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
numpy``. The orchestrator starts it as a subprocess and speaks JSON lines on stdin/stdout, so the
two stacks never run at the same time and their rounds can alternate:

    {"cmd": "info"}
    {"cmd": "build", "model": "resnet50", "size": 224, "classes": 8, "batch": 16}
    {"cmd": "build", "model": "resnet50", ..., "input_dtype": "uint8", "key": "resnet50-u8"}
    {"cmd": "time", "model": "resnet50", "warmup": 1, "batches": 3}   -> {"seconds": [...]}
    {"cmd": "free", "model": "resnet50"}
    {"cmd": "quit"}

Models are the paper's (Shah, Nadar, Kanikar 2025) as Keras builds them: the ``keras.applications``
backbone (``weights=None``: speed does not depend on the weights; global average pooling) with the
paper's head (BatchNormalization -> Dense(256, relu) -> Dropout -> Dense(n)), and the paper's own
CNN (Rescaling -> 3 x [Conv2D 3x3 relu -> MaxPool] -> Dropout -> Flatten -> Dense(128, relu) ->
Dense(n)). ``mobilenetv2`` is the architecture of marrowscope's shipped models. Inference is
``model.predict_on_batch`` on float32 NHWC batches (Keras' own compiled predict step), or on
uint8 batches cast to float32 inside the graph (``input_dtype``; the model is then stored and timed
under ``key``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

BACKBONES = {
    "convnext_small": "ConvNeXtSmall",
    "convnext_tiny": "ConvNeXtTiny",
    "densenet121": "DenseNet121",
    "efficientnet_b5": "EfficientNetB5",
    "resnet50": "ResNet50",
    "vgg16": "VGG16",
    "xception": "Xception",
    "mobilenetv2": "MobileNetV2",
}


def build(name: str, size: int, classes: int, input_dtype: str = "float32") -> Any:
    """The Keras model ``name`` for ``size`` px RGB inputs (``input_dtype``: float32 as the
    paper's ``image_dataset_from_directory`` yields, or uint8 cast inside the graph) and
    ``classes`` outputs."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3), dtype=input_dtype)
    if input_dtype != "float32":
        inputs_f = layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(inputs)
    else:
        inputs_f = inputs
    if name == "paper_cnn":
        x = layers.Rescaling(1.0 / 255)(inputs_f)
        for filters in (16, 32, 64):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = layers.MaxPooling2D()(x)
        x = layers.Dropout(0.5)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(128, activation="relu")(x)
        return keras.Model(inputs, layers.Dense(classes)(x), name=name)
    if name not in BACKBONES:
        raise SystemExit(f"unknown model {name!r}; use paper_cnn or one of {sorted(BACKBONES)}")
    backbone = getattr(keras.applications, BACKBONES[name])(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    )
    x = backbone(inputs_f)
    x = layers.BatchNormalization()(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name=name)


def main() -> None:
    import tensorflow as tf

    models: dict[str, tuple[Any, np.ndarray]] = {}
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.get("cmd")
        try:
            if cmd == "info":
                import keras

                out: dict[str, Any] = {
                    "tensorflow": tf.__version__,
                    "keras": keras.__version__,
                    "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                    "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
                    "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
                }
            elif cmd == "build":
                name, size = req["model"], int(req["size"])
                dtype = req.get("input_dtype", "float32")
                model = build(name, size, int(req.get("classes", 8)), dtype)
                shape = (int(req.get("batch", 16)), size, size, 3)
                if dtype == "uint8":
                    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
                else:
                    x = np.random.default_rng(0).random(shape, dtype=np.float32)
                    x *= 255.0 if name == "paper_cnn" else 1.0
                models[req.get("key", name)] = (model, x)
                out = {"params": int(model.count_params())}
            elif cmd == "time":
                model, x = models[req["model"]]
                for _ in range(int(req.get("warmup", 1))):
                    model.predict_on_batch(x)
                seconds = []
                for _ in range(int(req.get("batches", 3))):
                    t0 = time.perf_counter()
                    model.predict_on_batch(x)
                    seconds.append(time.perf_counter() - t0)
                out = {"seconds": seconds, "batch": len(x)}
            elif cmd == "free":
                models.pop(req["model"], None)
                import gc

                import keras

                keras.backend.clear_session()
                gc.collect()
                out = {}
            elif cmd == "quit":
                print(json.dumps({"ok": True}), flush=True)
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
            print(json.dumps({"ok": True, **out}), flush=True)
        except Exception as e:  # report to the orchestrator instead of dying silently
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    main()
