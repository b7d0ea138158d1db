"""The names a setting may choose from, in one leaf module that imports nothing of the project.

Why here: settings.py checks every value before any work starts, so it needs these lists; the
modules that act on a choice (anomaly_model.backbone, anomaly_model.store, pipeline.detector, ...)
need them too. Kept in the owners, the lists made settings.py import upward and the owners import
settings.py back: a cycle. Kept here, every layer imports them downward (docs/architecture.md,
"Import layers"); tests/test_architecture.py checks that each owner's table matches its list.
"""

ANOMALY_MODELS = ("padim", "patchcore")  # anomaly_model.store.MODEL_TYPES
BACKBONES = ("resnet18", "wide_resnet50_2", "mobilenet_v2")  # anomaly_model.backbone
BACKBONE_PRECISIONS = ("float32", "bfloat16", "float16")  # anomaly_model.backbone.AUTOCAST_DTYPES
PADIM_SCORES = ("mahalanobis", "hybrid", "chebyshev")  # anomaly_model.chebyshev
PIXEL_THRESHOLD_POLICIES = ("validation", "chebyshev")  # pipeline.training
RUNTIMES = ("torch", "onnxruntime")  # pipeline.detector
TILE_STATISTICS = ("shared", "location")  # anomaly_model.tiles
CLASSIFIER_ANCHORS = ("shrink", "guard", "margin", "none")  # classification_model.xgboost
