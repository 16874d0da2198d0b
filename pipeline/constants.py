"""The paper's data constants (Krizhevsky, Sutskever, Hinton, NIPS 2012): images, crops, lighting.

The network's and the recipe's constants (§3, §5) are in ``trainer/constants.py``; between the two
modules every paper number is written once, and everything else imports these names.
Units are in the names or the comments. Where a value is a choice of this
project rather than the paper's text, the comment says so and
``docs/DEVIATIONS.md`` lists it.
"""

# §2 Dataset: rescale so that the shorter side is 256, keep the central 256x256 patch.
RESIZE_SHORTER = 256  # pixels
STORED_SIZE = 256  # pixels, side of the stored centre crop

# §4.1 Data augmentation: random 224x224 patches and their horizontal reflections.
CROP_SIZE = 224  # pixels
CROP_POSITIONS = STORED_SIZE - CROP_SIZE + 1  # 33 offsets per axis
MIRROR_PROBABILITY = 0.5

# §4.1 PCA lighting: alpha_i ~ N(0, 0.1), drawn once per image.
LIGHTING_STD = 0.1
# Scale conventions for the lighting shift, each explained in dali_pipeline.lighting_scale_values
# and docs/DEVIATIONS.md A2; "sqrt" (the authors' released code) is the default.
LIGHTING_SCALES = ("sqrt", "eigval01")
DEFAULT_LIGHTING_SCALE = "sqrt"

# §4.1 Test time: four corners and centre, each with its reflection.
TEN_CROP = 10

# §5: "a batch size of 128 examples". The trainer's default (trainer/constants.py takes it from here);
# alexnet-prep's order and bench-pipeline default to it without importing the trainer.
BATCH_SIZE = 128

# ILSVRC-2012 golden counts.
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000

# Widely used ImageNet figures, printed beside ours for orientation only
# (never used in computation). RGB, 0-255 scale; eigenvectors as columns.
IMAGENET_REFERENCE_MEAN_RGB = (123.68, 116.28, 103.53)
IMAGENET_REFERENCE_STD_255 = (121.78, 37.09, 19.72)  # sqrt of eigenvalues, 0-255 scale
IMAGENET_REFERENCE_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
