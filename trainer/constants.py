"""The paper's network and training constants (Krizhevsky, Sutskever, Hinton, NIPS 2012): §3, §4.2, §5.

The data constants (image sizes, crops, lighting) are in ``pipeline/constants.py``; between the two
modules every paper number is written once. Where a value is a choice of this project rather than
the paper's text, the comment says so and ``docs/DEVIATIONS.md`` lists it.
"""

from alexnet.pipeline import constants as _data

# §3.3 Local response normalisation: the paper's constants.
LRN_K = 2.0
LRN_SIZE = 5
LRN_ALPHA = 1e-4
LRN_BETA = 0.75
# How alpha is applied (docs/DEVIATIONS.md N6):
#   "authors": alpha / n inside the sum, as the authors' code ran it (cuda-convnet's layer.py divides
#              the configured scale by the size), default; equals torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2);
#   "paper-text": alpha as the paper's formula writes it (five times stronger).
LRN_FORMS = ("authors", "paper-text")
DEFAULT_LRN = "authors"

# §3.4 Overlapping pooling.
POOL_KERNEL = 3
POOL_STRIDE = 2

# §4.2 Dropout: zero each output with probability 0.5 while training (no rescaling); at test time
# use all neurons and multiply their outputs by 0.5 (the authors' cuda-convnet2 "dropout2" layer).
DROPOUT_P = 0.5

# §5 Details of learning.
BATCH_SIZE = _data.BATCH_SIZE  # 128, written in pipeline/constants.py (the tools need it too)
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BASE_LR = 0.01
LR_DROP_FACTOR = 0.1
LR_DROPS = 3
EPOCHS = 90
INIT_WEIGHT_STD = 0.01
INIT_BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")

# §3 Architecture.
NUM_CLASSES = 1000
PARAMETER_COUNT_1000 = 60_965_224
